"""Networking: NetworkManager with an address and a default route, connection files from the boot
partition, link loss and recovery, and the farm's own services on the lab network: DNS through
the device's dnsmasq, NTP through its chrony, and the device's name over mDNS asked from the farm.

The farm's services run in a private network namespace (testbed/lab/network.py); the
``configured`` device has a second NIC there and config.json dnsServers/ntpServers naming them.
"""

from __future__ import annotations

import re

import pytest

from suites.conftest import CONFIGURED, CONNECTION_NAME, Configured
from testbed.capabilities import require
from testbed.dut import DUT
from testbed.errors import DutError
from testbed.lab import network as lab
from testbed.util import wait_until


def test_networkmanager_has_an_address_and_a_default_route(dut: DUT) -> None:
    state = dut.run("nmcli -t -f STATE general").stdout.strip()
    address = dut.run("ip -4 -o addr show scope global").stdout.strip()
    route = dut.run("ip -4 route show default").stdout.strip()
    assert state == "connected" and address and route, (
        f"expected NetworkManager connected with an IPv4 address and a default route; "
        f"state {state!r}, addresses {address!r}, default route {route!r}"
    )


def test_connection_file_from_boot_partition_is_applied(configured: Configured) -> None:
    dut = configured.dut
    listed = dut.run("nmcli -t -f NAME connection show").stdout.split()
    stored = dut.run(f"ls /etc/NetworkManager/system-connections/ | grep -c {CONNECTION_NAME}").stdout.strip()
    assert CONNECTION_NAME in listed, (
        f"a connection file dropped into resin-boot/system-connections must reach NetworkManager; "
        f"`nmcli connection show` lists {listed}, copies in /etc/NetworkManager/system-connections: {stored}"
    )


def test_link_down_and_up_recovers(dut: DUT, request: pytest.FixtureRequest) -> None:
    link = require(dut.link, "link control", dut)
    dut = request.getfixturevalue("fresh_dut")
    link.set_link(False)
    try:
        if dut.development_mode:
            # The console still works without a network: watch NetworkManager notice the loss.
            def lost() -> bool:
                return "connected" not in dut.console.run("nmcli -t -f STATE general").stdout.split()

            wait_until(lost, 60, "NetworkManager to see the link go down", interval=0.5)
    finally:
        link.set_link(True)

    def back() -> bool:
        try:
            return bool(dut.run("ip -4 route show default", timeout=10).stdout.strip())
        except Exception:  # noqa: BLE001 - SSH may need a moment to come back
            dut.ssh.close()
            return False

    wait_until(
        back, dut.profile.timeouts.restore_to_ssh, "a default route again after the link came back", interval=0.5
    )
    state = dut.run("nmcli -t -f STATE general").stdout.strip()
    assert state == "connected", f"after the link came back NetworkManager says {state!r}"


def _lab_address(dut: DUT) -> str:
    """The device's IPv4 address on the lab network, waiting for the farm's DHCP to give one."""

    def address() -> str:
        out = dut.run(f"ip -4 -o addr show to {lab.SUBNET}").stdout
        found = re.search(r"inet (\S+)/", out)
        return found.group(1) if found else ""

    def missing(message: str) -> Exception:
        nm = dut.run("nmcli -t -f DEVICE,STATE,CONNECTION device").stdout.strip()
        return DutError(f"{message}: no address in {lab.SUBNET} on the lab NIC; `nmcli device`: {nm!r}")

    return wait_until(
        address, dut.profile.timeouts.lab_address, "an address from the farm's DHCP", interval=0.5, on_timeout=missing
    )


def test_lab_nic_gets_a_farm_address_and_the_default_route_stays(configured: Configured) -> None:
    dut, farm = configured.dut, configured.lab
    address = _lab_address(dut)
    routes = dut.run("ip -4 route show default").stdout.strip().splitlines()
    lab_dev = dut.run(f"ip -4 -o addr show to {lab.SUBNET} | cut -d' ' -f2").stdout.strip()
    dut.record_note("farm dnsmasq leases", farm.leases(), transport="farm")
    assert len(routes) == 1 and lab_dev and f"dev {lab_dev} " not in routes[0] + " ", (
        f"the lab NIC ({lab_dev}, {address}) must not take the default route, which stays on the user-mode NIC "
        f"(the farm offers no router); `ip -4 route show default`: {routes}"
    )


def test_farm_dns_name_resolves_through_the_devices_dnsmasq(configured: Configured) -> None:
    dut, farm = configured.dut, configured.lab
    source = _lab_address(dut)
    # getent follows /etc/resolv.conf, which names the device's own dnsmasq: the way a program resolves.
    got = dut.run(f"getent ahostsv4 {lab.FARM_NAME}")
    answers = sorted({line.split()[0] for line in got.stdout.splitlines() if line.strip()})
    asked = farm.service_log("dnsmasq", grep=f"{lab.FARM_NAME} from {source}")
    dut.record_note(f"farm dnsmasq log: queries for {lab.FARM_NAME} from {source}", asked, transport="farm")
    if answers != [farm.farm_answer] or not asked:
        servers = dut.run("cat /run/dnsmasq.servers; grep -h nameserver /etc/resolv.conf").stdout.strip()
        raise AssertionError(
            f"config.json dnsServers {CONFIGURED['dnsServers']!r}: {lab.FARM_NAME} must resolve through the "
            f"device's dnsmasq to the farm's answer {farm.farm_answer}; `getent ahostsv4 {lab.FARM_NAME}` exited "
            f"{got.exit_code} with {answers or (got.stdout + got.stderr).strip()!r}; the farm's DNS "
            f"{'saw' if asked else 'never saw'} a query from the device ({source}); /run/dnsmasq.servers and "
            f"resolv.conf: {servers!r}"
        )


def test_chrony_synchronises_with_the_farm_ntp_server(configured: Configured) -> None:
    dut = configured.dut
    _lab_address(dut)
    selected = re.compile(rf"^\^\*\s+{re.escape(lab.FARM)}\s", re.MULTILINE)

    def synchronised() -> bool:
        return bool(selected.search(dut.run("chronyc -n sources").stdout))

    def not_synchronised(message: str) -> Exception:
        sources = dut.run("chronyc -n sources; chronyc -n tracking; cat /run/testbed/chrony/*.sources").stdout
        return AssertionError(
            f"config.json ntpServers {CONFIGURED['ntpServers']!r}: chrony must select the farm's NTP server "
            f"{lab.FARM} (`^*`) ({message}); chrony's sources, tracking and config-json sources:\n{sources}"
        )

    wait_until(
        synchronised,
        dut.profile.timeouts.ntp_sync,
        f"chrony to select {lab.FARM}",
        interval=1,
        max_interval=3,
        on_timeout=not_synchronised,
    )
    tracking = dut.run("chronyc -n tracking").stdout
    assert f"Stratum         : {lab.FARM_STRATUM + 1}" in tracking, (
        f"synchronised to the farm (stratum {lab.FARM_STRATUM}), chrony must report stratum {lab.FARM_STRATUM + 1}; "
        f"`chronyc -n tracking`:\n{tracking}"
    )


def test_hostname_answers_over_mdns_from_the_farm_in_development_mode(configured: Configured) -> None:
    dut, farm = configured.dut, configured.lab
    address = _lab_address(dut)
    name = dut.run("hostname", check=True).stdout.strip() + ".local"
    avahi = dut.run("systemctl is-active avahi-daemon").stdout.strip()
    timeout = dut.profile.timeouts.mdns_answer
    answers = farm.mdns_resolve(name, timeout)
    journal = dut.run("journalctl -u avahi-daemon --no-pager -n 12 -o cat").stdout.strip()
    dut.record_note(
        f"mDNS query for {name} from the farm ({lab.FARM}) to 224.0.0.251:5353", f"answers: {answers}", transport="farm"
    )
    if dut.development_mode:
        assert answers == [address], (
            f"development mode must announce {name} over mDNS on the device's networks: asked from the farm, "
            f"expected {address} (the device's lab address), got {answers or f'no answer within {timeout:g}s'}; "
            f"avahi-daemon is {avahi}; its last log lines:\n{journal}"
        )
    else:
        assert not answers and avahi != "active", (
            f"production mode must not announce {name} over mDNS: the farm got {answers}; avahi-daemon is {avahi}; "
            f"its last log lines:\n{journal}"
        )
