"""Fixtures shared by the suites: a second device booted with a config.json set before its first
boot, and one reboot shared by the checks about what a reboot keeps or applies."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
import pytest

from testbed.dut import DUT
from testbed.lab import network as lab
from testbed.lab.network import LabNetwork

# DNS and NTP point at the farm's own servers on the lab network (testbed/lab/network.py), so the
# device's dnsmasq and chrony are checked end to end and never reach anything outside this machine.
CONFIGURED = {
    "hostname": "tb-configured",
    "dnsServers": f"{lab.FARM} {lab.FARM_DNS_2}",
    "ntpServers": lab.FARM,
    "persistentLogging": True,
}
CONNECTION_NAME = "testbed-dropped"
# A dummy-interface connection: applying it needs no network, and NetworkManager shows it.
CONNECTION_FILE = f"""[connection]
id={CONNECTION_NAME}
type=dummy
interface-name=tbdummy0
autoconnect=true

[ipv4]
method=manual
address1=192.0.2.77/32

[ipv6]
method=ignore
""".encode()
UPLINK_NAME = "testbed-uplink"
# The user-mode NIC (QEMU's default MAC for the first NIC) without the DNS server QEMU's DHCP
# offers: the farm's servers from config.json are then the device's only upstream, so a name
# the farm serves resolves only if dnsServers was applied, and no query leaves the machine.
UPLINK_FILE = f"""[connection]
id={UPLINK_NAME}
type=ethernet
autoconnect=true

[ethernet]
mac-address=52:54:00:12:34:56

[ipv4]
method=auto
ignore-auto-dns=true

[ipv6]
method=auto
ignore-auto-dns=true
""".encode()


@dataclass
class Configured:
    """A device whose config.json was set before its first boot, and the extra key it lists.

    Its second NIC is on the farm's lab network (``lab``), whose DNS and NTP servers its
    config.json names.
    """

    dut: DUT
    extra_key: paramiko.PKey
    config: dict[str, object]
    lab: LabNetwork


@pytest.fixture(scope="session")
def extra_key(tmp_path_factory: pytest.TempPathFactory) -> paramiko.PKey:
    path = Path(tmp_path_factory.mktemp("keys")) / "extra"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "extra", "-f", str(path)], check=True)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


@pytest.fixture(scope="session")
def configured(lab_network: LabNetwork, dut_factory: Callable[..., DUT], extra_key: paramiko.PKey) -> Configured:
    """One more boot, with every config.json key the image applies set to a checkable value,
    and a second NIC on the farm's lab network.

    It does not need the session's ``dut``: a run of only these checks boots one device.
    """
    public = f"{extra_key.get_name()} {extra_key.get_base64()} extra"
    config = {**CONFIGURED, "os": {"sshKeys": [public]}}
    device = dut_factory(
        "configured",
        config_overrides=config,
        boot_files={
            f"/system-connections/{CONNECTION_NAME}.nmconnection": CONNECTION_FILE,
            f"/system-connections/{UPLINK_NAME}.nmconnection": UPLINK_FILE,
        },
        lab=lab_network,
    )
    return Configured(device, extra_key, config, lab_network)


# -- one reboot for every check about what a reboot keeps or applies ------------------------
Prepare = Callable[[DUT], Any]


@dataclass
class RebootRound:
    """The device after the one reboot that the checks marked ``reboot_round`` share.

    A check about what survives a reboot (or what a reboot applies) is marked
    ``@pytest.mark.reboot_round(prepare=f)``. Before the reboot, ``f(dut)`` makes the
    check's change and returns what the check needs afterwards; the check gets it back with
    ``before(prepare)``. A cold boot costs more than all those checks together, so they
    share one reboot; they run after every other check (see ``pytest_collection_modifyitems``),
    so their changes reach no other check. A prepare that fails fails its own check only.
    """

    dut: DUT
    prepared: dict[Prepare, Any] = field(default_factory=dict)

    def before(self, prepare: Prepare) -> Any:
        """What ``prepare`` returned before the reboot; raises what it raised."""
        if prepare not in self.prepared:
            raise LookupError(f"{prepare.__name__} is not a prepare of this run's reboot round: mark the check with it")
        outcome = self.prepared[prepare]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _round_prepares(items: list[pytest.Item]) -> list[Prepare]:
    prepares: list[Prepare] = []
    for item in items:
        marker = item.get_closest_marker("reboot_round")
        prepare = marker.kwargs.get("prepare") if marker is not None else None
        if prepare is not None and prepare not in prepares:
            prepares.append(prepare)
    return prepares


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "reboot_round(prepare=f): the check shares the session's one reboot; f(dut) runs before it",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The reboot round's checks run last: their changes (config.json edits, markers) stay theirs."""
    items.sort(key=lambda item: item.get_closest_marker("reboot_round") is not None)


@pytest.fixture(scope="session")
def reboot_round(request: pytest.FixtureRequest) -> RebootRound:
    """Run the prepares of this run's marked checks, reboot once, and hand over the device.

    The device is ``configured`` (its persistentLogging is what the journal check needs).
    Where no second device can be booted (one board), it is the session's device, restored
    to its first boot; checks that need ``configured``'s config then skip in their prepare.
    """
    try:
        dut = request.getfixturevalue("configured").dut
    except pytest.skip.Exception:
        dut = request.getfixturevalue("dut")
        dut.restore("ready")
    round_ = RebootRound(dut)
    for prepare in _round_prepares(request.session.items):
        try:
            round_.prepared[prepare] = prepare(dut)
        except (Exception, pytest.skip.Exception, pytest.fail.Exception) as exc:  # noqa: BLE001 - kept for its check
            round_.prepared[prepare] = exc
    dut.run("sync", check=True)
    dut.reboot()
    return round_
