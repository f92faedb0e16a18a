"""Writing an OS image to a block device (SD card reader, USB mass-storage gadget).

The image may be raw or compressed with gzip, xz or zstd (told apart by their magic
bytes, not by the file name); it is decompressed while it streams to the device,
never unpacked to disk first. Before anything is written the target is checked
(``testbed.flash.disks``) and the uncompressed size is compared with the device size.

Zero blocks. All-zero 64 KiB blocks of the image are skipped only where the target is
known to read back zeros already:

* a regular file target: the range is hole-punched first (fallocate PUNCH_HOLE), or
  the file is new; holes read as zeros by definition;
* a block device: the range is discarded first with BLKDISCARD when the device
  supports it. Linux does not promise that discarded blocks read as zeros (an SD card
  erases to 0x00 or 0xFF, as its SCR says), so zero blocks are skipped only when the
  read-back verification runs; it catches a card that does not read zeros, and the
  message says to set ``discard: false``. Without discard support, or with
  ``discard: false`` or ``verify: false``, zero blocks are written like any other.

The data goes through the page cache and is fsync'ed at the end; the verification
then reads the written length back with O_DIRECT (bypassing the cache, so it reads
what the device holds) where the target allows it, and compares SHA-256 hashes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gzip
import hashlib
import io
import lzma
import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from testbed.errors import ConfigError, InfraError
from testbed.flash.base import FlashResult, Progress
from testbed.flash.disks import Target, check_target
from testbed.power.spec import internal

CHUNK = 1 << 20
SEGMENT = 64 << 10
SECTOR = 512
_ZEROS = bytes(SEGMENT)

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

BLKDISCARD = 0x1277  # _IO(0x12, 119)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def image_format(path: Path) -> str:
    """The image's format from its first bytes: "raw", "gzip", "xz" or "zstd"."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "raw"


def _import_zstandard() -> Any:
    try:
        import zstandard  # optional dependency, needed only for .zst images
    except ImportError:
        raise ConfigError(
            "flashing a zstd-compressed image needs the 'zstandard' Python package: pip install zstandard"
        ) from None
    return zstandard


class ImageReader(Protocol):
    """What the writer needs of a decompressing reader: gzip, xz, zstd and plain files all have it."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /
    ) -> object: ...


def open_image(path: Path, fmt: str | None = None) -> ImageReader:
    """A reader of the uncompressed image bytes."""
    fmt = fmt or image_format(path)
    if fmt == "gzip":
        return gzip.open(path, "rb")
    if fmt == "xz":
        return _XzReader(path)
    if fmt == "zstd":
        zstandard = _import_zstandard()
        compressed = open(path, "rb")  # noqa: SIM115 - the stream reader closes it (closefd)
        return zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True, closefd=True)
    return open(path, "rb")


class _XzReader(io.RawIOBase):
    """Decompresses a .xz file: one or more streams, with stream padding between and after them.

    Python's lzma.open stops at, or fails on, stream padding (zero bytes that xz allows
    after a stream); the xz tool accepts it, so this reader does too.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        self._input = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not view:
            return 0
        while True:
            if self._decoder.eof:
                rest = (self._decoder.unused_data + self._input).lstrip(b"\0")
                while not rest:
                    more = self._file.read(CHUNK)
                    if not more:
                        return 0
                    rest = more.lstrip(b"\0")
                self._decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ)
                self._input = rest
            if self._decoder.needs_input and not self._input:
                self._input = self._file.read(CHUNK)
                if not self._input:
                    raise EOFError("xz image ends in the middle of a stream")
            out = self._decoder.decompress(self._input, max_length=len(view))
            self._input = b""
            if out:
                view[: len(out)] = out
                return len(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _decode_errors(fmt: str) -> tuple[type[BaseException], ...]:
    """The exceptions that mean a compressed image is corrupt or truncated."""
    errors: tuple[type[BaseException], ...] = (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile)
    if fmt == "zstd":
        try:
            import zstandard
        except ImportError:  # open_image says what to install
            return errors
        errors += (zstandard.ZstdError,)
    return errors


def _read_full(reader: ImageReader, view: memoryview) -> int:
    """Fill ``view`` from ``reader``; fewer bytes only at the end of the image."""
    filled = 0
    while filled < len(view):
        n = reader.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def _xz_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    for i in range(9):
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ValueError("xz multibyte integer too long")


def xz_uncompressed_size(path: Path) -> int | None:
    """The uncompressed size recorded in the xz indexes, or None if the file is not as expected.

    Reading the index (at the end of each stream) costs a few reads instead of
    decompressing the whole image, which for xz is slow.
    """
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            total = 0
            while end > 0:
                f.seek(end - 4)
                if f.read(4) == b"\0\0\0\0":  # stream padding
                    end -= 4
                    continue
                f.seek(end - 12)
                footer = f.read(12)
                if len(footer) != 12 or footer[10:12] != b"YZ":
                    return None
                backward = (int.from_bytes(footer[4:8], "little") + 1) * 4
                index_start = end - 12 - backward
                if index_start < 12:
                    return None
                f.seek(index_start)
                index = f.read(backward)
                if index[0] != 0:
                    return None
                count, pos = _xz_varint(index, 1)
                blocks = 0
                for _ in range(count):
                    unpadded, pos = _xz_varint(index, pos)
                    uncompressed, pos = _xz_varint(index, pos)
                    total += uncompressed
                    blocks += (unpadded + 3) & ~3
                end = index_start - blocks - 12
                f.seek(max(end, 0))
                if end < 0 or f.read(6) != XZ_MAGIC:
                    return None
            return total
    except (OSError, ValueError, IndexError):
        return None


def uncompressed_size(path: Path, fmt: str, progress: Progress | None = None) -> int:
    """Bytes the image expands to.

    Raw: the file size. xz: from its index. gzip and zstd: by decompressing once without
    writing (gzip's size field is modulo 4 GiB and zstd frames may omit it); both
    decompress far faster than a card is written.
    """
    if fmt == "raw":
        return path.stat().st_size
    if fmt == "xz":
        size = xz_uncompressed_size(path)
        if size is not None:
            return size
    total = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        with open_image(path, fmt) as reader:
            while n := _read_full(reader, view):
                total += n
                if progress:
                    progress("measure", total, None)
    except _decode_errors(fmt) + (OSError,) as exc:
        raise ConfigError(f"image {path} is not a valid {fmt} file ({exc}); re-download or rebuild it") from None
    return total


def _punch_hole(fd: int, length: int) -> bool:
    """Make [0, length) of a regular file a hole; False where the filesystem cannot."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _discard(fd: int, length: int, device_size: int) -> bool:
    """BLKDISCARD [0, length) rounded up to whole sectors; False where the device refuses."""
    span = min(-(-length // SECTOR) * SECTOR, device_size)
    try:
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", 0, span))
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY, errno.EIO):
            return False
        raise
    return True


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _write_chunk(fd: int, view: memoryview, offset: int, skip_zeros: bool) -> int:
    """Write ``view`` at ``offset``; returns the bytes skipped as all-zero segments."""
    if not skip_zeros:
        _pwrite_all(fd, view, offset)
        return 0
    skipped = 0
    run_start: int | None = None
    for pos in range(0, len(view), SEGMENT):
        segment = view[pos : pos + SEGMENT]
        # tobytes() then == is a memcpy and a memcmp; memoryview == compares item by item, 50x slower.
        if segment.tobytes() == _ZEROS[: len(segment)]:
            if run_start is not None:
                _pwrite_all(fd, view[run_start:pos], offset + run_start)
                run_start = None
            skipped += len(segment)
        elif run_start is None:
            run_start = pos
    if run_start is not None:
        _pwrite_all(fd, view[run_start:], offset + run_start)
    return skipped


def _read_back_sha256(path: Path, length: int, progress: Progress | None) -> str:
    """SHA-256 of the first ``length`` bytes of ``path``, read past the page cache where possible."""
    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # tmpfs and some others have no O_DIRECT
            raise
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_DONTNEED)
    try:
        # An anonymous mapping is page-aligned, as O_DIRECT requires of the buffer.
        with mmap.mmap(-1, CHUNK) as buf:
            view = memoryview(buf)
            done = 0
            try:
                while done < length:
                    n = os.preadv(fd, [buf], done)
                    if n <= 0:
                        break
                    take = min(n, length - done)
                    digest.update(view[:take])
                    done += take
                    if progress:
                        progress("verify", done, length)
            finally:
                # The mapping cannot be closed while a view of it exists.
                view.release()
    finally:
        os.close(fd)
    if done < length:
        raise InfraError(
            f"verification of {path}: could read back only {done} of {length} bytes; "
            "the card is failing or smaller than it claims"
        )
    return digest.hexdigest()


def _open_target(target: Target) -> int:
    if target.kind == "file":
        return os.open(target.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        # O_EXCL on a block device: the kernel refuses it while the device is mounted or
        # claimed (dm, md), in any mount namespace, not only the one we can see.
        return os.open(target.path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ConfigError(
                f"flash target {target.path} is in use (mounted or claimed, possibly in another "
                "container or mount namespace); unmount or release it first"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(
                f"no permission to write {target.path}: run as root or add the user to the 'disk' group"
            ) from None
        if exc.errno in (errno.ENOMEDIUM, errno.ENXIO, errno.ENOENT, errno.ENODEV):
            raise InfraError(
                f"flash target {target.path} vanished or has no medium ({exc}); re-insert the card"
            ) from None
        raise


def write_image(
    image: Path,
    device: Path,
    *,
    allow_file: bool = False,
    verify: bool = True,
    discard: bool = True,
    progress: Progress | None = None,
) -> FlashResult:
    """Write ``image`` (raw, .gz, .xz, .zst) to ``device`` and verify it.

    Refuses (ConfigError, before any write) a target that is not a block device (a
    regular file only with ``allow_file``), a partition, a host disk, a mounted or busy
    device, a write-protected one, and one smaller than the uncompressed image. A
    regular file target that is missing or empty is created with the image's size; one
    that exists counts as a device of its size. I/O failures and a failed verification
    are InfraError.

    Long on purpose: one pass from the refusals through the write to the read-back, with the
    target's descriptor, the running sha256 and the zeroing method shared by every step.
    """
    image = Path(image)
    if not image.is_file():
        raise ConfigError(f"image {image} does not exist or is not a file; build or download it first")
    target = check_target(Path(device), allow_file=allow_file)
    fmt = image_format(image)
    size = uncompressed_size(image, fmt, progress)
    if fmt == "zstd":
        # zstandard's reader returns a short stream for a cut-off file instead of failing: the
        # write and its verification would both agree on a truncated image.
        from testbed.unpack import zstd_frames

        if not zstd_frames(image)[0]:
            raise ConfigError(f"image {image} is a truncated or damaged zstd file: download or build it again")
    if size == 0:
        raise ConfigError(f"image {image} is empty")
    if target.size is not None and size > target.size:
        raise ConfigError(
            f"image {image} is {size} bytes uncompressed, but flash target {target.path} holds only {target.size} "
            "bytes: use a larger card"
        )
    limit = target.size if target.size is not None else size
    started = time.monotonic()
    digest = hashlib.sha256()
    skipped = written = 0
    fd = _open_target(target)
    try:
        if target.kind == "file":
            if target.size is None:
                zeroing = "new-file"
            else:
                zeroing = "punch-hole" if _punch_hole(fd, size) else "written"
            if os.fstat(fd).st_size < size:
                # A fresh or short file is extended to the image size: the skipped
                # zero blocks at its end must exist and read as zeros.
                os.ftruncate(fd, size)
        elif discard and verify and target.discard and _discard(fd, size, target.size or size):
            zeroing = "discard"
        else:
            zeroing = "written"
        skip_zeros = zeroing != "written"
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            with open_image(image, fmt) as reader:
                while n := _read_full(reader, view):
                    if written + n > limit:
                        raise ConfigError(
                            f"image {image} grew past {limit} bytes while being written to "
                            f"{target.path}; was it replaced during the flash?"
                        )
                    digest.update(view[:n])
                    skipped += _write_chunk(fd, view[:n], written, skip_zeros)
                    written += n
                    if progress:
                        progress("write", written, size)
        except _decode_errors(fmt) as exc:
            raise ConfigError(f"image {image} is corrupt ({exc}); re-download or rebuild it") from None
        if written != size:
            raise ConfigError(f"image {image} gave {written} bytes, expected {size}; was it replaced during the flash?")
        os.fsync(fd)
    except OSError as exc:
        raise InfraError(f"writing {image} to {target.path} failed after {written} bytes: {exc}") from None
    finally:
        os.close(fd)
    sha256 = digest.hexdigest()
    verified = False
    if verify:
        if progress:
            progress("verify", 0, size)
        try:
            read_back = _read_back_sha256(target.path, size, progress)
        except OSError as exc:
            raise InfraError(f"reading back {target.path} for verification failed: {exc}") from None
        if read_back != sha256:
            hint = (
                " The zero blocks were skipped after a discard: this device may not read discarded blocks as "
                "zeros; set discard: false."
                if zeroing == "discard"
                else ""
            )
            raise InfraError(
                f"verification of {target.path} failed: the image hashes to {sha256}, the device read back "
                f"{read_back}. The card is faulty or fake (smaller than it claims), or something else wrote "
                f"to it.{hint}"
            )
        verified = True
    return FlashResult(
        image=str(image),
        target=str(target.path),
        bytes_written=size,
        bytes_skipped=skipped,
        seconds=time.monotonic() - started,
        sha256=sha256,
        verified=verified,
        zeroing=zeroing,
    )


@dataclass
class BlockDeviceFlasher:
    """Flasher for a card reader or mass-storage gadget that is always attached.

    ``device`` is the block device (prefer a stable /dev/disk/by-id/ path).
    """

    device: str
    verify: bool = True
    discard: bool = True
    allow_file: bool = False
    progress: Progress | None = internal()

    def __post_init__(self) -> None:
        if not self.device:
            raise ConfigError("device is empty; give the card reader's block device, e.g. /dev/disk/by-id/usb-...")

    def flash(self, image: Path) -> FlashResult:
        return write_image(
            image,
            Path(self.device),
            allow_file=self.allow_file,
            verify=self.verify,
            discard=self.discard,
            progress=self.progress,
        )
