"""testbed.unpack: compressed downloads (.img.zip/.gz/.xz/.zst) unpacked once, sparse, into the cache.

Real files, no QEMU: a 16 MiB sparse GPT image made with sfdisk, with 1 MiB of data in the
middle, compressed with Python's modules (zstandard for .zst: skipped when missing, except with
CI=true, where the CI installs it and a skip would hide a failure).
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import random
import stat
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from testbed import unpack
from testbed.errors import ConfigError, InfraError
from testbed.image import image_format, sha256_file

IMAGE_SIZE = 16 << 20
DATA_AT = 8 << 20
DATA_LEN = 1 << 20


def _zstandard() -> ModuleType:
    try:
        import zstandard
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: the zstandard package is missing (pip install zstandard)")
        pytest.skip("needs the zstandard package (pip install zstandard)")
    return zstandard


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # sha256_file keeps its hash cache in $TESTBED_CACHE: not the user's ~/.cache during tests.
    monkeypatch.setenv("TESTBED_CACHE", os.fspath(tmp_path / "hash-cache"))


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a 16 MiB GPT disk image, mostly holes, with 1 MiB of data in the middle."""
    path = tmp_path_factory.mktemp("raw") / "os.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    script = "label: gpt\n,4MiB,U\n,,L\n"
    subprocess.run(["sfdisk", "-q", os.fspath(path)], input=script, text=True, check=True)
    with open(path, "r+b") as f:
        f.seek(DATA_AT)
        f.write(random.Random(7).randbytes(DATA_LEN))
    return path.read_bytes()


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def _zst(data: bytes) -> bytes:
    return bytes(_zstandard().ZstdCompressor(write_checksum=True).compress(data))


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "os.img.gz": gzip.compress,
    "os.img.xz": lzma.compress,
    "os.img.zst": _zst,
    "os.img.zip": lambda data: _zip({"balena.img": data, "README.txt": b"read me\n", "licences/": b""}),
}


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    """The user's directory, where the downloads lie."""
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def _left_in_cache(cache: Path) -> list[str]:
    """What an unpacking left in the cache besides its (empty) lock files."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock")


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_unpacks_once_sparse_read_only_and_nothing_beside(
    name: str, raw_image: bytes, downloads: Path, cache: Path
) -> None:
    source = _write(downloads, name, COMPRESSORS[name](raw_image))
    before = sorted(downloads.iterdir())
    calls: list[tuple[int, int]] = []

    assert unpack.is_compressed(source)
    result = unpack.local_image(source, cache_dir=cache, progress=lambda done, total: calls.append((done, total)))

    assert result == cache / "unpacked" / sha256_file(source) / "os.img"
    assert result.read_bytes() == raw_image
    assert image_format(result) == "raw"
    st = result.stat()
    assert st.st_size == IMAGE_SIZE
    assert st.st_blocks * 512 < IMAGE_SIZE // 4, "zero blocks were written, not seeked over"
    assert stat.S_IMODE(st.st_mode) == 0o444
    assert sorted(downloads.iterdir()) == before, "something was written beside the user's file"
    assert calls[0][0] == 0 and calls[-1] == (IMAGE_SIZE, IMAGE_SIZE)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert _left_in_cache(cache) == [str(result.relative_to(cache))]


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_total_is_known_from_each_format(name: str, raw_image: bytes, downloads: Path, cache: Path) -> None:
    """zip: the member's size; gzip: ISIZE; xz: its index; zstd: the frame header."""
    source = _write(downloads, name, COMPRESSORS[name](raw_image))
    calls: list[tuple[int, int]] = []
    unpack.local_image(source, cache_dir=cache, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, IMAGE_SIZE)


def test_a_gzip_size_hint_the_data_outgrows_becomes_unknown(downloads: Path, cache: Path) -> None:
    """Two gzip members: ISIZE is the last one's only; once passed, the total is 0 (unknown)."""
    image = bytearray(IMAGE_SIZE)
    image[510:512] = b"\x55\xaa"  # an empty MBR: a disk image for image_format
    source = _write(downloads, "os.img.gz", gzip.compress(image[: IMAGE_SIZE - 4096]) + gzip.compress(bytes(4096)))
    calls: list[tuple[int, int]] = []
    unpack.local_image(source, cache_dir=cache, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 4096)
    assert all(total == 0 for done, total in calls[1:-1] if done > 4096)
    assert calls[-1] == (IMAGE_SIZE, IMAGE_SIZE)


def test_second_call_returns_the_cached_image_without_unpacking(
    raw_image: bytes, downloads: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _write(downloads, "os.img.xz", lzma.compress(raw_image))
    first = unpack.local_image(source, cache_dir=cache)
    mtime = first.stat().st_mtime_ns

    def no_second_unpacking(*args: object) -> int:
        raise AssertionError("unpacked again")

    monkeypatch.setattr(unpack, "_copy_sparse", no_second_unpacking)
    assert unpack.local_image(source, cache_dir=cache) == first
    assert first.stat().st_mtime_ns == mtime


def test_stale_partial_of_a_killed_run_is_removed(raw_image: bytes, downloads: Path, cache: Path) -> None:
    source = _write(downloads, "os.img.gz", gzip.compress(raw_image))
    directory = cache / "unpacked" / sha256_file(source)
    directory.mkdir(parents=True)
    stale = directory / ".partial-killed"
    stale.write_bytes(b"half an image")

    result = unpack.local_image(source, cache_dir=cache)

    assert not stale.exists()
    assert sorted(p.name for p in directory.iterdir()) == ["os.img"]
    assert result.read_bytes() == raw_image


def test_default_cache_is_testbeds(raw_image: bytes, downloads: Path, tmp_path: Path) -> None:
    source = _write(downloads, "os.img.gz", gzip.compress(raw_image))
    result = unpack.local_image(source)
    assert result.is_relative_to(tmp_path / "hash-cache" / "unpacked")  # $TESTBED_CACHE, set above


def _flip_middle(data: bytes) -> bytes:
    broken = bytearray(data)
    middle = len(broken) // 2
    broken[middle : middle + 16] = bytes(b ^ 0x5A for b in broken[middle : middle + 16])
    return bytes(broken)


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


BROKEN: list[tuple[str, str, Callable[[bytes], bytes]]] = [
    ("gz-flipped", "os.img.gz", lambda image: _flip_middle(gzip.compress(image))),
    ("xz-truncated", "os.img.xz", lambda image: _cut(lzma.compress(image))),
    ("zst-truncated", "os.img.zst", lambda image: _cut(_zst(image))),
    ("zst-flipped", "os.img.zst", lambda image: _flip_middle(_zst(image))),
    ("zip-truncated", "os.img.zip", lambda image: _zip({"os.img": image})[:-100]),
    ("zip-flipped", "os.img.zip", lambda image: _flip_middle(_zip({"os.img": image}))),
]


@pytest.mark.parametrize(("name", "breaks"), [(name, breaks) for _, name, breaks in BROKEN], ids=[b[0] for b in BROKEN])
def test_corrupt_or_truncated_download_is_refused_and_leaves_nothing(
    name: str, breaks: Callable[[bytes], bytes], raw_image: bytes, downloads: Path, cache: Path
) -> None:
    source = _write(downloads, name, breaks(raw_image))
    with pytest.raises(ConfigError, match="re-download") as caught:
        unpack.local_image(source, cache_dir=cache)
    assert str(source) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert _left_in_cache(cache) == []
    assert not (cache / "unpacked" / sha256_file(source)).exists()


def test_truncated_zstd_is_caught_although_zstandard_reads_it_short(raw_image: bytes, tmp_path: Path) -> None:
    """zstandard's stream reader ends quietly at a cut; the frame walk does not."""
    whole = _write(tmp_path, "whole.zst", _zst(raw_image))
    cut = _write(tmp_path, "cut.zst", whole.read_bytes()[:-5])
    assert unpack.zstd_frames(whole) == (True, IMAGE_SIZE)
    assert unpack.zstd_frames(cut)[0] is False


def test_zstd_frames_several_skippable_and_sizeless(tmp_path: Path) -> None:
    zstandard = _zstandard()
    sizeless = zstandard.ZstdCompressor().compressobj()
    frame_without_size = sizeless.compress(b"b" * 300_000) + sizeless.flush()
    skippable = struct.pack("<II", 0x184D2A5E, 5) + b"12345"
    data = _zst(b"a" * 1000) + skippable + _zst(bytes(200_000))
    assert unpack.zstd_frames(_write(tmp_path, "two.zst", data)) == (True, 201_000)
    assert unpack.zstd_frames(_write(tmp_path, "sizeless.zst", data + frame_without_size)) == (True, None)
    assert unpack.zstd_frames(_write(tmp_path, "garbage.zst", data + b"junk")) == (False, None)


def test_multi_frame_zstd_unpacks_whole(raw_image: bytes, downloads: Path, cache: Path) -> None:
    half = IMAGE_SIZE // 2
    source = _write(downloads, "os.img.zst", _zst(raw_image[:half]) + _zst(raw_image[half:]))
    assert unpack.local_image(source, cache_dir=cache).read_bytes() == raw_image


def test_missing_zstandard_names_the_package(downloads: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _write(downloads, "os.img.zst", b"\x28\xb5\x2f\xfd" + bytes(60))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard raises ImportError
    with pytest.raises(ConfigError, match="pip install zstandard") as caught:
        unpack.local_image(source, cache_dir=cache)
    assert str(source) in str(caught.value)


def test_file_named_gz_that_is_not_gzip_is_refused(raw_image: bytes, downloads: Path, cache: Path) -> None:
    raw = _write(downloads, "os.img.gz", raw_image)
    with pytest.raises(ConfigError, match=r"named \.gz but is not a gzip file") as caught:
        unpack.is_compressed(raw)
    assert str(raw) in str(caught.value)
    xz = _write(downloads, "other.img.gz", lzma.compress(b"x"))
    with pytest.raises(ConfigError, match="it is xz-compressed"):
        unpack.local_image(xz, cache_dir=cache)


def test_compression_is_told_by_content_not_name(raw_image: bytes, downloads: Path, cache: Path) -> None:
    source = _write(downloads, "download", gzip.compress(raw_image))
    assert unpack.is_compressed(source)
    result = unpack.local_image(source, cache_dir=cache)
    assert result.name == "download" and result.read_bytes() == raw_image


def _qcow2(backing: bytes = b"") -> bytes:
    """A minimal qcow2 v2 header (no clusters allocated), optionally naming a backing file."""
    header = struct.pack(">4sIQIIQIIQ", b"QFI\xfb", 2, 512 if backing else 0, len(backing), 16, IMAGE_SIZE, 0, 0, 0)
    data = bytearray(64 << 10)
    data[: len(header)] = header
    data[512 : 512 + len(backing)] = backing
    return bytes(data)


def test_raw_and_qcow2_are_returned_as_they_are(raw_image: bytes, downloads: Path, cache: Path) -> None:
    for name, data in (("os.img", raw_image), ("os.qcow2", _qcow2())):
        path = _write(downloads, name, data)
        assert not unpack.is_compressed(path)
        assert unpack.local_image(path, cache_dir=cache) == path
    assert not cache.exists()


def test_qcow2_in_a_zip_is_kept_as_qcow2(downloads: Path, cache: Path) -> None:
    qcow2 = _qcow2()
    source = _write(downloads, "os.qcow2.zip", _zip({"os.qcow2": qcow2}))
    result = unpack.local_image(source, cache_dir=cache)
    assert result.name == "os.qcow2" and result.read_bytes() == qcow2
    assert image_format(result) == "qcow2"


def test_qcow2_with_a_backing_file_in_a_zip_is_refused(downloads: Path, cache: Path) -> None:
    source = _write(downloads, "os.qcow2.zip", _zip({"os.qcow2": _qcow2(b"base.img")}))
    with pytest.raises(ConfigError, match="backing file"):
        unpack.local_image(source, cache_dir=cache)
    assert _left_in_cache(cache) == []


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ({"README.txt": b"hello\n", "docs/": b""}, "holds no disk image"),
        ({}, "holds no disk image"),
        ({"a.img": b"\0" * 1024, "b.raw": b"\0" * 1024, "README": b"x"}, "holds 2 files that look like disk images"),
    ],
    ids=["text-only", "empty", "two-images"],
)
def test_zip_without_exactly_one_image_lists_its_members(
    members: dict[str, bytes], expected: str, downloads: Path, cache: Path
) -> None:
    source = _write(downloads, "os.img.zip", _zip(members))
    with pytest.raises(ConfigError, match=expected) as caught:
        unpack.local_image(source, cache_dir=cache)
    message = str(caught.value)
    assert str(source) in message and "exactly one .img" in message
    for name in members:
        if not name.endswith("/"):
            assert name in message
    assert _left_in_cache(cache) == []


def test_zip_side_files_and_macos_forks_are_ignored(raw_image: bytes, downloads: Path, cache: Path) -> None:
    members = {"os.img": raw_image, "__MACOSX/._os.img": b"fork", "LICENSE": b"MIT\n" * 10_000}
    source = _write(downloads, "balena.zip", _zip(members))
    assert unpack.local_image(source, cache_dir=cache).read_bytes() == raw_image


def test_zip_of_a_text_file_named_img_holds_no_disk_image(downloads: Path, cache: Path) -> None:
    source = _write(downloads, "os.img.zip", _zip({"os.img": b"not an image\n" * 100_000}))
    with pytest.raises(ConfigError, match="holds no disk image") as caught:
        unpack.local_image(source, cache_dir=cache)
    assert str(source) in str(caught.value)
    assert _left_in_cache(cache) == []


def test_missing_file_is_named(tmp_path: Path, cache: Path) -> None:
    missing = tmp_path / "nowhere" / "os.img.zip"
    with pytest.raises(ConfigError, match="image not found") as caught:
        unpack.local_image(missing, cache_dir=cache)
    assert str(missing) in str(caught.value)
    with pytest.raises(ConfigError, match="image not found"):
        unpack.is_compressed(missing)


@pytest.mark.parametrize(
    "failure", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupted"]
)
def test_a_failed_write_leaves_no_partial(
    failure: BaseException, raw_image: bytes, downloads: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _write(downloads, "os.img.gz", gzip.compress(raw_image))
    write_chunk = unpack._write_chunk

    def fail(*args: object) -> int:
        raise failure

    monkeypatch.setattr(unpack, "_write_chunk", fail)
    expected: type[BaseException] = InfraError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as caught:
        unpack.local_image(source, cache_dir=cache)
    if expected is InfraError:
        assert "No space left on device" in str(caught.value) and "TESTBED_CACHE" in str(caught.value)
    assert _left_in_cache(cache) == []
    monkeypatch.setattr(unpack, "_write_chunk", write_chunk)
    assert unpack.local_image(source, cache_dir=cache).read_bytes() == raw_image
