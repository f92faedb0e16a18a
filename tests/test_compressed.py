"""``--image`` given as balena's downloads come: .img.gz, .img.xz, .img.zst and .zip, on real QEMU.

The smoke suite passes on each; the report names the file the user gave and its sha256 (the
compressed file's); the user's directory holds nothing new and the file is unchanged.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from testbed import image as img
from testbed import reference

REPO = Path(__file__).resolve().parent.parent
CHUNK = 1 << 20


def _zstd(src: BinaryIO, dst: Path) -> None:
    try:
        import zstandard
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: needs the zstandard package (pip install zstandard)")
        pytest.skip("needs the zstandard package (pip install zstandard)")
    with open(dst, "wb") as out:
        zstandard.ZstdCompressor(level=1, threads=-1).copy_stream(src, out)


def _stream(opener: Callable[[Path], BinaryIO]) -> Callable[[BinaryIO, Path], None]:
    def compress(src: BinaryIO, dst: Path) -> None:
        with opener(dst) as out:
            shutil.copyfileobj(src, out, CHUNK)

    return compress


def _zip(src: BinaryIO, dst: Path) -> None:
    with (
        zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
        archive.open("balena-qemux86-64.img", "w", force_zip64=True) as out,
    ):
        shutil.copyfileobj(src, out, CHUNK)


FORMATS: dict[str, Callable[[BinaryIO, Path], None]] = {
    ".img.gz": _stream(lambda p: gzip.open(p, "wb", compresslevel=1)),
    ".img.xz": _stream(lambda p: lzma.open(p, "wb", preset=0)),
    ".img.zst": _zstd,
    ".zip": _zip,
}


@pytest.fixture(scope="module")
def reference_image(qemu_tools: None) -> Path:
    return reference.build(log=lambda _line: None)


@pytest.mark.parametrize("suffix", list(FORMATS))
def test_the_smoke_suite_passes_on_a_compressed_image(suffix: str, reference_image: Path, tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    given = downloads / f"balena-qemux86-64{suffix}"
    with open(reference_image, "rb") as src:
        FORMATS[suffix](src, given)
    before = img.sha256_file(given, use_cache=False)
    reports = tmp_path / "reports"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "suites/smoke", "--image", str(given),
         "--report-dir", str(reports)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads(next(reports.glob("*/latest/report.json")).read_text())
    assert report["result"] == "passed" and report["counts"]["passed"] == 4
    assert report["image"]["path"] == str(given) and report["image"]["sha256"] == before
    unpacked = Path(report["facts"]["image_unpacked"])
    assert unpacked.parent.name == before and unpacked.stat().st_mode & 0o222 == 0
    assert img.sha256_file(unpacked, use_cache=False) == img.sha256_file(reference_image)
    # Nothing was unpacked beside the user's file, and the file is as it was.
    assert sorted(p.name for p in downloads.iterdir()) == [given.name]
    assert img.sha256_file(given, use_cache=False) == before
    shutil.rmtree(unpacked.parent)  # 2 GiB per format: not kept in the cache after the test
