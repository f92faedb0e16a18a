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
from testbed.errors import DutError, InfraError
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


FINGERPRINTS = ("/balenaos.fingerprint", "/resinos.fingerprint")


def assert_root_matches_fingerprint(dut: DUT, which: str) -> None:
    """Every file that the root's fingerprint lists (its md5 at build time, `md5sum` output) has
    that md5 on the running device: the root is the one the image (or update) was built with."""
    listed = " ".join(FINGERPRINTS)
    found = dut.run(f"for f in {listed}; do if [ -f $f ]; then echo $f; break; fi; done").stdout.strip()
    assert found, (
        f"{which} of {dut.name} has no fingerprint ({' or '.join(FINGERPRINTS)}): the image must list "
        "the md5 of every file of its root there at build time (`md5sum` output, one line per file)"
    )
    result = dut.run(f"md5sum --quiet -c {found}")
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    more = f"; and {len(lines) - 12} more lines" if len(lines) > 12 else ""
    assert result.exit_code == 0, (
        f"files of {which} of {dut.name} differ from {found} (`md5sum --quiet -c {found}` exit "
        f"{result.exit_code}): " + "; ".join(lines[:12]) + more
    )


@dataclass
class Configured:
    """A device whose config.json was set before its first boot, and the extra key it lists.

    Its second NIC is on the farm's lab network (``lab``), whose DNS and NTP servers its
    config.json names. The device boots while other checks run: ``dut`` waits for it the
    first time it is used.
    """

    device: DUT
    extra_key: paramiko.PKey
    config: dict[str, object]
    lab: LabNetwork
    on_ready: Callable[[DUT], None] = lambda device: None
    _ready: bool = False

    @property
    def dut(self) -> DUT:
        if not self._ready:
            self.device.finish_power_on()
            self._ready = True
            self.on_ready(self.device)
        return self.device


@pytest.fixture(scope="session")
def extra_key(tmp_path_factory: pytest.TempPathFactory) -> paramiko.PKey:
    path = Path(tmp_path_factory.mktemp("keys")) / "extra"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "extra", "-f", str(path)], check=True)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


@pytest.fixture(scope="session")
def configured(
    lab_network: LabNetwork, dut_factory: Callable[..., DUT], extra_key: paramiko.PKey, testbed_state
) -> Configured:
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
        wait=False,
    )

    def on_ready(device: DUT) -> None:
        if not testbed_state.facts:  # the report's device facts, when no session ``dut`` booted
            testbed_state.facts = device.facts()

    return Configured(device, extra_key, config, lab_network, on_ready)


# -- one reboot for every check about what a reboot keeps or applies ------------------------
Prepare = Callable[[DUT], Any]


@dataclass
class RebootRound:
    """The device after the one reboot that the checks marked ``reboot_round`` share.

    A check about what survives a reboot (or what a reboot applies) is marked
    ``@pytest.mark.reboot_round(prepare=f)``. Before the reboot, ``f(dut)`` makes the
    check's change and returns what the check needs afterwards; the check gets it back with
    ``before(prepare)``. A cold boot costs more than all those checks together, so they
    share one reboot; they run after every other check (``testbed.schedule``),
    so their changes reach no other check. A prepare that fails fails its own check only.
    """

    device: DUT
    prepared: dict[Prepare, Any] = field(default_factory=dict)
    boot_id_before: str = ""
    _outcome: BaseException | None = None
    _ready: bool = False

    @property
    def dut(self) -> DUT:
        """The device on its new boot: waits for the reboot the first time."""
        if not self._ready and self._outcome is None:
            try:
                self.device.finish_power_on()
                after = self.device.boot_id()
                if after == self.boot_id_before:
                    raise DutError(f"{self.device.name} did not reboot: boot_id is still {after}")
                self._ready = True
            except (DutError, InfraError) as exc:  # each check of the round fails with it; no second wait
                self._outcome = exc
        if self._outcome is not None:
            raise self._outcome
        return self.device

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
    round_.boot_id_before = dut.boot_id()
    dut.start_reboot()  # the round's checks wait for the new boot (``RebootRound.dut``)
    return round_
