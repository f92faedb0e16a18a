"""Compressed OS images (.img.zip, .img.gz, .img.xz, .img.zst) unpacked once into testbed's cache.

balena's downloads come compressed; QEMU boots only a raw image or a qcow2. ``local_image``
turns the file the user gave into one QEMU can boot:

* a raw image or a qcow2 (anything not compressed) is returned as is;
* a compressed file is unpacked into ``<cache>/unpacked/<sha256 of the compressed file>/<name
  without the compression suffix>`` and that path is returned. The unpacking happens once per
  compressed file: a later call finds the image under its final name and returns at once.

The compression is told by the file's first bytes (gzip 1f8b, xz fd377a585a00, zstd 28b52ffd,
zip 504b0304); a file whose name says one compression and whose bytes say another (or none) is
refused, since it is a broken or misnamed download.

Guarantees:

* the user's file is only read; nothing is written beside it;
* the image is written to a temporary file in its cache directory and renamed into place when
  complete, verified (the format's own checks: gzip's CRC, xz's check, zip's CRC, zstd's frame
  structure and checksum) and found to be a disk image; a killed run leaves at most a temporary
  file, removed by the next unpacking of that file (under a lock, so a concurrent run's partial
  is never touched);
* the image is written sparse (all-zero 64 KiB blocks are seeked over, then the file is
  truncated to its size), so mostly-empty images take little disk, and it is made read-only
  (0444) like the reference image.

Decompression is ``testbed.flash.blockdev.open_image``'s (shared with the board flasher); a zip
member is streamed with ``zipfile``, never extracted to a directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from testbed.errors import ConfigError, InfraError
from testbed.flash.blockdev import (
    CHUNK,
    GZIP_MAGIC,
    XZ_MAGIC,
    ZSTD_MAGIC,
    ImageReader,
    _decode_errors,
    _read_full,
    _write_chunk,
    open_image,
    xz_uncompressed_size,
)
from testbed.image import image_format, qcow2_backing_file, sha256_file
from testbed.util import cache_dir as default_cache_dir

__all__ = ["COMPRESSED_SUFFIXES", "Progress", "is_compressed", "local_image", "zstd_frames"]

Progress = Callable[[int, int], None]
"""``progress(done, total)``: ``done`` is the bytes of the unpacked image written so far, ``total``
the unpacked size where the file says it cheaply (zip: the member's size; xz: its index; zstd: the
frames' content sizes; gzip: its trailer when plausible, see ``_size_hint``), else 0. Called at
the start, at most every ``_PROGRESS_INTERVAL`` seconds, and last with ``(size, size)``."""

_SUFFIX_FORMAT = {".zip": "zip", ".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
COMPRESSED_SUFFIXES: tuple[str, ...] = tuple(_SUFFIX_FORMAT)
"""File name endings of the compressed images testbed unpacks (the content decides, not the name)."""

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (GZIP_MAGIC, "gzip"),
    (XZ_MAGIC, "xz"),
    (ZSTD_MAGIC, "zstd"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty archive: refused later as holding no disk image
)
_IMAGE_SUFFIXES = (".img", ".raw", ".qcow2")
_MIN_IMAGE_SIZE = 1 << 20  # a member this large may be an image even without an image suffix
_MAX_LISTED = 12
_PROGRESS_INTERVAL = 0.2
_PARTIAL_PREFIX = ".partial-"
_FOUR_GIB = 1 << 32


# --------------------------------------------------------------------------
# What the file is


def _compression(path: Path) -> str | None:
    """The compression of ``path`` by its first bytes: "gzip", "xz", "zstd", "zip", or None.

    ConfigError if the file is missing or unreadable, or if its name ends in a compression
    suffix that its content does not match.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise ConfigError(f"image not found: {path} — check the path given to --image") from None
    except IsADirectoryError:
        raise ConfigError(
            f"{path} is a directory, not a disk image — pass --image with the image file itself"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read image {path}: {exc.strerror} — check the path and its permissions") from None
    found = next((fmt for magic, fmt in _MAGICS if head.startswith(magic)), None)
    named = _SUFFIX_FORMAT.get(path.suffix.lower())
    if named is not None and found != named:
        actual = (
            f"it is {found}-compressed" if found else ("it is empty" if not head else f"its content is not {named}")
        )
        raise ConfigError(
            f"{path} is named {path.suffix} but is not a {named} file ({actual}) — re-download it, "
            "or rename it to what it holds"
        )
    return found


def is_compressed(path: Path) -> bool:
    """True if ``path`` is a gzip, xz, zstd or zip file (by its content), which ``local_image`` unpacks.

    ConfigError for a missing or unreadable file, and for a file named ``.gz``/``.xz``/``.zst``/
    ``.zip`` whose content is not that.
    """
    return _compression(Path(path)) is not None


# --------------------------------------------------------------------------
# Sizes and the zstd frame walk


def zstd_frames(path: Path) -> tuple[bool, int | None]:
    """Walk the frame and block headers of a .zst file without decompressing it.

    Returns (complete, content size): ``complete`` is False when the file ends inside a frame
    or holds something else after its frames (a truncated download); the content size is the sum
    of the frames' declared sizes, None if a frame does not declare one. zstandard's stream reader
    returns a short result instead of an error for a truncated file, so this check is what
    catches one. Costs one 3-byte read per block (at most 128 KiB of content each).
    """
    total: int | None = 0
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos = 0
        while pos < end:
            f.seek(pos)
            head = f.read(18)
            if len(head) < 8:
                return False, None
            magic = int.from_bytes(head[:4], "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != 0xFD2FB528:
                return False, None
            pos, size = _zstd_frame(f, pos, head)
            if pos < 0:
                return False, None
            total = None if size is None or total is None else total + size
    return pos == end, total


def _zstd_frame(f: BinaryIO, pos: int, head: bytes) -> tuple[int, int | None]:
    """The end of the zstd frame starting at ``pos`` (``head``: its first bytes) and its content size.

    The end is -1 when the frame is malformed or cut short.
    """
    descriptor = head[4]
    single_segment = bool(descriptor & 0x20)
    fcs_len = (0, 2, 4, 8)[descriptor >> 6] or (1 if single_segment else 0)
    did_len = (0, 1, 2, 4)[descriptor & 0x03]
    at = 5 + (0 if single_segment else 1) + did_len
    size = int.from_bytes(head[at : at + fcs_len], "little") if fcs_len else None
    if size is not None and fcs_len == 2:
        size += 256  # the 2-byte field is stored minus 256
    pos += at + fcs_len
    while True:
        f.seek(pos)
        block = f.read(3)
        if len(block) < 3:
            return -1, None
        header = int.from_bytes(block, "little")
        kind, length = (header >> 1) & 0x03, header >> 3
        if kind == 3:  # reserved: not a zstd block
            return -1, None
        pos += 3 + (1 if kind == 1 else length)  # an RLE block stores its one byte
        if header & 0x01:  # the last block
            return pos + (4 if descriptor & 0x04 else 0), size


def _size_hint(path: Path, fmt: str) -> int:
    """The unpacked size if the file tells it without decompressing, else 0."""
    if fmt == "xz":
        return xz_uncompressed_size(path) or 0
    if fmt == "zstd":
        return zstd_frames(path)[1] or 0
    if fmt == "gzip":
        # ISIZE, the trailer's last 4 bytes, is the size modulo 4 GiB (and only of the last member):
        # unknown once the compressed file itself is that large; the progress drops a hint that
        # the unpacking outgrows.
        size = path.stat().st_size
        if size >= _FOUR_GIB or size < 18:
            return 0
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return int(struct.unpack("<I", f.read(4))[0])
    return 0


# --------------------------------------------------------------------------
# Zip archives


def _looks_like_image(member: zipfile.ZipInfo) -> bool:
    name = PurePosixPath(member.filename)
    # macOS's zip adds __MACOSX/._<name> resource forks beside every file, .img ones included.
    if member.is_dir() or name.parts[0] == "__MACOSX" or name.name.startswith("._"):
        return False
    return name.suffix.lower() in _IMAGE_SUFFIXES or member.file_size >= _MIN_IMAGE_SIZE


def _image_member(source: Path, archive: zipfile.ZipFile) -> zipfile.ZipInfo:
    """The archive's one disk image: by suffix (.img, .raw, .qcow2) if any member has one, else by size."""
    files = [m for m in archive.infolist() if not m.is_dir()]
    candidates = [m for m in files if _looks_like_image(m)]
    by_suffix = [m for m in candidates if PurePosixPath(m.filename).suffix.lower() in _IMAGE_SUFFIXES]
    images = by_suffix or candidates
    if len(images) != 1:
        listed = ", ".join(f"{m.filename} ({m.file_size} bytes)" for m in files[:_MAX_LISTED]) or "none"
        if len(files) > _MAX_LISTED:
            listed += f", and {len(files) - _MAX_LISTED} more"
        what = "no disk image" if not images else f"{len(images)} files that look like disk images"
        raise ConfigError(
            f"zip archive {source} holds {what} (members: {listed}) — give a zip with exactly one .img, "
            "or the .img itself"
        )
    member = images[0]
    if member.flag_bits & 0x01:
        raise ConfigError(f"{member.filename} in {source} is encrypted — unzip it yourself and give the .img")
    return member


@contextlib.contextmanager
def _open_stream(source: Path, fmt: str) -> Iterator[tuple[ImageReader, int]]:
    """A reader of the image inside ``source`` and its size hint (0: unknown)."""
    if fmt != "zip":
        with open_image(source, fmt) as reader:
            yield reader, _size_hint(source, fmt)
        return
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"{source} is not a valid zip archive ({exc}) — re-download it") from None
    with archive:
        member = _image_member(source, archive)
        try:
            stream = archive.open(member)
        except NotImplementedError as exc:  # Deflate64 (Windows Explorer's for large files), ...
            raise ConfigError(
                f"{member.filename} in {source} uses a compression Python cannot read ({exc}) — "
                "unzip it with another tool (unzip, 7z) and give the .img"
            ) from None
        assert isinstance(stream, zipfile.ZipExtFile)  # typeshed says IO[bytes], which has no readinto
        with stream:
            yield stream, member.file_size


# --------------------------------------------------------------------------
# Unpacking


class _Reporter:
    """Calls ``progress`` at most every ``_PROGRESS_INTERVAL`` seconds; a hint the data outgrows becomes 0."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.last = progress, total, 0.0
        self.report(0)

    def report(self, done: int) -> None:
        if self.progress is None:
            return
        if done > self.total:
            self.total = 0
        now = time.monotonic()
        if done == 0 or now - self.last >= _PROGRESS_INTERVAL:
            self.last = now
            self.progress(done, self.total)

    def finish(self, size: int) -> None:
        if self.progress is not None:
            self.progress(size, size)


def _cache_error(where: Path, exc: OSError) -> InfraError:
    """The cache, not the user's file, failed (disk full, read-only): the host's problem."""
    return InfraError(
        f"cannot write testbed's cache {where}: {exc.strerror or exc} — free space there, or set "
        "TESTBED_CACHE to a writable directory with room for the unpacked image"
    )


def _corrupt(source: Path, fmt: str, why: object) -> ConfigError:
    return ConfigError(
        f"{source} is a corrupt or truncated {fmt} file ({why}) — re-download it (check its sha256 "
        "against the download page's if it has one)"
    )


def _copy_sparse(source: Path, fmt: str, fd: int, cache: Path, progress: Progress | None) -> int:
    """Unpack ``source`` into ``fd`` (new and empty, in ``cache``), seeking over zero blocks; returns the size.

    The caller maps an OSError escaping from here to the cache: the user's file's are mapped here.
    """
    decode_errors: tuple[type[BaseException], ...] = (*_decode_errors(fmt), zipfile.BadZipFile)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    try:
        with _open_stream(source, fmt) as (reader, hint):
            reporter = _Reporter(progress, hint)
            while n := _read_full(reader, view):
                try:
                    _write_chunk(fd, view[:n], done, True)
                except OSError as exc:
                    raise _cache_error(cache, exc) from None
                done += n
                reporter.report(done)
    except decode_errors as exc:
        raise _corrupt(source, fmt, exc) from None
    except OSError as exc:  # reading the user's file (BadGzipFile, an OSError, is caught above)
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc} — check the file and its disk") from None
    os.ftruncate(fd, done)  # the zero blocks seeked over at the end still belong to the image
    reporter.finish(done)
    return done


def _check_disk_image(source: Path, unpacked: str) -> None:
    """ConfigError unless what ``source`` unpacked to is a raw disk image or a standalone qcow2."""
    try:
        fmt = image_format(unpacked)
    except ConfigError:
        raise ConfigError(
            f"{source} holds no disk image: what it unpacks to has no MBR or GPT partition table and is "
            "not a qcow2 — give the OS image (.img, .qcow2) or its .zip/.gz/.xz/.zst download"
        ) from None
    if fmt == "qcow2" and qcow2_backing_file(unpacked) is not None:
        raise ConfigError(
            f"{source} holds a qcow2 with a backing file, which cannot travel in an archive — give a "
            "standalone image (qemu-img convert -O qcow2 in.qcow2 out.qcow2)"
        )


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:  # removed meanwhile: "changed"
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _unpack(source: Path, fmt: str, final: Path, progress: Progress | None) -> None:
    """Unpack ``source`` to a temporary file beside ``final``, check it, and rename it to ``final``."""
    before = _stat_key(source)
    if fmt == "zstd":
        _require_zstandard(source)
        if not zstd_frames(source)[0]:
            raise _corrupt(source, fmt, "the file ends inside a frame or has data after its frames")
    try:
        fd, partial = tempfile.mkstemp(prefix=_PARTIAL_PREFIX, dir=final.parent)
    except OSError as exc:
        raise _cache_error(final.parent, exc) from None
    try:
        try:
            _copy_sparse(source, fmt, fd, final.parent, progress)
            os.fchmod(fd, 0o444)  # as the reference image: nothing may write to it, QEMU boots an overlay
            os.fsync(fd)  # before the rename: a crash must not leave a hollow file under the final name
        finally:
            os.close(fd)
        if _stat_key(source) != before:
            raise ConfigError(f"{source} changed while it was unpacked — do not modify it during a run")
        _check_disk_image(source, partial)
        os.rename(partial, final)
    except OSError as exc:  # the user's file's errors are ConfigErrors by now: this is the cache's
        raise _cache_error(final.parent, exc) from None
    finally:
        if not final.exists():  # failed or interrupted (BaseException included): no partial stays
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
    with contextlib.suppress(OSError):  # the rename's directory entry to disk; best effort
        dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _require_zstandard(source: Path) -> None:
    """ConfigError naming the file and the package when the optional ``zstandard`` is missing."""
    try:
        import zstandard  # noqa: F401 - optional dependency (testbed[boards]), needed only for .zst
    except ImportError:
        raise ConfigError(
            f"{source} is zstd-compressed: unpacking it needs the 'zstandard' Python package — "
            "pip install zstandard (or unzstd it yourself and give the .img)"
        ) from None


def _unpacked_name(path: Path) -> str:
    """``os.img.gz`` -> ``os.img``; a name left empty or hidden by that (``.gz``) becomes ``image``."""
    name = path.name[: -len(path.suffix)] if path.suffix.lower() in _SUFFIX_FORMAT else path.name
    return name.lstrip(".") or "image"


def local_image(path: Path, *, cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """A path QEMU can boot for the image file ``path``.

    Not compressed (a raw image or a qcow2; ``image_format`` judges it afterwards): ``path`` itself.
    Compressed (gzip, xz, zstd, or a zip holding one image): the unpacked image, at
    ``<cache_dir>/unpacked/<sha256 of path>/<name without the compression suffix>``, unpacked on
    the first call and found there on later ones. ``cache_dir`` defaults to
    ``testbed.util.cache_dir()`` ($TESTBED_CACHE or ~/.cache/testbed); the sha256 comes from
    ``testbed.image.sha256_file``, cached by stat. ``progress``: see ``Progress``.

    ConfigError (one line naming the file and the fix) for a missing or unreadable file, a
    misnamed one, a corrupt or truncated one, a zip without exactly one image, a missing
    ``zstandard`` package for .zst, and content that is not a disk image. InfraError if the cache
    cannot be written (disk full). No partial image is ever left under the final name.
    """
    path = Path(path)
    fmt = _compression(path)
    if fmt is None:
        return path
    digest = sha256_file(path)
    unpacked = (cache_dir if cache_dir is not None else default_cache_dir()) / "unpacked"
    final = unpacked / digest / _unpacked_name(path)
    if final.is_file():
        return final
    try:
        unpacked.mkdir(parents=True, exist_ok=True)
        lock = open(unpacked / f"{digest}.lock", "a")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise _cache_error(unpacked, exc) from None
    with lock:
        # One process unpacks a given file at a time; the lock goes with the descriptor, also when
        # its holder is killed, so whatever partial file is found below is a dead run's.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_file():  # another run unpacked it while this one waited
            return final
        try:
            final.parent.mkdir(exist_ok=True)
            for stale in final.parent.glob(_PARTIAL_PREFIX + "*"):
                stale.unlink()
        except OSError as exc:
            raise _cache_error(final.parent, exc) from None
        try:
            _unpack(path, fmt, final, progress)
        except BaseException:
            with contextlib.suppress(OSError):  # removed only when empty: a failed unpacking leaves nothing
                final.parent.rmdir()
            raise
    return final
