"""``python -m testbed inspect IMAGE``: what an OS image holds, read offline (no boot) in about a second.

:func:`inspect_image` reads, without writing anything and without root, loop devices or mounts:

* the partition table (GPT or MBR; an MBR extended partition is listed as the container it is)
  and each partition's number, label, filesystem and size against the device profile's bounds;
* ``/config.json`` of the boot partition, secrets shortened (:func:`redact_config`);
* each root's os-release, kernels (``/boot`` and ``/lib/modules``) and fingerprint file;
* the bootloader's environment on the boot partition (GRUB's ``grubenv``, U-Boot's ``uboot.env``
  and ``resinOS_uEnv.txt``): which root is active, the upgrade and boot-count variables; the EFI
  loader's architecture;
* the problems found, each with its fix (:class:`Problem`).

Speed: a raw image's filesystems are read in place (``debugfs -c`` on ``IMAGE?offset=N``,
``mtools -i IMAGE@@N``), one ``debugfs`` request file per root, so nothing is copied. A qcow2
whose partition is served unchanged by a raw backing file (an overlay that edited another
partition) is read from that file in place too; otherwise the partition is copied once into a
sparse file in a private temporary directory, removed also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from testbed import image as img
from testbed import unpack
from testbed.errors import ConfigError, InfraError
from testbed.profile import PartitionSpec, Profile, load_profile
from testbed.report import EXIT_FAILED, EXIT_INFRA, EXIT_PASSED, EXIT_USAGE
from testbed.util import private_dir

__all__ = ["Inspection", "Problem", "inspect_image", "redact_config", "render_text", "main"]

MIB = 1 << 20
DEFAULT_DEVICE = "qemu-x86_64"
_TOOL_TIMEOUT = 120
_SBIN = ("/usr/sbin", "/sbin")
_TOOL_PACKAGES = {"debugfs": "e2fsprogs", "mdir": "mtools", "mcopy": "mtools", "qemu-img": "qemu-utils"}

_EFI_LOADER = re.compile(r"(?i)^EFI/BOOT/BOOT(X64|AA64|IA32|ARM|RISCV64|LOONGARCH64)\.EFI$")
_EFI_ARCH = {
    "X64": "x86_64",
    "AA64": "aarch64",
    "IA32": "i386",
    "ARM": "arm",
    "RISCV64": "riscv64",
    "LOONGARCH64": "loongarch64",
}
_PE_MACHINES = {
    0x8664: "x86_64",
    0xAA64: "aarch64",
    0x14C: "i386",
    0x1C0: "arm",
    0x1C2: "arm",
    0x1C4: "arm",
    0x5064: "riscv64",
    0x6264: "loongarch64",
}
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 3: "i386", 40: "arm", 243: "riscv64"}
# Kernel files in a root's /boot: Debian's vmlinuz-VERSION, and the Image/zImage/bzImage of other builds.
_KERNEL_NAME = re.compile(r"^(vmlinuz|vmlinux|Image|bzImage|zImage|uImage|fitImage)(?:[-.](?P<version>.+))?$")
_OS_RELEASE_SHOWN = ("NAME", "VERSION_ID", "PRETTY_NAME", "SLUG", "MACHINE")
_FINGERPRINTS = ("/balenaos.fingerprint", "/resinos.fingerprint")
# config.json keys whose values are secrets: apiKey, deviceApiKey, provisioningApiKey, *token*, *password*.
_SECRET_KEY = re.compile(r"(?i)api_?key|token|passw(or)?d|secret")


# --------------------------------------------------------------------------
# What an inspection finds


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the image (``what``) and how to fix it (``fix``)."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what} — fix: {self.fix}"


@dataclass(frozen=True)
class PartitionRow:
    """One entry of the partition table.

    ``kind`` is "partition", or "extended" for an MBR extended partition: the container of the
    logical partitions (5, 6, ...), with no filesystem of its own, skipped in the label order.
    ``expected`` is the profile's spec for the label ("vfat, 32..256 MiB"; "" when the profile has
    no such label, or for a container) and ``issues`` what does not hold against it.
    """

    number: int
    kind: str
    label: str
    name: str
    fstype: str
    start: int
    size: int
    type: str
    expected: str = ""
    issues: tuple[str, ...] = ()


@dataclass(frozen=True)
class BootEnv:
    """One bootloader environment file: ``kind`` "grub" or "u-boot", its path and variables."""

    kind: str
    path: str
    variables: dict[str, str]
    note: str = ""


@dataclass(frozen=True)
class BootInfo:
    """The boot partition: bootloader environments, the active root, the EFI loader.

    ``active_root`` is a root's label ("" if none); ``active_from`` says how it was chosen.
    ``efi_arch`` is the architecture the loader's name says, ``efi_machine`` its PE header's.
    """

    partition: str = ""
    envs: tuple[BootEnv, ...] = ()
    active_root: str = ""
    active_from: str = ""
    efi_loader: str = ""
    efi_arch: str = ""
    efi_machine: str = ""
    error: str = ""


@dataclass(frozen=True)
class ConfigInfo:
    """``/config.json`` on the boot partition: ``state`` "ok", "missing" or "invalid".

    ``data`` is the parsed object with its secrets shortened (:func:`redact_config`), or None;
    ``error`` the reader's message when it is missing or invalid.
    """

    state: str
    data: dict[str, Any] | None = None
    error: str = ""


@dataclass(frozen=True)
class RootInfo:
    """One root filesystem (a profile partition whose label contains "root").

    ``state``: "ok"; "empty" (only lost+found, as an unused B root until an update); "missing"
    (no partition with that label); "unreadable" (not an ext filesystem debugfs can open, see
    ``error``). ``kernels`` are the kernel file names in /boot, ``kernel_link`` the target of
    /boot/vmlinuz, ``modules`` the directory names in /lib/modules, ``kernel_arch`` what the
    kernel file's header says ("" if it cannot tell). ``fingerprint`` is the fingerprint file's
    path ("" if none) and ``fingerprint_files`` how many files it lists.
    """

    label: str
    number: int | None = None
    state: str = "missing"
    error: str = ""
    os_release: dict[str, str] = field(default_factory=dict)
    os_release_path: str = ""
    kernels: tuple[str, ...] = ()
    kernel_link: str = ""
    modules: tuple[str, ...] = ()
    kernel_arch: str = ""
    fingerprint: str = ""
    fingerprint_files: int = 0

    def versions(self) -> list[str]:
        """Kernel versions found, in order: from /boot's file names and link, then /lib/modules."""
        found: list[str] = []
        for name in (self.kernel_link, *self.kernels):
            m = _KERNEL_NAME.match(name)
            if m and m.group("version"):
                found.append(m.group("version"))
        found += self.modules
        return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Inspection:
    """Everything :func:`inspect_image` found in one image, and the problems with their fixes."""

    image: str
    read_from: str
    format: str
    device: str
    profile_source: str
    arch: str
    table: str
    expected_table: str
    disk_size: int
    partitions: tuple[PartitionRow, ...]
    boot: BootInfo
    config: ConfigInfo
    roots: tuple[RootInfo, ...]
    problems: tuple[Problem, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Every fact as plain JSON-able data (what ``--json`` prints)."""
        data = asdict(self)
        data["problems"] = [{"what": p.what, "fix": p.fix} for p in self.problems]
        for root, info in zip(data["roots"], self.roots, strict=True):
            root["kernel_versions"] = info.versions()
        return data

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def facts(self) -> dict[str, Any]:
        """A compact dict for a report's device facts.

        ``partition_table`` and ``partitions`` (number, label, fstype, size in bytes, kind) have
        the shape the report's partition table shows; ``os_release`` (per root: the shown keys, or
        "empty"/"missing"/"unreadable"), ``kernels`` (per root), ``active_root``, ``fingerprint``
        (per root: files listed, or None) and ``problems`` (one "what — fix: how" line each).
        """
        os_release: dict[str, Any] = {}
        for r in self.roots:
            shown = {k: r.os_release[k] for k in _OS_RELEASE_SHOWN if k in r.os_release}
            os_release[r.label] = shown if r.state == "ok" else r.state
        return {
            "partition_table": self.table,
            "partitions": [
                {"number": p.number, "label": p.label, "fstype": p.fstype, "size": p.size, "kind": p.kind}
                for p in self.partitions
            ],
            "os_release": os_release,
            "kernels": {r.label: r.versions() for r in self.roots},
            "active_root": self.boot.active_root,
            "fingerprint": {r.label: r.fingerprint_files if r.fingerprint else None for r in self.roots},
            "problems": [str(p) for p in self.problems],
        }


# --------------------------------------------------------------------------
# Host tools


def _tool(name: str) -> str:
    """Path of a host tool, also from /usr/sbin and /sbin (not on a user's PATH on Debian).

    A ConfigError naming the package when it is missing, as testbed.util.require_tool does.
    """
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
    if not found:
        package = _TOOL_PACKAGES.get(name, name)
        raise ConfigError(f"{name} is not installed: install the '{package}' package (apt-get install {package})")
    return found


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a host tool without stdin; an InfraError if it hangs. (subprocess.run kills it on Ctrl-C.)"""
    try:
        return subprocess.run(
            [_tool(argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, MTOOLS_SKIP_CHECK="1", LC_ALL="C"),
            timeout=_TOOL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InfraError(f"{argv[0]} did not finish within {_TOOL_TIMEOUT} s: {' '.join(argv)}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------
# Where a partition's bytes are: the image in place, a raw backing file in place, or a copy


@dataclass(frozen=True)
class _Region:
    """A file and the byte offset of a partition in it, as debugfs and mtools take them."""

    file: str
    offset: int

    def debugfs(self) -> str:
        return f"{self.file}?offset={self.offset}" if self.offset else self.file

    def mtools(self) -> str:
        return f"{self.file}@@{self.offset}" if self.offset else self.file


class _Reader:
    """The image opened for one inspection: its bytes, a private temporary directory, partition regions."""

    def __init__(self, path: Path, fmt: str, src: img.ByteSource, tmp: Path) -> None:
        self.path, self.fmt, self.src, self.tmp = path, fmt, src, tmp
        self._links = 0

    def link(self, target: str) -> str:
        """A plain name in the temporary directory for ``target``: debugfs splits a path at '?', mtools at '@@'."""
        self._links += 1
        name = self.tmp / f"disk-{self._links}"
        name.symlink_to(os.path.realpath(target))
        return str(name)

    def region(self, part: img.Partition) -> _Region:
        """Where a tool can read ``part``: in place when the bytes are a raw file's, else a sparse copy."""
        if self.fmt == "raw":
            return _Region(self.link(str(self.path)), part.start)
        base = self._raw_base
        if base is not None and _served_by(base[1], part):
            return _Region(self.link(base[0]), part.start)
        copy = self.tmp / f"partition-{part.index}.img"
        img.extract_partition(self.src, part, copy)
        return _Region(str(copy), 0)

    @functools.cached_property
    def _raw_base(self) -> tuple[str, list[dict[str, Any]]] | None:
        """The raw file at the end of the qcow2's backing chain and its extents (looked up once)."""
        return _map_raw_base(self.path)


def _map_raw_base(path: Path) -> tuple[str, list[dict[str, Any]]] | None:
    """The raw file ending a qcow2's backing chain and ``qemu-img map``'s extents the guest reads from
    it at the same offset (the bytes no qcow2 of the chain holds); None when there is no such file."""
    chain = [str(path)]
    try:
        while img.image_format(chain[-1]) == "qcow2":
            backing = img.qcow2_backing_file(chain[-1])
            if backing is None or len(chain) > 16:
                return None
            chain.append(backing)
        # -U: only reading, so a QEMU holding the image's write lock does not stop us.
        proc = _run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(path)])
        extents = json.loads(proc.stdout) if proc.returncode == 0 else None
    except (ConfigError, InfraError, ValueError):
        return None  # any doubt: copy the partition out instead
    if not isinstance(extents, list):
        return None
    depth = len(chain) - 1
    mine = [e for e in extents if isinstance(e, dict) and e.get("depth") == depth and e.get("offset") == e.get("start")]
    return chain[-1], mine


def _served_by(extents: list[dict[str, Any]], part: img.Partition) -> bool:
    """True if the base file's own extents (at the partition's offset) cover the whole partition."""
    pos = part.start
    for e in sorted(extents, key=lambda e: int(e["start"])):
        start, end = int(e["start"]), int(e["start"]) + int(e["length"])
        if end <= pos:
            continue
        if start > pos:
            return False
        pos = end
        if pos >= part.end:
            return True
    return pos >= part.end


def _mbr_containers(src: img.ByteSource, table: str) -> list[PartitionRow]:
    """The MBR's extended partitions (read_layout lists only the logical partitions inside them)."""
    if table != "dos":
        return []
    sector = src.read(0, 512)
    rows = []
    for slot in range(4):
        _status, ptype, start, count = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * slot)
        if ptype in img.MBR_EXTENDED_TYPES and count:
            rows.append(
                PartitionRow(slot + 1, "extended", "", "", "extended", start * 512, count * 512, f"{ptype:#04x}")
            )
    return rows


# --------------------------------------------------------------------------
# ext roots: one debugfs request file per pass, read-only (-c: catastrophic mode, no bitmaps read)


class _Unreadable(Exception):
    """debugfs could not open the filesystem."""


def _quote(path: str) -> str:
    """A path as one debugfs argument (its parser, libss, reads "" inside quotes as a quote)."""
    return '"' + path.replace('"', '""') + '"'


def _debugfs(region: _Region, commands: Sequence[str], tmp: Path) -> dict[str, list[str]]:
    """Run ``commands`` in one read-only ``debugfs -c -f FILE``; the stdout lines of each, by command.

    debugfs echoes each command of a request file as ``debugfs: COMMAND`` before its output,
    which is how the output is split. _Unreadable if the filesystem cannot be opened.
    """
    script = tmp / "debugfs.cmds"
    script.write_text("".join(f"{c}\n" for c in commands))
    proc = _run(["debugfs", "-c", "-f", str(script), region.debugfs()])
    if proc.returncode != 0 or "while trying to open" in proc.stderr or "Could not open" in proc.stderr:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs 1.")]
        raise _Unreadable(_one_line(" ".join(lines[:2])) or f"debugfs exit {proc.returncode}")
    wanted = set(commands)
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in proc.stdout.splitlines():
        if line.startswith("debugfs: ") and line[9:] in wanted:
            current = out.setdefault(line[9:], [])
        elif current is not None:
            current.append(line)
    return out


def _entries(lines: list[str] | None) -> dict[str, int]:
    """``ls -p`` output as {name: mode}, without . and ..; {} for a missing directory."""
    found: dict[str, int] = {}
    for line in lines or []:
        parts = line.split("/")
        if len(parts) >= 7 and parts[0] == "" and parts[5] not in (".", ".."):
            with contextlib.suppress(ValueError):
                found[parts[5]] = int(parts[2], 8)
    return found


def _link_target(stat_lines: list[str] | None) -> str | None:
    """The target of a symlink from debugfs ``stat`` output; None if it is not a (fast) symlink."""
    text = "\n".join(stat_lines or [])
    if "Type: symlink" not in text:
        return None
    m = re.search(r'Fast link dest: "(.*)"', text)
    return m.group(1) if m else None


def _is_regular(stat_lines: list[str] | None) -> bool:
    return "Type: regular" in "\n".join(stat_lines or [])


def _parse_os_release(text: str) -> dict[str, str]:
    """os-release(5) KEY=value lines, quotes and backslash escapes removed."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#") or not key.isidentifier():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        found[key] = value
    return found


def _binary_arch(head: bytes) -> str:
    """The CPU architecture a kernel or EFI binary is for, from its header; "" if it cannot tell.

    PE (EFI applications, and kernels with an EFI stub: x86 bzImage and arm64 Image both are),
    ELF, an arm64 Image's magic, an x86 boot-protocol header ("x86": 32 or 64 bit unknown).
    """
    if head[:2] == b"MZ" and len(head) >= 0x40:
        pe = struct.unpack_from("<I", head, 0x3C)[0]
        if head[pe : pe + 4] == b"PE\0\0" and len(head) >= pe + 6:
            machine = struct.unpack_from("<H", head, pe + 4)[0]
            return _PE_MACHINES.get(machine, f"PE machine {machine:#06x}")
    if head[:4] == b"\x7fELF" and len(head) >= 20:
        machine = struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)[0]
        return _ELF_MACHINES.get(machine, f"ELF machine {machine}")
    if head[0x38:0x3C] == b"ARM\x64":
        return "aarch64"
    if head[0x202:0x206] == b"HdrS":
        version = struct.unpack_from("<H", head, 0x206)[0]
        xloadflags = struct.unpack_from("<H", head, 0x236)[0] if len(head) >= 0x238 else 0
        return "x86_64" if version >= 0x20C and xloadflags & 1 else "x86"
    return ""


def _head(path: Path, n: int = 8192) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


_ROOT_PASS1 = (
    "ls -p /",
    "ls -p /boot",
    "ls -p /usr/lib/modules",
    "ls -p /lib/modules",
    "stat /etc/os-release",
    "stat /usr/lib/os-release",
    "stat /boot/vmlinuz",
)


def _read_root(reader: _Reader, layout: img.DiskLayout, label: str) -> RootInfo:
    """os-release, kernels and fingerprint of the root labelled ``label``: two debugfs passes."""
    try:
        part = layout.by_label(label)
    except img.MissingPartitionError:
        return RootInfo(label)
    if not part.fstype.startswith("ext"):
        return RootInfo(label, part.index, "unreadable", f"{part.describe()} is not an ext filesystem")
    region = reader.region(part)
    out = reader.tmp / f"root-{part.index}"
    out.mkdir()
    dumps = {"/usr/lib/os-release": "usr-os-release", "/etc/os-release": "etc-os-release"}
    dumps |= {fp: fp.strip("/") for fp in _FINGERPRINTS}
    commands = [*_ROOT_PASS1, *(f"dump {_quote(src)} {_quote(str(out / dst))}" for src, dst in dumps.items())]
    try:
        first = _debugfs(region, commands, reader.tmp)
        top = _entries(first.get("ls -p /"))
        if not set(top) - {"lost+found"}:
            return RootInfo(label, part.index, "empty")
        boot = _entries(first.get("ls -p /boot"))
        kernels = tuple(sorted(n for n, mode in boot.items() if _KERNEL_NAME.match(n) and mode & 0o170000 == 0o100000))
        link = _link_target(first.get("stat /boot/vmlinuz")) or ""
        kernel = link if link in kernels else (kernels[-1] if kernels else "")
        osr_path, osr_file = _os_release_source(first, out)
        second = [f"dump {_quote('/boot/' + kernel)} {_quote(str(out / 'kernel'))}"] if kernel else []
        if osr_file is None and osr_path:
            osr_file = out / "linked-os-release"
            second.append(f"dump {_quote(osr_path)} {_quote(str(osr_file))}")
        if second:
            _debugfs(region, second, reader.tmp)
    except _Unreadable as exc:
        return RootInfo(label, part.index, "unreadable", str(exc))
    modules = _entries(first.get("ls -p /lib/modules")) or _entries(first.get("ls -p /usr/lib/modules"))
    fingerprint = next((fp for fp in _FINGERPRINTS if fp.strip("/") in top), "")
    listed = out / fingerprint.strip("/") if fingerprint else None
    files = sum(1 for ln in listed.read_bytes().splitlines() if ln.strip()) if listed and listed.is_file() else 0
    text = osr_file.read_text(errors="replace") if osr_file is not None and osr_file.is_file() else ""
    return RootInfo(
        label,
        part.index,
        "ok",
        os_release=_parse_os_release(text),
        os_release_path=osr_path if text else "",
        kernels=kernels,
        kernel_link=link,
        modules=tuple(sorted(n for n, mode in modules.items() if mode & 0o170000 == 0o040000)),
        kernel_arch=_binary_arch(_head(out / "kernel")) if kernel else "",
        fingerprint=fingerprint,
        fingerprint_files=files,
    )


def _os_release_source(first: dict[str, list[str]], out: Path) -> tuple[str, Path | None]:
    """Which os-release a root has (/etc first, as os-release(5) says) and its dumped copy.

    (path, file): the copy when pass 1 dumped it; (path, None) when /etc/os-release links
    somewhere else, for pass 2 to dump; ("", None) when there is none.
    """
    if _is_regular(first.get("stat /etc/os-release")):
        return "/etc/os-release", out / "etc-os-release"
    target = _link_target(first.get("stat /etc/os-release"))
    if target is not None:
        resolved = os.path.normpath(os.path.join("/etc", target))
        if resolved != "/usr/lib/os-release":
            return resolved, None
    if _is_regular(first.get("stat /usr/lib/os-release")):
        return "/usr/lib/os-release", out / "usr-os-release"
    return "", None


# --------------------------------------------------------------------------
# The boot partition: bootloader environments, EFI loader, config.json


def _fat_files(region: _Region) -> list[str]:
    """Every file's path in a FAT filesystem (``mdir -/ -b``), without the leading ``::/``."""
    proc = _run(["mdir", "-/", "-b", "-i", region.mtools(), "::"])
    if proc.returncode != 0:
        raise _Unreadable(_one_line(proc.stderr + proc.stdout) or f"mdir exit {proc.returncode}")
    return [ln[3:] for ln in proc.stdout.splitlines() if ln.startswith("::/") and not ln.endswith("/")]


def _fat_copy(region: _Region, inner: str, dest: Path) -> bytes | None:
    """The content of ``inner`` in the FAT filesystem, or None if mcopy cannot read it."""
    proc = _run(["mcopy", "-n", "-i", region.mtools(), f"::/{inner}", str(dest)])
    return dest.read_bytes() if proc.returncode == 0 and dest.is_file() else None


def _parse_grubenv(data: bytes) -> tuple[dict[str, str], str]:
    """GRUB's environment block: its variables, and a note if it lacks the block's header."""
    text = data.decode("utf-8", errors="replace")
    note = "" if text.startswith("# GRUB Environment Block") else "no '# GRUB Environment Block' header"
    variables = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and not key.startswith("#"):
            variables[key] = value
    return variables, note


def _parse_uboot_env(data: bytes) -> tuple[dict[str, str], str]:
    """U-Boot's binary environment (CRC32, a flags byte if redundant, NUL-separated pairs)."""
    crc = struct.unpack_from("<I", data, 0)[0] if len(data) >= 4 else None
    body, note = data[4:], ""
    if crc is not None and binascii.crc32(data[4:]) != crc:
        if binascii.crc32(data[5:]) == crc:
            body = data[5:]
        else:
            note = "bad CRC: U-Boot would ignore this environment and use its built-in one"
    variables = {}
    for pair in body.split(b"\0"):
        if not pair:
            break
        key, sep, value = pair.decode("utf-8", errors="replace").partition("=")
        if sep:
            variables[key] = value
    return variables, note


def _parse_text_env(data: bytes) -> tuple[dict[str, str], str]:
    """A text environment (resinOS_uEnv.txt, bootcount.env): KEY=value lines."""
    variables = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            variables[key] = value
    return variables, ""


_EnvParser = Callable[[bytes], tuple[dict[str, str], str]]
# Where bootloaders keep their environment on the boot partition (matched case-insensitively).
_ENV_FILES: tuple[tuple[str, str, _EnvParser], ...] = (
    *(("grub", path, _parse_grubenv) for path in ("grubenv", "EFI/BOOT/grubenv", "grub/grubenv", "boot/grub/grubenv")),
    ("u-boot", "uboot.env", _parse_uboot_env),
    ("u-boot", "resinOS_uEnv.txt", _parse_text_env),
    ("u-boot", "bootcount.env", _parse_text_env),  # balenaOS's U-Boot boot count, written as text
)


def _find(files: list[str], wanted: str) -> str | None:
    """The path in ``files`` that is ``wanted`` on a FAT filesystem (which ignores case)."""
    return next((f for f in files if f.casefold() == wanted.casefold()), None)


def _read_boot(reader: _Reader, part: img.Partition) -> BootInfo:
    """Bootloader environments and the EFI loader of the boot partition (mdir once, mcopy per file)."""
    if part.fstype != "vfat":
        return BootInfo(part.label, error=f"{part.describe()} is not a FAT filesystem")
    region = reader.region(part)
    try:
        files = _fat_files(region)
    except _Unreadable as exc:
        return BootInfo(part.label, error=str(exc))
    envs = []
    for n, (kind, path, parse) in enumerate(_ENV_FILES):
        found = _find(files, path)
        data = _fat_copy(region, found, reader.tmp / f"env-{n}") if found else None
        if found and data is not None:
            variables, note = parse(data)
            envs.append(BootEnv(kind, "/" + found, variables, note))
    loader = next((m for m in map(_EFI_LOADER.match, files) if m), None)
    if loader is None:
        return BootInfo(part.label, tuple(envs))
    data = _fat_copy(region, loader.string, reader.tmp / "efi-loader")
    return BootInfo(
        part.label,
        tuple(envs),
        efi_loader=loader.string,
        efi_arch=_EFI_ARCH[loader.group(1).upper()],
        efi_machine=_binary_arch(data[:8192]) if data else "",
    )


def _read_config(path: Path, label: str) -> ConfigInfo:
    """config.json through testbed.image.read_config_json, so its messages are the layout suite's."""
    try:
        data = img.read_config_json(path, label)
    except img.MissingPartitionError:
        return ConfigInfo("missing", error=f"no partition labelled {label!r} to hold /config.json")
    except ConfigError as exc:
        state = "missing" if "not found in" in str(exc) else "invalid"
        return ConfigInfo(state, error=str(exc))
    except InfraError as exc:  # mtype failed on a damaged filesystem: the image's defect
        return ConfigInfo("invalid", error=str(exc))
    return ConfigInfo("ok", redact_config(data))


def _active_root(envs: Sequence[BootEnv], roots: Sequence[RootInfo], layout: img.DiskLayout) -> tuple[str, str]:
    """The root the bootloader will boot, and why: ``resin_root_part`` (A/B, or a partition number).

    Without it GRUB's configuration boots A (``if [ "${resin_root_part}" != "B" ]``), so the
    first root is taken as active, said so.
    """
    labels = [r.label for r in roots]
    for env in envs:
        value = env.variables.get("resin_root_part", "").strip()
        if not value:
            continue
        why = f"resin_root_part={value} in {env.path}"
        letter = [lbl for lbl in labels if lbl.upper().endswith("ROOT" + value.upper())]
        if letter:
            return letter[0], why
        with contextlib.suppress(ValueError):
            number = int(value, 16)  # U-Boot's partition numbers are hex
            part = next((p for p in layout.partitions if p.index == number), None)
            if part is not None and part.label in labels:
                return part.label, why
        return "", why + ", which names no root partition"
    if not labels:
        return "", "no root partitions in the profile"
    return labels[0], "default: no resin_root_part in a bootloader environment"


# --------------------------------------------------------------------------
# Checks against the profile


def _spec_for(label: str, specs: Sequence[PartitionSpec]) -> PartitionSpec | None:
    """The profile's spec for a label: exact, else a single case-insensitive match (FAT labels)."""
    exact = [s for s in specs if s.label == label]
    folded = [s for s in specs if s.label.casefold() == label.casefold()]
    return exact[0] if exact else (folded[0] if len(folded) == 1 else None)


def _rows(layout: img.DiskLayout, containers: list[PartitionRow], specs: Sequence[PartitionSpec]) -> list[PartitionRow]:
    """Every partition (and MBR container) with the profile's spec for its label and what does not hold."""
    rows = list(containers)
    for p in layout.partitions:
        spec = _spec_for(p.label, specs) if p.label else None
        issues = []
        expected = ""
        if spec is not None:
            expected = f"{spec.fstype}, {spec.min_mib}..{spec.max_mib} MiB"
            if p.fstype != spec.fstype:
                issues.append(f"filesystem {p.fstype}, the profile expects {spec.fstype}")
            if not spec.min_mib <= p.size / MIB <= spec.max_mib:
                issues.append(f"{p.size / MIB:.0f} MiB, outside {spec.min_mib}..{spec.max_mib} MiB")
        elif p.label:
            issues.append("label not in the profile")
        else:
            issues.append("no filesystem label")
        rows.append(
            PartitionRow(
                p.index,
                "partition",
                p.label,
                p.name,
                p.fstype,
                p.start,
                p.size,
                p.type_guid or "",
                expected,
                tuple(issues),
            )
        )
    return sorted(rows, key=lambda r: r.number)


def _layout_problems(layout: img.DiskLayout, rows: list[PartitionRow], profile: Profile) -> list[Problem]:
    """The partition table against the profile: table type, labels (present, in order), fs types, sizes.

    The same promises the layout suite checks offline, so what it would fail on is listed here.
    """
    where = profile.source or profile.name
    names = {"gpt": "GPT", "dos": "MBR"}
    problems = []
    if layout.table != profile.layout.table:
        problems.append(
            Problem(
                f"the partition table is {names[layout.table]}, the profile expects {names[profile.layout.table]}",
                f"use an image with a {names[profile.layout.table]} table, or pick this device's profile with --device "
                f"(or set layout.table: {layout.table} in {where})",
            )
        )
    problems += _label_problems(layout, rows, profile, str(where))
    for row in rows:
        for issue in row.issues:
            if issue.startswith("filesystem"):
                fix = f"format it as the profile says, or fix its fstype in {where}"
            elif "outside" in issue:
                fix = f"resize the partition in the image, or fix its min_mib/max_mib in {where}"
            else:
                continue  # labels: above
            problems.append(Problem(f"{row.label}: {issue}", fix))
    return problems


def _label_problems(layout: img.DiskLayout, rows: list[PartitionRow], profile: Profile, where: str) -> list[Problem]:
    """Labels missing, unexpected, unlabelled partitions, and the profile's labels out of order or case."""
    expected = [s.label for s in profile.layout.partitions]
    found = [p.label for p in layout.partitions]  # read_layout leaves an extended container out
    matched = [s.label for s in (_spec_for(lbl, profile.layout.partitions) for lbl in found if lbl) if s]
    listed = ", ".join(repr(f) for f in found if f) or "none"
    problems = [
        Problem(
            f"no partition labelled {lbl!r} (labels found: {listed})",
            f"label the partition that should be {lbl!r} (e2label / fatlabel), or fix layout.partitions in {where}",
        )
        for lbl in expected
        if lbl not in matched
    ]
    for row in rows:
        if row.kind == "partition" and not row.expected:
            what = f"partition {row.number} {row.label!r} is not in the profile" if row.label else ""
            problems.append(
                Problem(
                    what or f"partition {row.number} ({row.fstype}) has no filesystem label",
                    f"remove it from the image, or label it and add it to layout.partitions in {where}",
                )
            )
    if sorted(matched) == sorted(expected) and matched != expected:
        problems.append(
            Problem(
                f"partitions labelled in the order {matched}, the profile's order is {expected}",
                f"lay the partitions out in the profile's order, or fix the order of layout.partitions in {where}",
            )
        )
    elif matched == expected and [f for f in found if f] != expected:
        problems.append(
            Problem(
                f"labels {[f for f in found if f]} differ in case from the profile's {expected} (compared exactly)",
                f"relabel them as the profile spells them (fatlabel keeps case, mlabel upper-cases), or fix {where}",
            )
        )
    return problems


def _config_problems(config: ConfigInfo, boot_label: str) -> list[Problem]:
    if config.state == "ok":
        return []
    what, _sep, fix = config.error.partition(" — ")
    if config.state == "missing":
        return [Problem(what, f"put a config.json (a JSON object) at the root of {boot_label}")]
    return [Problem(what, fix or "fix or regenerate /config.json on the boot partition")]


def _root_problems(roots: Sequence[RootInfo], boot: BootInfo, profile: Profile) -> list[Problem]:
    """Each root against what an OS needs: os-release, a kernel in the active one, a fingerprint, the arch."""
    problems = []
    if roots and not boot.active_root:
        problems.append(
            Problem(
                f"the active root is unknown: {boot.active_from}",
                "set resin_root_part to A or B (or a root's partition number) in the bootloader's environment",
            )
        )
    for r in roots:
        active = r.label == boot.active_root
        if r.state == "unreadable":
            problems.append(Problem(f"{r.label} cannot be read: {r.error}", "check it with e2fsck -fn, or rebuild it"))
        elif r.state == "empty" and active:
            problems.append(
                Problem(
                    f"the active root {r.label} ({boot.active_from}) is empty",
                    "write the OS into it, or point the bootloader's resin_root_part at the root that holds it",
                )
            )
        elif r.state == "ok":
            problems += _os_root_problems(r, active, profile)
    return problems


def _os_root_problems(r: RootInfo, active: bool, profile: Profile) -> list[Problem]:
    """A root holding an OS: os-release and fingerprint in every one; kernel, arch, SLUG/MACHINE in the active one."""
    problems = []
    if not r.os_release:
        problems.append(Problem(f"{r.label} has no os-release", "add /usr/lib/os-release (and /etc/os-release) to it"))
    if not r.fingerprint:
        problems.append(
            Problem(
                f"{r.label} has no /balenaos.fingerprint",
                "write the md5sum of every file of the root to /balenaos.fingerprint when building the image",
            )
        )
    if not active:
        return problems
    if not r.kernels and not r.modules:
        problems.append(
            Problem(f"no kernel in the active root {r.label} (no /boot/vmlinuz*, no /lib/modules/*)", "install one")
        )
    if r.kernel_arch and not _arch_matches(r.kernel_arch, profile.arch):
        problems.append(_arch_problem(f"the kernel in {r.label}", r.kernel_arch, profile))
    for key, want in (("SLUG", profile.os.slug), ("MACHINE", profile.os.machine)):
        if key in r.os_release and r.os_release[key] != want:
            problems.append(
                Problem(
                    f"{r.label}'s os-release has {key}={r.os_release[key]}, the profile expects {want}",
                    f"pick this image's device with --device, or fix os.{key.lower()} in the profile",
                )
            )
    return problems


def _arch_matches(found: str, arch: str) -> bool:
    """True if a binary for ``found`` runs on ``arch`` ("x86": an x86 kernel of unknown width)."""
    return found == arch or (found == "x86" and arch in ("x86_64", "i386"))


def _boot_problems(boot: BootInfo, profile: Profile) -> list[Problem]:
    problems = []
    if boot.efi_arch and not _arch_matches(boot.efi_arch, profile.arch):
        problems.append(_arch_problem(f"the EFI loader {boot.efi_loader}", boot.efi_arch, profile))
    elif boot.efi_machine and not _arch_matches(boot.efi_machine, profile.arch):
        problems.append(_arch_problem(f"the EFI loader {boot.efi_loader} (PE header)", boot.efi_machine, profile))
    for env in boot.envs:
        if env.note:
            problems.append(Problem(f"{env.path}: {env.note}", "rewrite it with the bootloader's own tool"))
    return problems


def check_loader_arch(path: Path, profile: Profile, shown: str | None = None) -> None:
    """Before anything boots: ConfigError if the image's EFI loader (its name, else its PE
    header's machine field) is for another architecture than the profile's. An image without
    an EFI loader in its boot partition (U-Boot boards) is not judged here."""
    local = Path(path)
    layout = img.read_layout(local)
    label = profile.layout.partitions[0].label
    try:
        part = layout.by_label(label)
    except img.MissingPartitionError:
        return
    tmp = private_dir("testbed-arch-")
    try:
        with img.open_source(local) as src:
            boot = _read_boot(_Reader(local, img.image_format(local), src, tmp), part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = boot.efi_arch or boot.efi_machine
    if boot.efi_arch and boot.efi_machine and boot.efi_arch == profile.arch:
        found = boot.efi_machine  # the name fits: the PE header has the last word
    if found and not _arch_matches(found, profile.arch):
        raise ConfigError(
            f"{shown or path}: its EFI loader {label}/{boot.efi_loader} is for {found}, and device {profile.name} "
            f"({profile.source}) is {profile.arch}: pass an image built for {profile.arch}, or pick this "
            "image's device with --device"
        )


def _arch_problem(what: str, arch: str, profile: Profile) -> Problem:
    return Problem(
        f"{what} is for {arch}, the device {profile.name} is {profile.arch}",
        f"use an image built for {profile.arch}, or pick the profile of this image's device with --device",
    )


# --------------------------------------------------------------------------
# config.json secrets


def _short(value: Any) -> str:
    """A secret shortened to its first 4 characters (at most half of it) and an ellipsis."""
    text = str(value)
    return text[: min(4, len(text) // 2)] + "…"


def _short_ssh_key(key: Any) -> str:
    """``ssh-ed25519 AAAA... comment`` as ``ssh-ed25519 SHA256:abcdefghijkl… comment``."""
    parts = str(key).split(None, 2)
    if len(parts) < 2:
        return _short(key)
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):  # not a key's base64: its first and last characters
        text = str(key)
        return f"{text[:6]}…{text[-4:]}" if len(text) > 20 else _short(text)
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return " ".join([parts[0], f"SHA256:{digest[:12]}…", *parts[2:]])


def redact_config(value: Any, key: str = "") -> Any:
    """config.json with its secrets shortened, for showing and for reports.

    ``sshKeys`` entries become their type, a short SHA256 fingerprint and their comment; the
    value of any key that looks like a secret (apiKey, deviceApiKey, provisioningApiKey, *token*,
    *password*, *secret*) its first 4 characters and "…" (every string or number below it, for a
    mapping or list). Everything else is returned as it is.
    """
    if isinstance(value, dict):
        return {k: redact_config(v, str(k)) for k, v in value.items()}
    if key == "sshKeys" and isinstance(value, list):
        return [_short_ssh_key(k) for k in value]
    if _SECRET_KEY.search(key):
        return _redact_all(value)
    if isinstance(value, list):
        return [redact_config(v, "") for v in value]
    return value


def _redact_all(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_all(v) for v in value]
    if value is None or isinstance(value, bool) or value == "":
        return value
    return _short(value)


# --------------------------------------------------------------------------
# The inspection


def _local_image(path: Path, progress: unpack.Progress | None) -> Path:
    """The image as a file the readers can open: the single call site of testbed.unpack.

    A compressed download (.img.gz/.xz/.zst/.zip) is unpacked once into testbed's cache and the
    unpacked image returned; a raw image or a qcow2 is returned as it is.
    """
    return unpack.local_image(path, progress=progress)


def inspect_image(path: Path, profile: Profile, *, progress: unpack.Progress | None = None) -> Inspection:
    """What the OS image at ``path`` holds, against ``profile``; the image is only read.

    A compressed image is unpacked once into the cache first (``progress``: see
    testbed.unpack.Progress). Bad input (a missing file, a corrupt download, not a disk image,
    a corrupt partition table) raises the ConfigError of testbed.unpack.local_image,
    testbed.image.image_format or read_layout; a missing host tool (debugfs,
    mtools) a ConfigError naming its package. Everything wrong *inside* a readable image is
    an entry of ``problems`` instead. Temporary files live in a private directory removed
    before returning, also when interrupted.
    """
    started = time.monotonic()
    local = _local_image(Path(path), progress)
    fmt = img.image_format(local)
    layout = img.read_layout(local)
    for tool in ("debugfs", "mdir", "mcopy"):
        _tool(tool)
    specs = profile.layout.partitions
    tmp = private_dir("testbed-inspect-")
    try:
        with img.open_source(local) as src:
            reader = _Reader(local, fmt, src, tmp)
            rows = _rows(layout, _mbr_containers(src, layout.table), specs)
            boot_label = specs[0].label
            try:
                boot = _read_boot(reader, layout.by_label(boot_label))
            except img.MissingPartitionError:
                boot = BootInfo(boot_label, error=f"no partition labelled {boot_label!r}")
            config = _read_config(local, boot_label)
            roots = tuple(_read_root(reader, layout, s.label) for s in specs if "root" in s.label.casefold())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    active, why = _active_root(boot.envs, roots, layout)
    boot = replace(boot, active_root=active, active_from=why)
    problems = [
        *_layout_problems(layout, rows, profile),
        *_config_problems(config, boot_label),
        *_boot_problems(boot, profile),
        *_root_problems(roots, boot, profile),
    ]
    return Inspection(
        image=str(path),
        read_from=str(local),
        format=fmt,
        device=profile.name,
        profile_source=str(profile.source or ""),
        arch=profile.arch,
        table=layout.table,
        expected_table=profile.layout.table,
        disk_size=layout.size,
        partitions=tuple(rows),
        boot=boot,
        config=config,
        roots=roots,
        problems=tuple(problems),
        seconds=round(time.monotonic() - started, 3),
    )


# --------------------------------------------------------------------------
# The text page


def _mib(size: int) -> str:
    return f"{size / MIB:,.0f} MiB" if size >= MIB else f"{size / 1024:,.0f} KiB"


def _columns(rows: Sequence[Sequence[str]], indent: str = "  ", right: Sequence[int] = ()) -> list[str]:
    """Rows of cells as lines with aligned columns (those in ``right`` right-aligned)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def _partition_lines(ins: Inspection) -> list[str]:
    table = [("#", "label", "fs", "size", "profile", "")]
    for p in ins.partitions:
        if p.kind == "extended":
            inside = [
                str(q.number) for q in ins.partitions if q.kind == "partition" and p.start <= q.start < p.start + p.size
            ]
            held = f"container of {', '.join(inside)}" if inside else "empty container"
            table.append((str(p.number), "(extended)", "-", _mib(p.size), "-", f"{held}, not in the label order"))
            continue
        verdict = "; ".join(p.issues) if p.issues else "ok"
        table.append((str(p.number), p.label or "-", p.fstype, _mib(p.size), p.expected or "-", verdict))
    return _columns(table, right=(0, 3))


def _boot_lines(ins: Inspection) -> list[str]:
    b = ins.boot
    cells: list[tuple[str, str]] = []
    if b.error:
        cells.append(("unreadable", b.error))
    for env in b.envs:
        keys = ("resin_root_part", "upgrade_available", "bootcount")
        shown = [f"{k}={env.variables[k]}" for k in keys if k in env.variables]
        others = len(env.variables) - len(shown)
        text = f"{env.path}: {' '.join(shown) or 'no A/B variables'}" + (f" (+{others} more)" if others else "")
        cells.append((f"{env.kind} env", text + (f"  [{env.note}]" if env.note else "")))
    if not b.envs and not b.error:
        cells.append(("environment", "none found (no grubenv, uboot.env or resinOS_uEnv.txt)"))
    cells.append(("active root", f"{b.active_root or '-'} ({b.active_from})"))
    probation = next((e for e in b.envs if e.variables.get("upgrade_available") == "1"), None)
    if probation is not None:
        count = probation.variables.get("bootcount", "0")
        cells.append(("update", f"on probation (bootcount={count}): a failing boot falls back to the other root"))
    if b.efi_loader:
        cells.append(("EFI loader", f"{b.efi_loader} (name: {b.efi_arch or '?'}, PE machine: {b.efi_machine or '?'})"))
    else:
        cells.append(("EFI loader", "none"))
    return [f"bootloader (on {b.partition})", *_columns(cells)]


def _root_lines(ins: Inspection) -> list[str]:
    lines = ["roots"]
    for r in ins.roots:
        active = ", active" if r.label == ins.boot.active_root else ""
        if r.state != "ok":
            detail = {"missing": "no such partition", "empty": "empty"}.get(r.state, f"unreadable: {r.error}")
            where = f" (partition {r.number}{active})" if r.number else ""
            lines.append(f"  {r.label}{where}: {detail}")
            continue
        lines.append(f"  {r.label} (partition {r.number}{active})")
        osr = " ".join(f'{k}="{r.os_release[k]}"' for k in _OS_RELEASE_SHOWN if k in r.os_release)
        kernel = ", ".join(r.versions()) or "none"
        if r.kernel_link:
            kernel += f"  (/boot/vmlinuz -> {r.kernel_link})"
        if r.kernel_arch:
            kernel += f"  [{r.kernel_arch}]"
        cells = [
            ("os-release", f"{r.os_release_path}: {osr}" if osr else "none"),
            ("kernel", kernel),
            ("modules", ", ".join(r.modules) or "none"),
            ("fingerprint", f"{r.fingerprint}, {r.fingerprint_files} files" if r.fingerprint else "none"),
        ]
        lines += _columns(cells, "    ")
    return lines


def _config_lines(ins: Inspection) -> list[str]:
    head = f"config.json ({ins.boot.partition}, secrets shortened)"
    if ins.config.state != "ok":
        return [head, f"  {ins.config.state}: {ins.config.error}"]
    text = json.dumps(ins.config.data, indent=2, ensure_ascii=False)
    return [head, *("  " + line for line in text.splitlines())]


def render_text(ins: Inspection) -> str:
    """The readable page ``python -m testbed inspect`` prints."""
    table = {"gpt": "GPT", "dos": "MBR (dos)"}[ins.table]
    want = {"gpt": "GPT", "dos": "MBR (dos)"}[ins.expected_table]
    via = f", read from {ins.read_from}" if ins.read_from != ins.image else ""
    lines = [
        f"image    {ins.image} ({ins.format}, {_mib(ins.disk_size)}{via})",
        f"device   {ins.device} ({ins.arch}, {ins.profile_source})",
        f"table    {table}" + ("" if ins.table == ins.expected_table else f" (the profile expects {want})"),
        "",
        *_partition_lines(ins),
        "",
        *_boot_lines(ins),
        "",
        *_root_lines(ins),
        "",
        *_config_lines(ins),
        "",
    ]
    if not ins.problems:
        lines.append(f"no problems (inspected in {ins.seconds:.2f} s)")
    else:
        count = f"{len(ins.problems)} problem{'s' if len(ins.problems) != 1 else ''}"
        lines.append(f"{count} (inspected in {ins.seconds:.2f} s):")
        for p in ins.problems:
            lines += [f"  - {p.what}", f"    fix: {p.fix}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The command

DESCRIPTION = (
    "Show what an OS image holds, offline (no boot): partition table and partitions against the device "
    "profile, config.json (secrets shortened), each root's os-release, kernels and fingerprint, the "
    "bootloader's environment (active root, upgrade_available, bootcount), and the problems found with "
    "their fixes."
)
EPILOG = (
    "exit status: 0 no problems; 1 problems found (listed with their fixes); 4 bad input (missing or "
    "unreadable file, not a disk image, unknown --device, a wrong key in the profile, a missing host tool); "
    "75 a host tool failed."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``inspect`` subcommand's arguments."""
    parser.add_argument(
        "image",
        help="the disk image: raw .img, .qcow2, or .img.gz/.xz/.zst/.zip (unpacked once into the cache); only read",
    )
    parser.add_argument(
        "--device", default=DEFAULT_DEVICE, help=f"profile name or YAML path (default {DEFAULT_DEVICE})"
    )
    parser.add_argument("--json", action="store_true", help="print the facts as one JSON object")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM handled like Ctrl-C, so the temporary directory is removed either way."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    """``python -m testbed inspect``: print the page (or JSON); exit 0, 1 (problems), 4 or 75, one line on error."""
    if extra:
        print(f"testbed: inspect: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _sigterm_as_interrupt():
            profile = load_profile(args.device)
            ins = inspect_image(Path(args.image).expanduser(), profile)
    except ConfigError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InfraError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return EXIT_INFRA
    except KeyboardInterrupt:
        print("testbed: inspect interrupted", file=sys.stderr)
        return 130
    print(ins.to_json() if args.json else render_text(ins))
    return EXIT_FAILED if ins.problems else EXIT_PASSED
