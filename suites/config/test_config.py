"""config.json: each key the image applies, set before the first boot and edited on the device.

The device under ``configured`` booted with hostname, dnsServers, ntpServers, persistentLogging
and an extra os.sshKeys entry written into its boot partition. Edits of config.json on a running
device are checked after the session's shared reboot (see ``RebootRound``).
"""

from __future__ import annotations

import json
import shlex

import pytest

from suites.conftest import CONFIGURED, Configured, RebootRound
from testbed.dut import DUT


def _hostname(dut: DUT) -> tuple[str, str]:
    out = dut.run("hostname; cat /etc/hostname", check=True).stdout.split()
    return (out + ["", ""])[0], (out + ["", ""])[1]


def _chrony_sources(dut: DUT) -> str:
    return dut.run("chronyc -n sources").stdout


def test_hostname_set_before_boot(configured: Configured) -> None:
    running, stored = _hostname(configured.dut)
    want = CONFIGURED["hostname"]
    assert (running, stored) == (want, want), (
        f"config.json hostname {want!r}: `hostname` says {running!r}, /etc/hostname says {stored!r}"
    )


def test_ssh_key_set_before_boot_logs_in(configured: Configured) -> None:
    outcome = configured.dut.try_ssh_login(
        "with the extra key listed in config.json os.sshKeys", key=configured.extra_key, methods=("publickey",)
    )
    assert outcome == "accepted (publickey)", f"a key from config.json os.sshKeys must log in; {outcome}"


def test_dns_servers_set_before_boot_reach_dnsmasq(configured: Configured) -> None:
    servers = configured.dut.run("cat /run/dnsmasq.servers; systemctl is-active dnsmasq").stdout
    missing = [s for s in str(CONFIGURED["dnsServers"]).split() if f"server={s}" not in servers]
    assert not missing and servers.strip().endswith("active"), (
        f"config.json dnsServers {CONFIGURED['dnsServers']!r} must reach a running dnsmasq; "
        f"missing {missing}; /run/dnsmasq.servers and dnsmasq state: {servers.strip()!r}"
    )


def test_ntp_servers_set_before_boot_reach_chrony(configured: Configured) -> None:
    sources = _chrony_sources(configured.dut)
    missing = [s for s in str(CONFIGURED["ntpServers"]).split() if s not in sources]
    assert not missing, f"config.json ntpServers {missing} are not chrony sources; `chronyc -n sources`:\n{sources}"


EDITS = {"hostname": "tb-edited", "ntpServers": "192.0.2.124", "dnsServers": "192.0.2.54"}


def _edit_config_json(dut: DUT) -> None:
    jq = " | ".join(f".{k} = {json.dumps(v)}" for k, v in EDITS.items())
    dut.run(
        f"jq {shlex.quote(jq)} /mnt/boot/config.json > /mnt/boot/config.json.new && "
        "mv /mnt/boot/config.json.new /mnt/boot/config.json && sync",
        check=True,
    )


@pytest.mark.reboot_round(prepare=_edit_config_json)
def test_edits_on_the_device_apply_after_a_reboot(reboot_round: RebootRound) -> None:
    reboot_round.before(_edit_config_json)
    dut = reboot_round.dut
    problems = []
    running, stored = _hostname(dut)
    if (running, stored) != (EDITS["hostname"], EDITS["hostname"]):
        problems.append(f"hostname: `hostname` {running!r}, /etc/hostname {stored!r}")
    if EDITS["ntpServers"] not in _chrony_sources(dut):
        problems.append(f"ntpServers {EDITS['ntpServers']} not among chrony sources")
    if f"server={EDITS['dnsServers']}" not in dut.run("cat /run/dnsmasq.servers").stdout:
        problems.append(f"dnsServers {EDITS['dnsServers']} not in /run/dnsmasq.servers")
    assert not problems, f"after editing /mnt/boot/config.json ({EDITS}) and rebooting: " + "; ".join(problems)


def test_dns_servers_null_adds_no_server(fresh_dut: DUT) -> None:
    # "null" (a string, as balenaOS writes it) means no extra upstream server, not a server
    # named "null". The image's own config-json service is run again on the edited file.
    dut = fresh_dut
    dut.run(
        "jq '.dnsServers = \"null\"' /mnt/boot/config.json > /mnt/boot/config.json.new && "
        "mv /mnt/boot/config.json.new /mnt/boot/config.json && sync && "
        "systemctl restart config-json.service && systemctl restart dnsmasq.service",
        check=True,
    )
    servers = dut.run("cat /run/dnsmasq.servers; systemctl is-active dnsmasq").stdout
    lines = [line for line in servers.splitlines() if line.strip()]
    assert lines == ["active"], (
        f'config.json dnsServers "null" must add no server and leave dnsmasq running; '
        f"/run/dnsmasq.servers and dnsmasq state: {servers.strip()!r}"
    )
