"""Logging: an 8 MB journal in RAM by default; with persistentLogging, up to 32 MB on resin-data,
kept across reboots (checked in the session's shared reboot, see ``RebootRound``)."""

from __future__ import annotations

import re

import pytest

from suites.conftest import Configured, RebootRound
from testbed.dut import DUT
from testbed.profile import Profile


def _journal_limit(dut: DUT, kind: str) -> tuple[float | None, str]:
    """journald's own statement of its limit: "<kind> Journal (...) is 1.2M, max 8.0M, ..."."""
    out = dut.run(f"journalctl -b -o cat -u systemd-journald --no-pager | grep '{kind} Journal' | tail -n 1").stdout
    found = re.search(r"max ([0-9.]+)([KMG])", out)
    if not found:
        return None, out.strip()
    scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}[found.group(2)]
    return float(found.group(1)) * scale, out.strip()


def _source_device(dut: DUT, path: str) -> str:
    return dut.run(f"findmnt -c -n -o SOURCE --mountpoint {path}").stdout.strip().split("[", 1)[0]


def test_journal_is_in_ram_by_default(dut: DUT, device_profile: Profile) -> None:
    if dut.config.get("persistentLogging") in (True, "true"):
        pytest.fail("this device's config.json enables persistentLogging; the default cannot be checked on it")
    limit, said = _journal_limit(dut, "Runtime")
    assert limit is not None, f"journald did not report a runtime (RAM) journal: {said!r}"
    assert limit <= device_profile.logging.volatile_max_mib, (
        f"expected a RAM journal of at most {device_profile.logging.volatile_max_mib} MB; journald: {said}"
    )
    on_disk = _source_device(dut, "/var/log/journal")
    assert not on_disk, f"without persistentLogging the journal must not be on disk; /var/log/journal <- {on_disk}"


def test_persistent_journal_is_on_resin_data_within_limit(configured: Configured, device_profile: Profile) -> None:
    dut = configured.dut
    data = dut.run(f"readlink -f /dev/disk/by-label/{device_profile.layout.partitions[4].label}").stdout.strip()
    source = _source_device(dut, "/var/log/journal")
    assert source == data, (
        f"with persistentLogging, /var/log/journal must come from resin-data ({data}); found {source!r}"
    )
    limit, said = _journal_limit(dut, "System")
    assert limit is not None, f"journald did not report a system (disk) journal: {said!r}"
    assert limit <= device_profile.logging.persistent_max_mib, (
        f"expected a disk journal of at most {device_profile.logging.persistent_max_mib} MB; journald: {said}"
    )


def _log_a_marker(dut: DUT) -> str:
    if dut.config.get("persistentLogging") not in (True, "true"):
        pytest.skip(f"{dut.name}'s config.json does not enable persistentLogging (no second device to boot with it)")
    marker = "testbed-journal-marker-" + dut.boot_id()[:8]
    dut.run(f"logger {marker} && journalctl --sync", check=True)
    return marker


@pytest.mark.reboot_round(prepare=_log_a_marker)
def test_persistent_journal_survives_a_reboot(reboot_round: RebootRound) -> None:
    marker = reboot_round.before(_log_a_marker)
    dut = reboot_round.dut
    boots = dut.run("journalctl --list-boots --no-pager | wc -l").stdout.strip()
    found = dut.run(f"journalctl --no-pager -o cat -g {marker} | head -n 1").stdout.strip()
    assert int(boots or 0) >= 2 and marker in found, (
        f"with persistentLogging the journal must keep earlier boots: `journalctl --list-boots` lists {boots}, "
        f"the marker logged before the reboot was {'found' if found else 'not found'}"
    )
