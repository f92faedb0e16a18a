"""Read-only root: / is ro, writes fail with EROFS, state is bind-mounted from resin-state and
survives a reboot, volatile paths are in RAM, and nothing mounts the root device writable. The
root's files match its fingerprint, and a boot checks every ext4 filesystem that is due."""

from __future__ import annotations

import secrets
import shlex

import pytest

from suites.conftest import RebootRound, assert_root_matches_fingerprint
from testbed.dut import DUT
from testbed.profile import Profile


def _state_device(dut: DUT, profile: Profile) -> str:
    label = profile.layout.partitions[3].label
    return dut.run(f"readlink -f /dev/disk/by-label/{label}").stdout.strip()


def test_root_is_mounted_read_only(dut: DUT) -> None:
    options = dut.run("findmnt -n -o OPTIONS /", check=True).stdout.strip()
    assert "ro" in options.split(","), f"expected / mounted read-only, `findmnt -n -o OPTIONS /` says {options}"


def test_writes_to_root_fail_with_erofs(dut: DUT) -> None:
    probe = "/.testbed-write-probe"
    result = dut.run(f"touch {probe}")
    if result.exit_code == 0:
        dut.run(f"rm -f {probe}")
    assert result.exit_code != 0, f"expected `touch {probe}` to fail on a read-only root, it succeeded"
    assert "Read-only file system" in result.stderr, (
        f"expected EROFS from `touch {probe}`, got: {result.stderr.strip()}"
    )


def test_persistent_paths_are_bind_mounts_from_resin_state(dut: DUT, device_profile: Profile) -> None:
    state = _state_device(dut, device_profile)
    paths = device_profile.rootfs.persistent
    script = "; ".join(
        f"printf '%s %s\\n' {shlex.quote(p)} \"$(findmnt -c -n -r -o SOURCE --mountpoint {shlex.quote(p)} || echo NONE)\""
        for p in paths
    )
    lines = dict(line.split(" ", 1) for line in dut.run(script, check=True).stdout.splitlines())
    wrong = {p: src for p, src in lines.items() if src.split("[", 1)[0] != state}
    assert not wrong, f"expected each of {paths} bind-mounted from resin-state ({state}); not so: " + ", ".join(
        f"{p} <- {src}" for p, src in wrong.items()
    )


def _change_persistent_paths(dut: DUT) -> str:
    """A marker file in each persistent directory; the ext4 "no dump" flag on each persistent file.

    The flag belongs to the file itself, so it stays when the OS rewrites the file's contents
    at boot (config-json writes /etc/hostname when config.json's hostname changed, as in the
    same reboot round); a file recreated at boot, or one in RAM, does not have it.
    """
    token = secrets.token_hex(4)
    for path in dut.profile.rootfs.persistent:
        q = shlex.quote(path)
        dut.run(f"if [ -d {q} ]; then echo {token} > {q}/.testbed-persist-{token}; else chattr +d {q}; fi", check=True)
    return token


@pytest.mark.reboot_round(prepare=_change_persistent_paths)
def test_persistent_paths_survive_a_reboot(reboot_round: RebootRound) -> None:
    """Mark every persistent path (a file in a directory, a flag on a file), reboot, find the marks."""
    token = reboot_round.before(_change_persistent_paths)
    dut = reboot_round.dut
    lost = []
    for path in dut.profile.rootfs.persistent:
        q = shlex.quote(path)
        found = dut.run(
            f"if [ -d {q} ]; then cat {q}/.testbed-persist-{token}; else lsattr -d {q} | cut -d' ' -f1; fi"
        ).stdout.strip()
        if found != token and "d" not in found:
            lost.append(f"{path} ({found or 'nothing'})")
    assert not lost, (
        f"the marks on {lost} did not survive a reboot (a file .testbed-persist-{token} in each directory, "
        "`chattr +d` on each file; found with cat and `lsattr -d`)"
    )


def _ext4_devices(dut: DUT) -> dict[str, str]:
    """label -> /dev/disk/by-label path of every ext4 partition of the profile's layout."""
    return {p.label: f"/dev/disk/by-label/{p.label}" for p in dut.profile.layout.partitions if p.fstype == "ext4"}


def _superblock(dut: DUT, device: str) -> dict[str, str]:
    out = dut.run(f"dumpe2fs -h {shlex.quote(device)}", check=True).stdout
    fields = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


def _force_fsck(dut: DUT) -> dict[str, str]:
    """Make the next boot check every ext4 filesystem in full; returns each one's last check time.

    The mount count goes above the maximum (`tune2fs -C 2 -c 1`), which the kernel keeps on
    disk. (The error flag that `tune2fs -E force_fsck` sets does not do for a filesystem
    mounted writable: the kernel writes its own state over it when it unmounts cleanly.)
    """
    last = {}
    for label, device in _ext4_devices(dut).items():
        last[label] = _superblock(dut, device).get("Last checked", "")
        dut.run(f"tune2fs -C 2 -c 1 {shlex.quote(device)}", check=True)
    return last


@pytest.mark.mode_independent
@pytest.mark.reboot_round(prepare=_force_fsck)
def test_filesystems_checked_at_boot_come_back_clean(reboot_round: RebootRound) -> None:
    """Every ext4 filesystem (both roots, state, data) marked for a check is checked by the
    next boot, before it is mounted, and comes back clean."""
    last = reboot_round.before(_force_fsck)
    dut = reboot_round.dut
    devices = _ext4_devices(dut)
    wrong = []
    try:
        for label, before in last.items():
            block = _superblock(dut, devices[label])
            if block.get("Last checked", "") == before:
                wrong.append(f"{label} was not checked at boot (last checked {before or 'never'})")
            elif block.get("Filesystem state") != "clean":
                wrong.append(f"{label} is not clean after its check: {block.get('Filesystem state')}")
    finally:
        for device in devices.values():  # no check at every boot from now on
            dut.run(f"tune2fs -c -1 {shlex.quote(device)}")
    assert not wrong, (
        "after `tune2fs -C 2 -c 1` (a check due) on each ext4 filesystem and a reboot, `dumpe2fs -h` "
        "shows: " + "; ".join(wrong)
    )


def test_volatile_paths_are_in_ram(dut: DUT, device_profile: Profile) -> None:
    paths = device_profile.rootfs.volatile
    script = "; ".join(
        f"printf '%s %s\\n' {shlex.quote(p)} \"$(findmnt -n -o FSTYPE --mountpoint {shlex.quote(p)} || echo none)\""
        for p in paths
    )
    types = dict(line.split(" ", 1) for line in dut.run(script, check=True).stdout.splitlines())
    wrong = {p: t for p, t in types.items() if t != "tmpfs"}
    assert not wrong, f"expected tmpfs on {paths}; found " + ", ".join(f"{p}: {t}" for p, t in wrong.items())


def test_no_writable_mount_of_the_root_device(dut: DUT) -> None:
    root = dut.run("findmnt -c -n -o SOURCE /", check=True).stdout.strip().split("[", 1)[0]
    mounts = dut.run("findmnt -c -r -n -o TARGET,SOURCE,OPTIONS", check=True).stdout.splitlines()
    writable = []
    for line in mounts:
        target, source, options = line.split(" ", 2)
        if source.split("[", 1)[0] == root and "rw" in options.split(","):
            writable.append(f"{target} ({options})")
    assert not writable, f"the root device {root} is mounted writable at: {', '.join(writable)}"


@pytest.mark.mode_independent
def test_root_files_match_the_fingerprint(dut: DUT) -> None:
    """The root's files are the ones the image was built with."""
    assert_root_matches_fingerprint(dut, "the root")


def _identity(dut: DUT) -> dict[str, str]:
    """What makes the device the same device: the SSH host key it presents and its machine-id."""
    return {"SSH host key": dut.host_key(), "/etc/machine-id": dut.read_file("/etc/machine-id").strip()}


def _assert_same_identity(before: dict[str, str], after: dict[str, str], event: str) -> None:
    changed = [f"{what} {before[what] or '(empty)'} became {after[what] or '(empty)'}" for what in before
               if after[what] != before[what] or not after[what]]  # fmt: skip
    assert not changed, (
        f"the device must be the same device after {event} (state on resin-state, not made anew at boot): "
        + "; ".join(changed)
    )


@pytest.mark.reboot_round(prepare=_identity)
def test_identity_survives_a_reboot(reboot_round: RebootRound) -> None:
    """The SSH host key and /etc/machine-id are kept, not just their bind mounts."""
    before = reboot_round.before(_identity)
    _assert_same_identity(before, _identity(reboot_round.dut), "a reboot")


def test_identity_survives_a_power_cut(fresh_dut: DUT) -> None:
    """Power cut right after the first boot reached SSH: what the first boot created (the host
    key, the machine-id) must already be on disk."""
    dut = fresh_dut
    before = _identity(dut)
    try:
        dut.power_cycle()
        _assert_same_identity(before, _identity(dut), "a power cut")
    finally:
        if dut.snapshots is not None:  # the other checks get the device of the first boot back
            dut.restore("ready")
