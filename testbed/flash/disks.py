"""Which block device a path is, and whether writing a whole image to it is safe.

Everything is decided by device number (major:minor) through ``/sys/dev/block`` and
``/proc/self/mountinfo``, never by device name, so ``/dev/disk/by-id/...`` symlinks,
``/dev/mmcblk0`` and a node made with mknod are judged alike. Refused, each with a
ConfigError naming the device and the fix:

* a path that is not a block device (a regular file only with ``allow_file``);
* a partition (an OS image is written to the whole disk);
* one of the host's own disks: a disk under ``/``, ``/boot``, ``/boot/efi``,
  ``/boot/firmware``, ``/efi`` or an active swap area, followed through
  device-mapper and md (``slaves/``) down to the whole disks;
* a device that is mounted, or one of its partitions, or anything stacked on them
  (``holders/``: LVM, dm-crypt, md), or used as swap;
* a write-protected device, or one with no medium (size 0).

The mount table seen is this process's mount namespace; the writer also opens the
device with O_EXCL, which the kernel refuses for a device mounted in any namespace.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ConfigError

SYS_BLOCK = Path("/sys/dev/block")
MOUNTINFO = Path("/proc/self/mountinfo")
SWAPS = Path("/proc/swaps")
HOST_MOUNTPOINTS = ("/", "/boot", "/boot/efi", "/boot/firmware", "/efi")

DevNo = tuple[int, int]


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: the device number, the mount source and where it is mounted."""

    devno: DevNo
    source: str
    mountpoint: str


@dataclass(frozen=True)
class Target:
    """A checked write target.

    ``kind`` is "block" or "file". ``size`` is the device size in bytes, or for a file
    its current size (None when it does not exist yet or is empty: it will be sized to
    the image). ``discard`` tells whether the block device supports BLKDISCARD.
    """

    path: Path
    kind: str
    size: int | None
    name: str
    discard: bool = False


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts in a ``/proc/<pid>/mountinfo`` text."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        source = _unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""
        mounts.append(Mount((int(major), int(minor)), source, _unescape(fields[4])))
    return mounts


def read_mounts() -> list[Mount]:
    return parse_mountinfo(MOUNTINFO.read_text())


def swap_devnos() -> dict[DevNo, str]:
    """Device numbers holding active swap: the partition itself, or the filesystem of a swap file."""
    found: dict[DevNo, str] = {}
    try:
        lines = SWAPS.read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        if not line.split():
            continue
        name = _unescape(line.split()[0])
        try:
            st = os.stat(name)
        except OSError:
            continue
        dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
        found[(os.major(dev), os.minor(dev))] = name
    return found


def sysfs_dir(devno: DevNo) -> Path | None:
    """The device's directory under /sys/devices, or None when it is no block device."""
    link = SYS_BLOCK / f"{devno[0]}:{devno[1]}"
    return link.resolve() if link.exists() else None


def devno_of(sysdir: Path) -> DevNo:
    major, minor = (sysdir / "dev").read_text().strip().split(":")
    return int(major), int(minor)


def is_partition(sysdir: Path) -> bool:
    return (sysdir / "partition").exists()


def whole_disk(sysdir: Path) -> Path:
    """The disk a partition belongs to (a disk is its own whole disk)."""
    return sysdir.parent if is_partition(sysdir) else sysdir


def partitions(disk: Path) -> list[Path]:
    return sorted(p for p in disk.iterdir() if p.is_dir() and (p / "partition").exists())


def _links(sysdir: Path, kind: str) -> list[Path]:
    folder = sysdir / kind
    if not folder.is_dir():
        return []
    return sorted(p.resolve() for p in folder.iterdir())


def stacked_on(sysdir: Path) -> set[Path]:
    """``sysdir``, its partitions, and every device built on them (dm, md), recursively."""
    seen: set[Path] = set()
    todo = [sysdir, *partitions(sysdir)]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(_links(current, "holders"))
    return seen


def underlying_disks(sysdir: Path) -> set[Path]:
    """The whole disks a block device lives on, through device-mapper and md slaves."""
    disks: set[Path] = set()
    todo, seen = [sysdir], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        slaves = _links(current, "slaves")
        if slaves:
            todo.extend(slaves)
        else:
            disks.add(whole_disk(current))
    return disks


def _mount_devnos(mount: Mount) -> set[DevNo]:
    # btrfs and some others show an anonymous 0:N device; the source names the real one.
    devnos = {mount.devno}
    if mount.source.startswith("/dev/"):
        try:
            st = os.stat(mount.source)
        except OSError:
            return devnos
        if stat.S_ISBLK(st.st_mode):
            devnos.add((os.major(st.st_rdev), os.minor(st.st_rdev)))
    return devnos


def host_disks(mounts: list[Mount] | None = None) -> dict[Path, str]:
    """The host's own whole disks (sysfs dirs), each with why: "holds /", "holds swap /dev/sda3"."""
    mounts = read_mounts() if mounts is None else mounts
    reasons: dict[Path, list[str]] = {}
    sources: list[tuple[DevNo, str]] = []
    for mount in mounts:
        if mount.mountpoint in HOST_MOUNTPOINTS:
            sources.extend((devno, f"holds {mount.mountpoint}") for devno in _mount_devnos(mount))
    sources.extend((devno, f"holds swap {name}") for devno, name in swap_devnos().items())
    for devno, why in sources:
        sysdir = sysfs_dir(devno)
        if sysdir is None:
            continue
        for disk in underlying_disks(sysdir):
            if why not in reasons.setdefault(disk, []):
                reasons[disk].append(why)
    return {disk: ", ".join(why) for disk, why in reasons.items()}


def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def check_target(path: Path, *, allow_file: bool = False) -> Target:
    """Decide whether ``path`` may receive a whole image; ConfigError says why not.

    Reads only: nothing is opened for writing here. Long on purpose: an ordered list of
    refusals, each with its own message and fix, the cheapest and most certain first.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if allow_file and path.parent.is_dir():
            return Target(path, "file", None, path.name)
        raise ConfigError(
            f"flash target {path} does not exist: plug in the card reader or USB-SD-Mux and check the path "
            "(ls -l /dev/disk/by-id/)"
        ) from None
    if stat.S_ISREG(st.st_mode):
        if allow_file:
            return Target(path, "file", st.st_size or None, path.name)
        raise ConfigError(
            f"flash target {path} is a regular file, not a block device: point the flash device at the card's "
            "block device (e.g. /dev/disk/by-id/usb-...), or set allow_file: true to write into an image file"
        )
    if not stat.S_ISBLK(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a character device"
            if stat.S_ISCHR(st.st_mode)
            else "not a block device"
        )
        raise ConfigError(
            f"flash target {path} is {kind}, not a block device: point the flash device at the card's "
            "block device (e.g. /dev/disk/by-id/usb-...)"
        )
    devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
    sysdir = sysfs_dir(devno)
    if sysdir is None:
        raise ConfigError(
            f"flash target {path} ({devno[0]}:{devno[1]}) is not known to the kernel (no /sys entry); "
            "re-plug the card reader and check the path"
        )
    name = sysdir.name
    shown = f"{path} ({name})" if path.name != name else str(path)
    if is_partition(sysdir):
        parent = whole_disk(sysdir).name
        raise ConfigError(
            f"flash target {shown} is a partition of {parent}: an OS image goes to the whole disk, use /dev/{parent}"
        )
    own = host_disks()
    for disk in underlying_disks(sysdir):
        if disk in own:
            raise ConfigError(
                f"flash target {shown} is one of this host's own disks ({disk.name} {own[disk]}): refusing to "
                "overwrite it; point the flash device at the card reader (ls -l /dev/disk/by-id/)"
            )
    stack = stacked_on(sysdir)
    by_devno = {devno_of(p): p for p in stack}
    for mount in read_mounts():
        for hit in _mount_devnos(mount) & by_devno.keys():
            what = by_devno[hit].name
            raise ConfigError(
                f"flash target {shown} is in use: {what} is mounted at {mount.mountpoint}; "
                f"unmount it first (umount {mount.mountpoint})"
            )
    for hit, swap in swap_devnos().items():
        if hit in by_devno:
            raise ConfigError(f"flash target {shown} is in use as swap ({swap}); run swapoff {swap} first")
    holders = sorted(p.name for p in stack if p != sysdir and not is_partition(p))
    if holders:
        raise ConfigError(
            f"flash target {shown} is in use by {', '.join(holders)} (device-mapper, LVM, dm-crypt or md): "
            "release it first (vgchange -an, cryptsetup close, mdadm --stop)"
        )
    if _read_int(sysdir / "ro"):
        raise ConfigError(f"flash target {shown} is write-protected: slide the SD card's lock switch to unlocked")
    size = _read_int(sysdir / "size") * 512
    if size == 0:
        raise ConfigError(f"flash target {shown} has no medium (size 0): insert the card")
    discard = _read_int(sysdir / "queue" / "discard_max_bytes") > 0
    return Target(path, "block", size, name, discard)
