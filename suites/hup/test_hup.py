"""Host OS updates (A/B): the new root runs and keeps the data; a new root that fails its health
check or does not boot rolls back to the old one; power cuts during an update or the first boot
of the new root never leave a device that boots neither."""

from __future__ import annotations

import pytest

from suites.conftest import assert_root_matches_fingerprint
from suites.hup.conftest import CANARY, STATE, TRIGGERED, Hup, PowerCutTrials

# The same in every mode: a certification runs these once (testbed.plan) and its other modes inherit them.
pytestmark = pytest.mark.mode_independent


def test_update_runs_the_new_root_and_keeps_data(updated: Hup) -> None:
    # The canary file on resin-data was written before the update (see ``updated``).
    d = updated.fresh("hup-updated")
    new_version = updated.new_version
    d.reboot()
    root = d.running_root()
    assert root == updated.other_root(updated.old_root), (
        f"after the update and a reboot {d.name} runs {root}, expected the updated {updated.other_root(updated.old_root)}"
    )
    version = updated.version()
    assert version == new_version != updated.old_version, (
        f"VERSION_ID after the update is {version}; the bundle holds {new_version}, the old root {updated.old_version}"
    )
    # The update wrote the new root intact: its files are the bundle's, as its fingerprint lists them.
    assert_root_matches_fingerprint(d, f"the updated root {root}")
    check = d.run(f"sha256sum -c {CANARY}.sha256")
    assert check.ok, f"{CANARY} on resin-data changed across the update: {check.stdout}{check.stderr}"
    updated.wait_committed()
    left = updated.state_files() & set(TRIGGERED)
    assert not left, f"a good update left rollback records in {STATE}: {sorted(left)}"


def test_rollback_when_the_new_root_is_unhealthy(updated: Hup) -> None:
    d = updated.fresh("hup-updated")
    # sshd of the new root cannot run: its health check must fail and send the device back.
    updated.break_inactive("ln -sf /dev/null /mnt/sysroot/inactive/usr/sbin/sshd")
    d.reboot(timeout=d.profile.timeouts.rollback, max_boots=2)
    files = assert_rolled_back(updated, "a failed health check", "rollback-health-triggered")
    assert "rollback-altboot-triggered" not in files, (
        f"a health rollback also left {STATE}/rollback-altboot-triggered: {sorted(files)}"
    )


def assert_rolled_back(updated: Hup, after: str, record: str) -> set[str]:
    """The device runs its old root and version again, and left ``record``; return the records."""
    d = updated.dut
    root = d.running_root()
    assert root == updated.old_root, f"{d.name} runs {root} after {after}, expected {updated.old_root}"
    assert updated.version() == updated.old_version
    files = updated.state_files()
    assert record in files, f"the device went back to {root} but {STATE}/{record} is missing: {sorted(files)}"
    return files


def roll_back_from_a_root_without_init(updated: Hup) -> None:
    d = updated.fresh("hup-updated")
    # The new root has no init: its boot fails, GRUB's boot counting must fall back.
    updated.break_inactive("rm -f /mnt/sysroot/inactive/sbin/init")
    d.reboot(timeout=d.profile.timeouts.rollback, max_boots=2, tolerate_panics=True)


def test_rollback_when_the_new_root_does_not_boot(updated: Hup) -> None:
    roll_back_from_a_root_without_init(updated)
    assert_rolled_back(updated, "a failed boot", "rollback-altboot-triggered")
    # The next test goes on from here, rather than from a snapshot of this state (saving one
    # costs seconds for a single user).
    updated.rolled_back = True


def test_update_after_a_rollback(updated: Hup) -> None:
    if not updated.rolled_back:
        roll_back_from_a_root_without_init(updated)
    updated.rolled_back = False
    d = updated.dut
    assert d.running_root() == updated.old_root, "the rollback before this update did not end on the old root"
    version = updated.update()
    d.reboot()
    root = d.running_root()
    assert root == updated.other_root(updated.old_root), f"the update after a rollback runs {root}"
    assert updated.version() == version
    updated.wait_committed()
    left = updated.state_files() & set(TRIGGERED)
    assert not left, f"the update after a rollback left old rollback records: {sorted(left)}"


def test_power_cuts_never_brick_the_device(power_cuts: PowerCutTrials, updated: Hup) -> None:
    if power_cuts.trials < 1:
        pytest.skip(f"--hup-power-cuts {power_cuts.trials}: no power-cut trials asked for")
    # On QEMU the trials ran on a twin device while the tests above ran (see PowerCutTrials).
    ended = power_cuts.finish()
    assert sum(ended.values()) == power_cuts.trials, f"trials that ended on a root: {ended}"
