"""Offline inspection and editing of disk images.

Everything here works on image files without loop devices, mounts or root:

* :func:`image_format` tells a raw disk image from a qcow2 one and turns every
  kind of wrong input (missing file, directory, empty file, compressed
  download, text file...) into a one-line :class:`ConfigError`.
* :func:`read_layout` parses the GPT or MBR (with extended/logical partitions)
  partition table and reads FAT and ext2/3/4 labels straight from the bytes.
* :func:`read_file_from_fat` / :func:`read_config_json` read files from a FAT
  partition with mtools.
* :func:`write_files_to_fat_in_overlay` / :func:`write_config_json` edit a FAT
  partition inside a qcow2 *overlay*, never its backing file.
* :func:`sha256_file` hashes multi-GB sparse images quickly and remembers the
  result.

Reading goes through a :class:`ByteSource`: :class:`RawSource` for raw files and
:class:`Qcow2Source`, a small pure-Python qcow2 reader that follows backing
files (raw or qcow2). Both open files read-only. The only process that ever
opens an image for writing is ``qemu-io`` in
:func:`write_files_to_fat_in_overlay`, and it is pointed at the overlay, whose
backing file qemu opens read-only.
"""

from __future__ import annotations

import binascii
import errno
import hashlib
import json
import os
import re
import stat
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

from testbed.errors import ConfigError, InfraError

__all__ = [
    "ByteSource",
    "DiskLayout",
    "MissingPartitionError",
    "Partition",
    "Qcow2Source",
    "RawSource",
    "extract_partition",
    "image_format",
    "open_source",
    "qcow2_backing_file",
    "read_config_json",
    "read_file_from_fat",
    "read_layout",
    "sha256_file",
    "write_config_json",
    "write_files_to_fat_in_overlay",
]

StrPath = str | os.PathLike[str]

QCOW2_MAGIC = b"QFI\xfb"
GPT_SIGNATURE = b"EFI PART"
MBR_SIGNATURE = b"\x55\xaa"
MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
MBR_GPT_PROTECTIVE = 0xEE
_DEFAULT_LABEL = "resin-boot"
_CHUNK = 1 << 20
_TOOL_TIMEOUT = 300

_NOT_A_DISK = (
    "{path} is not a disk image: no partition table found (expected a raw .img "
    "with an MBR or GPT partition table, or a .qcow2)"
)


# --------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Partition:
    """One partition of a disk image.

    ``index`` is the number Linux gives it (``sda<index>``): the GPT slot + 1,
    the MBR slot + 1 for primaries, 5, 6, ... for logical partitions.
    ``name`` is the GPT partition name ("" on MBR). ``label`` is the filesystem
    label as blkid reports it ("" if none). ``fstype`` is "vfat", "ext2",
    "ext3", "ext4" or "unknown". ``start`` and ``size`` are in bytes.
    ``type_guid`` is the upper-case GPT type GUID, or for MBR the type byte as
    "0x0c"-style hex.
    """

    index: int
    name: str
    label: str
    fstype: str
    start: int
    size: int
    type_guid: str | None

    @property
    def end(self) -> int:
        """Byte offset just past the partition."""
        return self.start + self.size

    def describe(self) -> str:
        """Short human description, e.g. ``partition 1 'resin-boot' (vfat)``."""
        name = self.label or self.name
        return f"partition {self.index}" + (f" '{name}'" if name else "") + f" ({self.fstype})"


class MissingPartitionError(ConfigError, KeyError):
    """No partition has the requested label. Both a ConfigError and a KeyError."""

    __str__ = Exception.__str__


@dataclass(frozen=True)
class DiskLayout:
    """The partition table of an image.

    ``table`` is "gpt" or "dos". ``partitions`` are sorted by index; for MBR
    the extended container itself is not listed (its logical partitions are).
    ``image`` is the path it was read from and ``size`` the disk size in bytes
    (the virtual size for qcow2).
    """

    table: str
    partitions: tuple[Partition, ...]
    image: str = ""
    size: int = 0

    def labels(self) -> list[str]:
        """Filesystem labels present, in partition order (empty ones left out)."""
        return [p.label for p in self.partitions if p.label]

    def by_label(self, label: str) -> Partition:
        """The partition whose filesystem label is ``label``.

        An exact match wins; otherwise a single case-insensitive match is
        accepted (mlabel stores FAT labels upper-case). Raises
        :class:`MissingPartitionError` naming the label and the labels found.
        """
        for p in self.partitions:
            if p.label == label:
                return p
        folded = [p for p in self.partitions if p.label.casefold() == label.casefold()]
        if len(folded) == 1:
            return folded[0]
        found = ", ".join(repr(lbl) for lbl in self.labels()) or "none"
        where = self.image or "the image"
        raise MissingPartitionError(
            f"{where} has no partition labelled {label!r} (labels found: {found}) — "
            "pass --image with an image that has it, or fix the label expected in the device profile"
        )


# --------------------------------------------------------------------------
# Byte sources


class ByteSource(Protocol):
    """Random read access to the guest-visible bytes of a disk image."""

    @property
    def size(self) -> int:
        """Disk size in bytes (virtual size for qcow2)."""
        ...

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes from ``offset``; bytes past the end read as zeros."""
        ...

    def close(self) -> None:
        """Release the file descriptors."""
        ...


def _pread_full(fd: int, n: int, offset: int) -> bytes:
    """Read up to ``n`` bytes at ``offset``, stopping early only at end of file."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = os.pread(fd, min(n - got, 1 << 30), offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class RawSource:
    """A raw image file, opened read-only."""

    def __init__(self, path: StrPath) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, n: int) -> bytes:
        if n <= 0:
            return b""
        avail = max(0, min(n, self._size - offset))
        data = _pread_full(self._fd, avail, offset) if avail else b""
        return data + bytes(n - len(data)) if len(data) < n else data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_L2_COMPRESSED = 1 << 62
_L2_ZERO = 1
_QCOW2_INCOMPAT_DIRTY = 1 << 0
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_EXTERNAL_DATA = 1 << 2
_QCOW2_INCOMPAT_COMPRESSION_TYPE = 1 << 3
_QCOW2_INCOMPAT_EXTENDED_L2 = 1 << 4
_QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
_MAX_BACKING_DEPTH = 16


class Qcow2Source:
    """Read-only view of a qcow2 image, following its backing chain.

    Supports qcow2 v2 and v3 with any cluster size, zero clusters, and a
    backing file that is raw or qcow2 (recursively). Compressed clusters,
    encryption, external data files and extended L2 entries are not supported
    and raise :class:`ConfigError` when met.
    """

    def __init__(self, path: StrPath, *, open_backing: bool = True, _chain: tuple[str, ...] = ()) -> None:
        """Open ``path`` read-only, and its backing chain unless ``open_backing`` is False.

        Without the backing chain, clusters the image does not hold read as zeros:
        use that only to inspect the header (e.g. :attr:`backing_file`).
        """
        self.path = os.fspath(path)
        real = os.path.realpath(self.path)
        if real in _chain:
            raise ConfigError(f"{self.path}: qcow2 backing chain loops back onto itself — recreate the overlay")
        if len(_chain) >= _MAX_BACKING_DEPTH:
            raise ConfigError(f"{self.path}: qcow2 backing chain is deeper than {_MAX_BACKING_DEPTH} — flatten it")
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._backing: ByteSource | None = None
        self._l2_cache: dict[int, tuple[int, ...]] = {}
        try:
            self._parse_header()
            if self.backing_file is not None and open_backing:
                self._backing = self._open_backing(_chain + (real,))
        except BaseException:
            self.close()
            raise

    # header ---------------------------------------------------------------

    def _bad(self, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {what}")

    def _parse_header(self) -> None:
        hdr = _pread_full(self._fd, 4096, 0)
        if len(hdr) < 72 or hdr[:4] != QCOW2_MAGIC:
            raise self._bad("truncated or invalid qcow2 header — re-create or re-download the image")
        (
            version,
            backing_off,
            backing_len,
            cluster_bits,
            size,
            crypt,
            l1_size,
            l1_off,
        ) = struct.unpack_from(">IQIIQIIQ", hdr, 4)
        if version not in (2, 3):
            raise self._bad(f"unsupported qcow2 version {version} — convert it with qemu-img convert -O qcow2")
        if not 9 <= cluster_bits <= 21:
            raise self._bad(f"invalid qcow2 cluster_bits {cluster_bits} — the file is corrupt")
        if crypt != 0:
            raise self._bad("encrypted qcow2 images are not supported — decrypt it with qemu-img convert")
        header_len = 72
        incompat = 0
        if version == 3:
            if len(hdr) < 104:
                raise self._bad("truncated qcow2 v3 header — the file is corrupt")
            incompat = struct.unpack_from(">Q", hdr, 72)[0]
            header_len = struct.unpack_from(">I", hdr, 100)[0]
        if incompat & _QCOW2_INCOMPAT_CORRUPT:
            raise self._bad("qcow2 image is marked corrupt — repair it with qemu-img check -r all, or recreate it")
        if incompat & _QCOW2_INCOMPAT_EXTERNAL_DATA:
            raise self._bad("qcow2 images with an external data file are not supported — convert with qemu-img convert")
        if incompat & _QCOW2_INCOMPAT_EXTENDED_L2:
            raise self._bad("qcow2 images with extended L2 entries are not supported — convert with qemu-img convert")
        known = (
            _QCOW2_INCOMPAT_DIRTY
            | _QCOW2_INCOMPAT_CORRUPT
            | _QCOW2_INCOMPAT_EXTERNAL_DATA
            | _QCOW2_INCOMPAT_COMPRESSION_TYPE
            | _QCOW2_INCOMPAT_EXTENDED_L2
        )
        if incompat & ~known:
            raise self._bad(f"qcow2 uses unknown incompatible features {incompat:#x} — convert with qemu-img convert")
        self.version = version
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.l2_bits = cluster_bits - 3
        self._size = size
        self.backing_format: str | None = None
        self._parse_extensions(hdr, header_len)
        raw_l1 = _pread_full(self._fd, l1_size * 8, l1_off)
        if len(raw_l1) != l1_size * 8:
            raise self._bad("qcow2 L1 table lies past the end of the file — the file is truncated")
        self._l1: tuple[int, ...] = struct.unpack(f">{l1_size}Q", raw_l1)
        self.backing_file: str | None = None
        self.backing_name: str | None = None
        if backing_off and backing_len:
            raw_name = _pread_full(self._fd, backing_len, backing_off)
            name = raw_name.decode("utf-8", errors="replace")
            self.backing_name = name
            if name.startswith("json:") or re.match(r"^[A-Za-z][\w+.-]*:", name):
                raise self._bad(f"backing file {name!r} is not a plain file path, which testbed does not support")
            self.backing_file = name if os.path.isabs(name) else os.path.join(os.path.dirname(self.path), name)

    def _parse_extensions(self, hdr: bytes, pos: int) -> None:
        while pos + 8 <= len(hdr):
            ext_type, ext_len = struct.unpack_from(">II", hdr, pos)
            if ext_type == 0:
                return
            data = hdr[pos + 8 : pos + 8 + ext_len]
            if ext_type == _QCOW2_EXT_BACKING_FORMAT:
                self.backing_format = data.decode("ascii", errors="replace")
            pos += 8 + ((ext_len + 7) & ~7)

    def _open_backing(self, chain: tuple[str, ...]) -> ByteSource:
        assert self.backing_file is not None
        path = self.backing_file
        if not os.path.isfile(path):
            raise ConfigError(
                f"{self.path}: its backing file {path} is missing — the overlay cannot be read without it; "
                "recreate the overlay from an existing base image"
            )
        fmt = self.backing_format
        if fmt is None:
            with open(path, "rb") as fh:
                fmt = "qcow2" if fh.read(4) == QCOW2_MAGIC else "raw"
        if fmt == "raw":
            return RawSource(path)
        if fmt == "qcow2":
            return Qcow2Source(path, _chain=chain)
        raise ConfigError(f"{self.path}: backing format {fmt!r} is not supported (only raw and qcow2)")

    # reading --------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def _l2_table(self, offset: int) -> tuple[int, ...]:
        table = self._l2_cache.get(offset)
        if table is None:
            raw = _pread_full(self._fd, self.cluster_size, offset)
            raw += bytes(self.cluster_size - len(raw))
            table = struct.unpack(f">{self.cluster_size // 8}Q", raw)
            if len(self._l2_cache) > 4096:
                self._l2_cache.clear()
            self._l2_cache[offset] = table
        return table

    def _map(self, pos: int) -> tuple[str, int]:
        """Where guest offset ``pos`` lives: ("data", host cluster), ("zero", 0) or ("backing", 0)."""
        l1_index = pos >> (self.cluster_bits + self.l2_bits)
        if l1_index >= len(self._l1):
            return "backing", 0
        l2_offset = self._l1[l1_index] & _L1_OFFSET_MASK
        if not l2_offset:
            return "backing", 0
        entry = self._l2_table(l2_offset)[(pos >> self.cluster_bits) & ((1 << self.l2_bits) - 1)]
        if entry & _L2_COMPRESSED:
            raise self._bad(
                "compressed qcow2 clusters are not supported — decompress with "
                f"qemu-img convert -O qcow2 {self.path} OUT.qcow2"
            )
        if self.version >= 3 and entry & _L2_ZERO:
            return "zero", 0
        host = entry & _L2_OFFSET_MASK
        if not host:
            return "backing", 0
        return "data", host

    def read(self, offset: int, n: int) -> bytes:
        if n <= 0:
            return b""
        out = bytearray(n)
        pos = offset
        end = min(offset + n, self._size)
        while pos < end:
            in_cluster = pos & (self.cluster_size - 1)
            count = min(self.cluster_size - in_cluster, end - pos)
            kind, host = self._map(pos)
            if kind == "data":
                data = _pread_full(self._fd, count, host + in_cluster)
                out[pos - offset : pos - offset + len(data)] = data
            elif kind == "backing" and self._backing is not None:
                out[pos - offset : pos - offset + count] = self._backing.read(pos, count)
            pos += count
        return bytes(out)

    def close(self) -> None:
        if self._backing is not None:
            self._backing.close()
            self._backing = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def open_source(path: StrPath) -> Iterator[ByteSource]:
    """Open ``path`` read-only as a :class:`ByteSource` (validated by :func:`image_format`)."""
    fmt = image_format(path)
    src: ByteSource = Qcow2Source(path) if fmt == "qcow2" else RawSource(path)
    try:
        yield src
    finally:
        src.close()


def qcow2_backing_file(path: StrPath) -> str | None:
    """The backing file path of a qcow2 image (resolved as qemu does), or None.

    Raises ConfigError if ``path`` is not a qcow2 image.
    """
    if image_format(path) != "qcow2":
        raise ConfigError(f"{os.fspath(path)} is a raw image, not a qcow2")
    with Qcow2Source(path, open_backing=False) as src:
        return src.backing_file


# --------------------------------------------------------------------------
# Format detection


_FOREIGN_FORMATS: tuple[tuple[bytes, str], ...] = (
    (
        b"\x1f\x8b",
        "a gzip-compressed file, not a disk image — decompress it first (gunzip -k {path})",
    ),
    (
        b"\xfd7zXZ\x00",
        "an xz-compressed file, not a disk image — decompress it first (unxz -k {path})",
    ),
    (
        b"\x28\xb5\x2f\xfd",
        "a zstd-compressed file, not a disk image — decompress it first (unzstd {path})",
    ),
    (
        b"BZh",
        "a bzip2-compressed file, not a disk image — decompress it first (bunzip2 -k {path})",
    ),
    (
        b"PK\x03\x04",
        "a zip archive, not a disk image — unzip it first and pass the .img inside",
    ),
    (
        b"KDMV",
        "a VMDK image — convert it first (qemu-img convert -O qcow2 {path} image.qcow2)",
    ),
    (
        b"conectix",
        "a VHD image — convert it first (qemu-img convert -O qcow2 {path} image.qcow2)",
    ),
    (
        b"vhdxfile",
        "a VHDX image — convert it first (qemu-img convert -O qcow2 {path} image.qcow2)",
    ),
    (
        b"<<< Oracle VM VirtualBox Disk Image",
        "a VDI image — convert it first (qemu-img convert -O qcow2 {path} image.qcow2)",
    ),
)


def _read_head(path: str, n: int) -> bytes:
    """First ``n`` bytes of ``path``; ConfigError for missing, directory, unreadable or empty."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(n)
    except FileNotFoundError:
        raise ConfigError(
            f"image not found: {path} — pass --image with the path of a disk image (.img/.qcow2), "
            "or omit it to use the reference image"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"{path} is a directory, not a disk image — pass --image with the path of a disk image file (.img/.qcow2)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read image {path}: {exc.strerror} — check the path and its permissions") from None
    if not head:
        raise ConfigError(
            f"{path} is empty (0 bytes), not a disk image — re-download or rebuild it, "
            "or pass --image with another image"
        )
    return head


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """The four (status, type, start_lba, sectors) entries of an MBR/EBR sector."""
    return [struct.unpack_from("<B3xB3xII", sector, 446 + 16 * i) for i in range(4)]


def _is_valid_mbr(sector: bytes) -> bool:
    """True if ``sector`` carries a plausible MBR partition table (Linux's test)."""
    if len(sector) < 512 or sector[510:512] != MBR_SIGNATURE:
        return False
    return all(status in (0x00, 0x80) for status, _t, _s, _n in _mbr_entries(sector))


def _mbr_table(sector: bytes) -> list[tuple[int, int, int, int]] | None:
    """The MBR entries of ``sector``, or None if it holds no partition table.

    A sector with the 0x55AA signature but no partition entries and a FAT
    boot-sector jump is a bare FAT filesystem, not a partition table.
    """
    if not _is_valid_mbr(sector):
        return None
    entries = _mbr_entries(sector)
    if all(ptype == 0 or count == 0 for _s, ptype, _l, count in entries):
        if sector[0] in (0xEB, 0xE9):
            return None
    return entries


def _has_partition_table(head: bytes) -> bool:
    if _mbr_table(head) is not None:
        return True
    return any(head[lba : lba + 8] == GPT_SIGNATURE for lba in (512, 4096))


def image_format(path: StrPath) -> str:
    """Return "qcow2" or "raw" for a usable disk image at ``path``.

    "qcow2" means the file starts with the qcow2 magic; "raw" means it starts
    with an MBR or GPT partition table. Anything else raises a one-line
    :class:`ConfigError` naming the file and the fix: missing file, directory,
    unreadable file, empty file, compressed download, other VM image format,
    or a file without a partition table.
    """
    p = os.fspath(path)
    head = _read_head(p, 8192)
    if head[:4] == QCOW2_MAGIC:
        return "qcow2"
    if _has_partition_table(head):
        return "raw"
    for magic, hint in _FOREIGN_FORMATS:
        if head.startswith(magic):
            raise ConfigError(f"{p} is " + hint.format(path=p))
    raise ConfigError(_NOT_A_DISK.format(path=p))


# --------------------------------------------------------------------------
# Partition tables


def _gpt_header(src: ByteSource, lba: int, sector: int) -> tuple[int, int, int, int] | None:
    """Validated GPT header at ``lba``: (entries_lba, count, entry_size, alternate_lba), or None."""
    hdr = src.read(lba * sector, sector)
    if hdr[:8] != GPT_SIGNATURE:
        return None
    hdr_size, hdr_crc = struct.unpack_from("<II", hdr, 12)
    if not 92 <= hdr_size <= sector:
        return None
    blank = hdr[:16] + b"\0\0\0\0" + hdr[20:hdr_size]
    if binascii.crc32(blank) != hdr_crc:
        return None
    _my_lba, alt_lba = struct.unpack_from("<QQ", hdr, 24)
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", hdr, 72)
    if entry_size < 128 or entry_size % 8 or count > 4096:
        return None
    table = src.read(entries_lba * sector, count * entry_size)
    if binascii.crc32(table) != entries_crc:
        return None
    return entries_lba, count, entry_size, alt_lba


def _parse_gpt(src: ByteSource, sector: int, image: str) -> list[tuple[int, str, int, int, str]]:
    """GPT partitions as (index, name, start, size, type_guid)."""
    found = _gpt_header(src, 1, sector)
    if found is None:
        primary = src.read(sector, sector)
        alt = struct.unpack_from("<Q", primary, 32)[0] if primary[:8] == GPT_SIGNATURE else 0
        for lba in (alt, src.size // sector - 1):
            if lba > 1:
                found = _gpt_header(src, lba, sector)
                if found is not None:
                    break
    if found is None:
        raise ConfigError(
            f"{image}: the GPT partition table is corrupt (bad checksum in both primary and backup headers) — "
            "re-download or rebuild the image"
        )
    entries_lba, count, entry_size, _alt = found
    table = src.read(entries_lba * sector, count * entry_size)
    parts: list[tuple[int, str, int, int, str]] = []
    for slot in range(count):
        entry = table[slot * entry_size : (slot + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            raise ConfigError(f"{image}: GPT entry {slot + 1} ends before it starts — the image is corrupt")
        name = entry[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        type_guid = str(uuid.UUID(bytes_le=bytes(entry[:16]))).upper()
        parts.append((slot + 1, name, first * sector, (last - first + 1) * sector, type_guid))
    return parts


def _parse_mbr(src: ByteSource, mbr: bytes, image: str) -> list[tuple[int, str, int, int, str]]:
    """MBR partitions as (index, "", start, size, "0xNN"), logical ones numbered from 5."""
    parts: list[tuple[int, str, int, int, str]] = []
    logical = 5
    for slot, (_status, ptype, start, count) in enumerate(_mbr_entries(mbr)):
        if ptype == 0 or count == 0:
            continue
        if ptype not in MBR_EXTENDED_TYPES:
            parts.append((slot + 1, "", start * 512, count * 512, f"{ptype:#04x}"))
            continue
        ebr_lba = start
        seen: set[int] = set()
        while True:
            if ebr_lba in seen or len(seen) > 1024:
                raise ConfigError(f"{image}: the chain of logical partitions loops — the partition table is corrupt")
            seen.add(ebr_lba)
            ebr = src.read(ebr_lba * 512, 512)
            if ebr[510:512] != MBR_SIGNATURE:
                break
            entries = _mbr_entries(ebr)
            nxt = 0
            data_done = False
            for _st, etype, estart, ecount in entries:
                if etype == 0 or ecount == 0:
                    continue
                if etype in MBR_EXTENDED_TYPES:
                    if not nxt:
                        nxt = start + estart
                elif not data_done:
                    parts.append(
                        (
                            logical,
                            "",
                            (ebr_lba + estart) * 512,
                            ecount * 512,
                            f"{etype:#04x}",
                        )
                    )
                    logical += 1
                    data_done = True
            if not nxt:
                break
            ebr_lba = nxt
    parts.sort(key=lambda p: p[0])
    return parts


# --------------------------------------------------------------------------
# Filesystem probing

_EXT_MAGIC = 0xEF53
_EXT_COMPAT_HAS_JOURNAL = 0x0004
_EXT_INCOMPAT_JOURNAL_DEV = 0x0008
_EXT3_INCOMPAT_SUPP = 0x0002 | 0x0004 | 0x0010  # filetype, recover, meta_bg
_EXT3_RO_COMPAT_SUPP = 0x0001 | 0x0002 | 0x0004  # sparse_super, large_file, btree_dir


def _probe_ext(head: bytes) -> tuple[str, str] | None:
    sb = head[1024:2048]
    if len(sb) < 136 or struct.unpack_from("<H", sb, 56)[0] != _EXT_MAGIC:
        return None
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    label = sb[120:136].split(b"\0", 1)[0].decode("utf-8", errors="replace")
    if incompat & _EXT_INCOMPAT_JOURNAL_DEV:
        return "jbd", label
    if incompat & ~_EXT3_INCOMPAT_SUPP or ro_compat & ~_EXT3_RO_COMPAT_SUPP:
        return "ext4", label
    if compat & _EXT_COMPAT_HAS_JOURNAL:
        return "ext3", label
    return "ext2", label


def _fat_label_bytes(raw: bytes) -> str:
    if raw[:1] == b"\x05":
        raw = b"\xe5" + raw[1:]
    return raw.decode("cp850", errors="replace").rstrip(" \0")


def _fat_root_label(entries: bytes) -> str | None:
    """Label from the volume-label entry in a root-directory chunk; "" means end reached."""
    for pos in range(0, len(entries) - 31, 32):
        ent = entries[pos : pos + 32]
        if ent[0] == 0x00:
            return ""
        if ent[0] == 0xE5:
            continue
        attr = ent[11]
        if attr & 0x3F == 0x0F:  # long-file-name slot
            continue
        if attr & 0x08 and not attr & 0x10:
            return _fat_label_bytes(ent[:11])
    return None


def _probe_fat(src: ByteSource, start: int, head: bytes) -> tuple[str, str] | None:
    """("vfat", label) if ``head`` is a FAT12/16/32 boot sector, else None.

    The label is the root-directory volume-label entry (what mlabel and
    ``mkfs.vfat -n`` write and what blkid reports), falling back to the boot
    sector copy.
    """
    if len(head) < 512 or head[0] not in (0xEB, 0xE9):
        return None
    bps, spc, reserved, nfats, root_entries, _tot16, media, fatsz16 = struct.unpack_from("<HBHBHHBH", head, 11)
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1):
        return None
    if reserved == 0 or not 1 <= nfats <= 4 or not (media == 0xF0 or media >= 0xF8):
        return None
    if fatsz16:
        sig_off, label_off = 0x26, 0x2B
    else:
        sig_off, label_off = 0x42, 0x47
    boot_label = ""
    if head[sig_off] == 0x29:
        boot_label = _fat_label_bytes(head[label_off : label_off + 11])
        if boot_label == "NO NAME":
            boot_label = ""
    root_label: str | None = None
    if fatsz16:
        root_off = start + (reserved + nfats * fatsz16) * bps
        root_label = _fat_root_label(src.read(root_off, root_entries * 32))
    else:
        fatsz32, _flags, _ver, cluster = struct.unpack_from("<IHHI", head, 0x24)
        data_off = start + (reserved + nfats * fatsz32) * bps
        cluster_bytes = spc * bps
        for _ in range(64):
            if not 2 <= cluster < 0x0FFFFFF7:
                break
            root_label = _fat_root_label(src.read(data_off + (cluster - 2) * cluster_bytes, cluster_bytes))
            if root_label is not None:
                break
            fat_entry = src.read(start + reserved * bps + cluster * 4, 4)
            cluster = struct.unpack("<I", fat_entry)[0] & 0x0FFFFFFF
    label = root_label if root_label else boot_label
    return "vfat", label


def _probe_fs(src: ByteSource, start: int, size: int) -> tuple[str, str]:
    """(fstype, label) of the filesystem at ``start``; ("unknown", "") if unrecognised."""
    head = src.read(start, min(size, 4096))
    return _probe_ext(head) or _probe_fat(src, start, head) or ("unknown", "")


def _layout_from_source(src: ByteSource, image: str) -> DiskLayout:
    mbr = src.read(0, 512)
    entries = _mbr_table(mbr) or []
    protective = any(ptype == MBR_GPT_PROTECTIVE for _s, ptype, _l, _n in entries)
    raw_parts: list[tuple[int, str, int, int, str]]
    if protective or not entries:
        sector = next((s for s in (512, 4096) if src.read(s, 8) == GPT_SIGNATURE), 0)
        if not sector:
            if not protective:
                raise ConfigError(_NOT_A_DISK.format(path=image))
            sector = 512  # primary header wiped: _parse_gpt tries the backup
        table = "gpt"
        raw_parts = _parse_gpt(src, sector, image)
    else:
        table = "dos"
        raw_parts = _parse_mbr(src, mbr, image)
    parts: list[Partition] = []
    for index, name, start, size, ptype in raw_parts:
        if start + size > src.size:
            raise ConfigError(
                f"{image}: partition {index} ends at byte {start + size} but the disk is only {src.size} bytes — "
                "the image looks truncated; re-download or rebuild it"
            )
        fstype, label = _probe_fs(src, start, size)
        parts.append(Partition(index, name, label, fstype, start, size, ptype))
    return DiskLayout(table, tuple(parts), image, src.size)


def read_layout(path: StrPath) -> DiskLayout:
    """Read the partition table and filesystem labels of a raw or qcow2 image.

    GPT (512- or 4096-byte sectors, backup header used if the primary is
    damaged) and MBR including extended/logical partitions are understood.
    Raises ConfigError for anything that is not a usable disk image, a
    corrupt table, or partitions running past the end of the disk.
    """
    p = os.fspath(path)
    with open_source(p) as src:
        return _layout_from_source(src, p)


# --------------------------------------------------------------------------
# FAT files via mtools


def _run_tool(argv: list[str], *, cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a host tool with no stdin; InfraError if it is missing or hangs."""
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            timeout=_TOOL_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        package = "qemu-utils" if argv[0].startswith("qemu") else "mtools"
        raise InfraError(f"{argv[0]} is not installed on this host — install it (apt-get install {package})") from None
    except subprocess.TimeoutExpired:
        raise InfraError(f"{argv[0]} did not finish within {_TOOL_TIMEOUT} s: {' '.join(argv)}") from None


def _tool_output(proc: subprocess.CompletedProcess[bytes]) -> str:
    text = (proc.stderr + proc.stdout).decode("utf-8", errors="replace")
    return " ".join(text.split())


def _fat_path(inner_path: str) -> str:
    """Normalise ``inner_path`` to mtools' ``::/a/b`` form; ConfigError for empty or '..' paths."""
    parts = [p for p in inner_path.replace("\\", "/").split("/") if p and p != "."]
    if not parts or ".." in parts:
        raise ConfigError(
            f"invalid path inside a FAT partition: {inner_path!r} — use an absolute path like /config.json"
        )
    return "::/" + "/".join(parts)


def _check_partition(src: ByteSource, image: str, partition: Partition) -> None:
    """ConfigError unless ``partition`` lies inside the disk and holds a FAT filesystem now."""
    if partition.start < 0 or partition.end > src.size:
        raise ConfigError(f"{image}: {partition.describe()} lies outside the {src.size}-byte disk")
    fstype, _label = _probe_fs(src, partition.start, partition.size)
    if fstype != "vfat":
        raise ConfigError(f"{image}: {partition.describe()} does not hold a FAT filesystem (found {fstype})")


def extract_partition(src: ByteSource, partition: Partition, dest: StrPath) -> None:
    """Copy the partition's bytes from ``src`` into a new sparse file ``dest``."""
    zero = bytes(_CHUNK)
    fd = os.open(os.fspath(dest), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for off in range(0, partition.size, _CHUNK):
            n = min(_CHUNK, partition.size - off)
            data = src.read(partition.start + off, n)
            if data != zero[:n]:
                os.pwrite(fd, data, off)
        os.ftruncate(fd, partition.size)
    finally:
        os.close(fd)


def read_file_from_fat(path: StrPath, partition: Partition, inner_path: str) -> bytes:
    """Contents of ``inner_path`` (e.g. "/config.json") in a FAT partition of an image.

    Raw images are read in place with ``mtype -i IMAGE@@OFFSET`` (which opens
    the file read-only); for qcow2 the partition is first copied to a
    temporary file. ConfigError if the partition is not FAT or the file is
    not there.
    """
    p = os.fspath(path)
    target = _fat_path(inner_path)
    with (
        open_source(p) as src,
        tempfile.TemporaryDirectory(prefix="testbed-fat-") as tmp,
    ):
        _check_partition(src, p, partition)
        if isinstance(src, RawSource):
            spec = f"{p}@@{partition.start}"
        else:
            spec = os.path.join(tmp, "partition.img")
            extract_partition(src, partition, spec)
        proc = _run_tool(["mtype", "-i", spec, target])
    if proc.returncode != 0:
        detail = _tool_output(proc)
        if "not found" in detail or "no match" in detail.lower():
            raise ConfigError(
                f"{target[2:]} not found in {partition.describe()} of {p} — "
                "is this a balenaOS image with that file on its boot partition?"
            )
        raise InfraError(f"mtype could not read {target[2:]} from {partition.describe()} of {p}: {detail}")
    return proc.stdout


def read_config_json(path: StrPath, label: str = _DEFAULT_LABEL) -> dict[str, Any]:
    """Parse ``/config.json`` from the partition labelled ``label``.

    ConfigError if the partition or file is missing, or the file is not a
    UTF-8 JSON object (the message gives the JSON error's line and column).
    """
    p = os.fspath(path)
    part = read_layout(p).by_label(label)
    raw = read_file_from_fat(p, part, "/config.json")
    where = f"{p}: /config.json in the {part.label or label} partition"
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}) — fix or regenerate it") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos}) — "
            "fix or regenerate it"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} holds a JSON {type(data).__name__}, not an object — fix or regenerate it")
    return data


# --------------------------------------------------------------------------
# Editing a FAT partition inside a qcow2 overlay

_QEMU_IO_ERROR = re.compile(r"(?i)\b(error|failed|fail|could not|cannot|unable|invalid|permission denied)\b")
_DIFF_BLOCK = 4096


def _changed_runs(src: ByteSource, partition: Partition, edited: str) -> list[tuple[int, int]]:
    """(offset, length) runs, relative to the partition, where ``edited`` differs from ``src``."""
    runs: list[tuple[int, int]] = []
    with open(edited, "rb") as fh:
        for base in range(0, partition.size, _CHUNK):
            n = min(_CHUNK, partition.size - base)
            old = src.read(partition.start + base, n)
            new = fh.read(n)
            new += bytes(n - len(new))
            if old == new:
                continue
            for off in range(0, n, _DIFF_BLOCK):
                end = min(off + _DIFF_BLOCK, n)
                if old[off:end] == new[off:end]:
                    continue
                if runs and runs[-1][0] + runs[-1][1] == base + off:
                    runs[-1] = (runs[-1][0], runs[-1][1] + end - off)
                else:
                    runs.append((base + off, end - off))
    return runs


def write_files_to_fat_in_overlay(overlay_qcow2: StrPath, partition: Partition, files: Mapping[str, bytes]) -> None:
    """Write ``files`` ({"/path/in/fat": content}) into a FAT partition of a qcow2 overlay.

    Only a qcow2 with a backing file is accepted (ConfigError otherwise), so
    a user's own image is never touched. The partition is copied out of the
    overlay to a temporary file, edited with mtools (``mmd`` for missing
    directories, ``mcopy -o`` for files), and the changed 4 KiB blocks are
    written back into the overlay with ``qemu-io``, which opens the backing
    file read-only. qemu-io's exit status and output are checked and the
    written bytes are read back and compared; InfraError if any of that
    fails (e.g. a QEMU process holds the overlay's write lock).
    """
    p = os.fspath(overlay_qcow2)
    if image_format(p) != "qcow2":
        raise ConfigError(
            f"refusing to write to {p}: it is a raw image and testbed never edits a user's image — "
            f"edit a qcow2 overlay instead (qemu-img create -f qcow2 -F raw -b {p} overlay.qcow2)"
        )
    targets = {_fat_path(name): bytes(data) for name, data in files.items()}
    with Qcow2Source(p) as src:
        if src.backing_file is None:
            raise ConfigError(
                f"refusing to write to {p}: it is a qcow2 without a backing file, not an overlay, and testbed "
                "never edits a user's image — create one (qemu-img create -f qcow2 -F raw -b BASE overlay.qcow2)"
            )
        _check_partition(src, p, partition)
        with tempfile.TemporaryDirectory(prefix="testbed-fat-") as tmp:
            part_file = os.path.join(tmp, "partition.img")
            extract_partition(src, partition, part_file)
            _mtools_put(part_file, targets, tmp)
            runs = _changed_runs(src, partition, part_file)
            if not runs:
                return
            _qemu_io_write(p, partition, part_file, runs, tmp)
            _verify_written(p, partition, part_file, runs)


def _mtools_put(part_file: str, targets: Mapping[str, bytes], tmp: str) -> None:
    """Copy ``targets`` into the FAT filesystem in ``part_file`` with mmd/mcopy."""
    dirs = sorted({t.rsplit("/", 1)[0] for t in targets if t.count("/") > 1}, key=len)
    made: set[str] = set()
    for d in dirs:
        parts = d[3:].split("/")
        for i in range(1, len(parts) + 1):
            sub = "::/" + "/".join(parts[:i])
            if sub not in made:
                _run_tool(["mmd", "-D", "s", "-i", part_file, sub])  # fails harmlessly if it exists
                made.add(sub)
    payload = os.path.join(tmp, "payload")
    for target, data in targets.items():
        with open(payload, "wb") as fh:
            fh.write(data)
        proc = _run_tool(["mcopy", "-o", "-i", part_file, payload, target])
        if proc.returncode != 0:
            detail = _tool_output(proc)
            if "full" in detail.lower():
                raise ConfigError(
                    f"no room for {target[2:]} ({len(data)} bytes) in the FAT partition: {detail} — "
                    "write fewer or smaller files, or use an image with a bigger boot partition"
                )
            raise InfraError(f"mcopy could not write {target[2:]} into the FAT partition: {detail}")


def _qemu_io_write(
    overlay: str,
    partition: Partition,
    part_file: str,
    runs: list[tuple[int, int]],
    tmp: str,
) -> None:
    """Write the ``runs`` of ``part_file`` into ``overlay`` at the partition's offset with qemu-io."""
    argv = ["qemu-io", "-f", "qcow2"]
    with open(part_file, "rb") as fh:
        for i, (off, length) in enumerate(runs):
            fh.seek(off)
            name = f"run-{i}.bin"  # relative to cwd: qemu-io splits commands on blanks
            with open(os.path.join(tmp, name), "wb") as out:
                out.write(fh.read(length))
            argv += ["-c", f"write -q -s {name} {partition.start + off} {length}"]
    argv.append(os.path.abspath(overlay))
    proc = _run_tool(argv, cwd=tmp)
    output = _tool_output(proc)
    if proc.returncode != 0 or _QEMU_IO_ERROR.search(output):
        hint = " — is a QEMU still running on it?" if "lock" in output.lower() else ""
        raise InfraError(
            f"qemu-io failed to write {partition.describe()} into {overlay} (exit {proc.returncode}): {output}{hint}"
        )


def _verify_written(overlay: str, partition: Partition, part_file: str, runs: list[tuple[int, int]]) -> None:
    """InfraError unless the overlay now reads back the edited bytes."""
    with Qcow2Source(overlay) as fresh, open(part_file, "rb") as fh:
        for off, length in runs:
            fh.seek(off)
            if fresh.read(partition.start + off, length) != fh.read(length):
                raise InfraError(
                    f"qemu-io reported success but {overlay} does not read back what was written at byte "
                    f"{partition.start + off} of {partition.describe()}"
                )


def write_config_json(overlay_qcow2: StrPath, config: Mapping[str, Any], label: str = _DEFAULT_LABEL) -> None:
    """Replace ``/config.json`` in the partition labelled ``label`` of a qcow2 overlay.

    The JSON is indented by 4 and ends with a newline. Same refusals and
    errors as :func:`write_files_to_fat_in_overlay`.
    """
    p = os.fspath(overlay_qcow2)
    try:
        text = json.dumps(config, indent=4) + "\n"
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config.json for {p} cannot be written as JSON: {exc}") from None
    part = read_layout(p).by_label(label)
    write_files_to_fat_in_overlay(p, part, {"/config.json": text.encode("utf-8")})


# --------------------------------------------------------------------------
# SHA-256 of (sparse) image files

_HASH_BLOCK = 4 << 20
_ZEROS = bytes(_HASH_BLOCK)
_CACHE_FILE = "sha256-cache.json"
_CACHE_MAX_ENTRIES = 256


def _hash_zeros(h: Any, n: int) -> None:
    while n > 0:
        step = min(n, _HASH_BLOCK)
        h.update(_ZEROS if step == _HASH_BLOCK else _ZEROS[:step])
        n -= step


def _hash_fd(fd: int, size: int, path: str) -> str:
    """SHA-256 of the first ``size`` bytes of ``fd``, reading only its data extents."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    sparse = hasattr(os, "SEEK_DATA")
    pos = 0
    while pos < size:
        data_start, data_end = pos, size
        if sparse:
            try:
                data_start = min(os.lseek(fd, pos, os.SEEK_DATA), size)
                data_end = min(os.lseek(fd, data_start, os.SEEK_HOLE), size) if data_start < size else size
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                    data_start = data_end = size
                else:  # filesystem without SEEK_DATA support: read everything
                    sparse = False
                    data_start, data_end = pos, size
        _hash_zeros(h, data_start - pos)
        pos = data_start
        while pos < data_end:
            n = os.preadv(fd, [view[: min(_HASH_BLOCK, data_end - pos)]], pos)
            if n <= 0:
                raise ConfigError(f"{path} shrank while it was being hashed — do not modify the image during a run")
            h.update(view[:n])
            pos += n
    return h.hexdigest()


def _cache_path() -> Path:
    root = os.environ.get("TESTBED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "testbed")
    return Path(root) / _CACHE_FILE


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "dev": st.st_dev,
    }


def _load_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == 1 else None
    return entries if isinstance(entries, dict) else {}


def _store_cache(path: Path, real: str, key: dict[str, int], digest: str) -> None:
    """Add one entry to the cache file atomically; cache problems are silently ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _load_cache(path)
        entries[real] = {**key, "sha256": digest, "used": time.time()}
        if len(entries) > _CACHE_MAX_ENTRIES:
            newest = sorted(entries.items(), key=lambda kv: kv[1].get("used", 0), reverse=True)
            entries = dict(newest[:_CACHE_MAX_ENTRIES])
        fd, tmp = tempfile.mkstemp(prefix=".sha256-cache-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"version": 1, "entries": entries}, fh, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def sha256_file(path: StrPath, *, use_cache: bool = True) -> str:
    """Hex SHA-256 of a file's contents, equal to ``sha256sum PATH``.

    Holes of sparse files are found with SEEK_DATA/SEEK_HOLE and hashed from a
    block of zeros in memory instead of being read. Results are cached in
    ``$TESTBED_CACHE/sha256-cache.json`` (default ``~/.cache/testbed``) keyed by
    the real path and its size, mtime_ns, ctime_ns, inode and device, so an
    unchanged file is not hashed twice; an unusable cache is ignored.
    ConfigError if the path is missing or not a regular file.
    """
    p = os.fspath(path)
    real = os.path.realpath(p)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"cannot hash {p}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot hash {p}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"cannot hash {p}: not a regular file")
        key = _stat_key(st)
        cache = _cache_path()
        if use_cache:
            hit = _load_cache(cache).get(real)
            if isinstance(hit, dict) and all(hit.get(k) == v for k, v in key.items()):
                digest = hit.get("sha256")
                if isinstance(digest, str) and len(digest) == 64:
                    return digest
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        digest = _hash_fd(fd, st.st_size, p)
        after = _stat_key(os.fstat(fd))
    finally:
        os.close(fd)
    if use_cache and after == key:
        _store_cache(cache, real, key, digest)
    return digest


def edit_ext4_in_overlay(
    overlay_qcow2: StrPath,
    partition: Partition,
    files: Mapping[str, bytes | None],
    commands: tuple[str, ...] = (),
) -> None:
    """Replace (bytes) or delete (None) files in an ext2/3/4 partition of a qcow2 overlay.

    ``commands`` are further debugfs requests run after the file edits (for example
    ``set_super_value volume_name NEW`` to relabel the filesystem).

    For making a defective copy of an image offline (the proofs that each suite check can
    fail): the partition is copied out of the overlay, edited with ``debugfs -w`` (no mount,
    no loop device), and the changed blocks are written back with ``qemu-io``, exactly as
    :func:`write_files_to_fat_in_overlay` does. New files keep the mode of the file they
    replace (0644 if new). Same refusals as that function: never a user's image.
    """
    p = os.fspath(overlay_qcow2)
    if image_format(p) != "qcow2":
        raise ConfigError(f"refusing to write to {p}: testbed edits only qcow2 overlays, never a user's image")
    if not partition.fstype.startswith("ext"):
        raise ConfigError(f"{partition.describe()} of {p} is not ext2/3/4; edit_ext4_in_overlay cannot edit it")
    with Qcow2Source(p) as src:
        if src.backing_file is None:
            raise ConfigError(f"refusing to write to {p}: a qcow2 without a backing file is not an overlay")
        with tempfile.TemporaryDirectory(prefix="testbed-ext4-") as tmp:
            part_file = os.path.join(tmp, "partition.img")
            extract_partition(src, partition, part_file)
            script = []
            for i, (path, data) in enumerate(files.items()):
                if not path.startswith("/") or any(c in path for c in ' "\n'):
                    raise ConfigError(f"edit_ext4_in_overlay: {path!r} must be an absolute path without blanks")
                mode = _ext4_mode(part_file, path)
                script.append(f"rm {path}")
                if data is not None:
                    payload = os.path.join(tmp, f"payload-{i}")
                    with open(payload, "wb") as fh:
                        fh.write(data)
                    directory, name = path.rsplit("/", 1)
                    script += [f"cd {directory or '/'}", f"write {payload} {name}", "cd /"]
                    script.append(f"set_inode_field {path} mode 0{(mode or 0o100644):o}")
            script += list(commands)
            script_file = os.path.join(tmp, "debugfs.cmds")
            with open(script_file, "w") as fh:
                fh.write("\n".join(script) + "\n")
            proc = _run_tool(["debugfs", "-w", "-f", script_file, part_file])
            if proc.returncode != 0 or b"error" in (proc.stderr or b"").lower():
                raise InfraError(f"debugfs could not edit {partition.describe()}: {_tool_output(proc)}")
            runs = _changed_runs(src, partition, part_file)
            if not runs:
                return
            _qemu_io_write(p, partition, part_file, runs, tmp)
            _verify_written(p, partition, part_file, runs)


def read_file_from_ext(path: StrPath, partition: Partition, inner_path: str) -> bytes:
    """The content of ``inner_path`` in an ext2/3/4 partition of an image (raw or qcow2), read with debugfs."""
    p = os.fspath(path)
    with open_source(p) as src, tempfile.TemporaryDirectory(prefix="testbed-ext4-") as tmp:
        part_file = os.path.join(tmp, "partition.img")
        extract_partition(src, partition, part_file)
        out = os.path.join(tmp, "out")
        proc = _run_tool(["debugfs", "-R", f"dump {inner_path} {out}", part_file])
        if not os.path.exists(out):
            raise ConfigError(f"{p}: no file {inner_path} in {partition.describe()} ({_tool_output(proc)})")
        with open(out, "rb") as fh:
            return fh.read()


def _ext4_mode(part_file: str, path: str) -> int | None:
    """The inode mode of ``path`` in an ext filesystem image, or None if it does not exist."""
    proc = _run_tool(["debugfs", "-R", f"stat {path}", part_file])
    found = re.search(rb"Mode:\s+(\d+)", proc.stdout or b"")
    type_ = re.search(rb"Type: (\w+)", proc.stdout or b"")
    if not found:
        return None
    kind = 0o100000 if not type_ or type_.group(1) == b"regular" else 0o120000
    return kind | int(found.group(1), 8)
