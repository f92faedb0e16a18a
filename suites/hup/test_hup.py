"""Host OS updates (A/B): the new root runs and keeps the data; a new root that fails its health
check or does not boot rolls back to the old one; power cuts during an update or the first boot
of the new root never leave a device that boots neither."""

from __future__ import annotations

import random
import time

import pytest

from suites.hup.conftest import CANARY, STATE, TRIGGERED, Hup
from testbed.errors import DutError


def test_update_runs_the_new_root_and_keeps_data(updated: Hup) -> None:
    # The canary file on resin-data was written before the update (see ``updated``).
    d = updated.fresh("hup-updated")
    new_version = updated.new_version
    boot = d.reboot()
    updated.first_boot_s = boot.ssh_ready_s or 0.0
    root = d.running_root()
    assert root == updated.other_root(updated.old_root), (
        f"after the update and a reboot {d.name} runs {root}, expected the updated {updated.other_root(updated.old_root)}"
    )
    version = updated.version()
    assert version == new_version != updated.old_version, (
        f"VERSION_ID after the update is {version}; the bundle holds {new_version}, the old root {updated.old_version}"
    )
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


def test_power_cuts_never_brick_the_device(
    updated: Hup, trial_rng: tuple[random.Random, int], pytestconfig: pytest.Config
) -> None:
    trials = pytestconfig.getoption("--hup-power-cuts")
    if trials < 1:
        pytest.skip(f"--hup-power-cuts {trials}: no power-cut trials asked for")
    rng, seed = trial_rng
    d = updated.dut
    first_boot = updated.first_boot_s or d.profile.timeouts.boot_to_ssh / 4
    ended: dict[str, int] = {}
    for trial in range(1, trials + 1):
        phase = "during hostapp-update" if trial % 2 else "during the first boot of the new root"
        if trial % 2:
            d = updated.fresh("hup-ready")
            d.run(f"systemd-run --quiet --unit=hup-trial-{trial} hostapp-update -f {updated.bundle_device}", check=True)
            window = updated.update_s
        else:
            d = updated.fresh("hup-updated")
            d.start_reboot()
            window = first_boot
        cut_after = rng.uniform(0, window)
        # The random moment of the fault is the experiment itself, not a wait for some state.
        time.sleep(cut_after)
        d.power.cut()
        try:
            d.power.on(timeout=d.profile.timeouts.rollback, max_boots=3, tolerate_panics=True)
        except DutError as exc:
            raise DutError(
                f"power-cut trial {trial}/{trials} (seed {seed}): cut {cut_after:.1f}s {phase}, "
                f"the device boots neither root: {exc}"
            ) from None
        root = d.running_root()
        version = updated.version()
        expected = updated.old_version if root == updated.old_root else updated.new_version
        assert version == expected, f"trial {trial}: {root} runs version {version}, expected {expected}"
        ended[root] = ended.get(root, 0) + 1
        d.record_note(
            f"power-cut trial {trial}/{trials}: cut {cut_after:.1f}s {phase}",
            f"came back on {root} (version {version})",
        )
    d.record_note(
        f"power-cut trials: {trials} (seed {seed})",
        ", ".join(f"{count} ended on {root}" for root, count in sorted(ended.items())),
    )
    assert sum(ended.values()) == trials
