"""Tests for testbed.image on small disk images built with the real host tools.

Images are made with truncate, sfdisk, mkfs.vfat --offset, mkfs.ext* -E offset
and mtools: no loop devices, no mounts, no root-only operations.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import ConfigError, InfraError
from testbed.image import (
    DiskLayout,
    MissingPartitionError,
    Qcow2Source,
    image_format,
    qcow2_backing_file,
    read_config_json,
    read_file_from_fat,
    read_layout,
    sha256_file,
    write_config_json,
    write_files_to_fat_in_overlay,
)

MiB = 1 << 20
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
CONFIG = {"deviceType": "generic-amd64", "uuid": "0123456789abcdef", "hostname": "dut"}


def run(*argv: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """Run a host tool, failing the test with its output if it fails."""
    proc = subprocess.run(
        [os.fspath(a) for a in argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{argv} failed: {proc.stdout}{proc.stderr}"
    return proc.stdout


def sfdisk_json(image: Path) -> dict[str, Any]:
    return json.loads(run("sfdisk", "-J", image))["partitiontable"]


def partition_table(image: Path, size: int, script: str) -> list[dict[str, Any]]:
    """Create a sparse ``size``-byte file with the sfdisk ``script``; sfdisk's view of it."""
    run("truncate", "-s", str(size), image)
    subprocess.run(["sfdisk", "-q", os.fspath(image)], input=script, text=True, check=True)
    return sfdisk_json(image)["partitions"]


def mkfs_vfat(image: Path, part: dict[str, Any], label: str, *extra: str) -> None:
    kib = part["size"] * 512 // 1024
    run("mkfs.vfat", *extra, "-n", label, "--offset", str(part["start"]), image, str(kib))


def mkfs_ext(image: Path, part: dict[str, Any], kind: str, label: str) -> None:
    off = part["start"] * 512
    kib = part["size"] * 512 // 1024
    run(f"mkfs.{kind}", "-q", "-F", "-L", label, "-E", f"offset={off}", image, f"{kib}k")


def put_fat_file(image: Path, part: dict[str, Any], name: str, data: bytes, tmp: Path) -> None:
    src = tmp / "payload"
    src.write_bytes(data)
    run("mcopy", "-o", "-i", f"{image}@@{part['start'] * 512}", src, f"::/{name}")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def overlay_of(base: Path, dest: Path) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base.resolve(), dest)
    return dest


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gpt_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 MiB GPT image laid out like balenaOS, with /config.json on resin-boot."""
    tmp = tmp_path_factory.mktemp("gpt")
    img = tmp / "balena.img"
    parts = partition_table(
        img,
        64 * MiB,
        "label: gpt\n"
        f"start=1MiB, size=8MiB, type={ESP_GUID}, name=resin-boot\n"
        f"size=12MiB, type={LINUX_GUID}, name=resin-rootA\n"
        f"size=12MiB, type={LINUX_GUID}, name=resin-rootB\n"
        f"size=8MiB, type={LINUX_GUID}, name=resin-state\n"
        f"type={LINUX_GUID}, name=resin-data\n",
    )
    mkfs_vfat(img, parts[0], "resin-boot")
    mkfs_ext(img, parts[1], "ext4", "resin-rootA")
    mkfs_ext(img, parts[2], "ext3", "resin-rootB")
    mkfs_ext(img, parts[3], "ext2", "resin-state")
    mkfs_ext(img, parts[4], "ext4", "resin-data")
    put_fat_file(img, parts[0], "config.json", json.dumps(CONFIG).encode(), tmp)
    return img


@pytest.fixture(scope="module")
def mbr_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128 MiB MBR image with a FAT32 boot partition and three logical partitions."""
    tmp = tmp_path_factory.mktemp("mbr")
    img = tmp / "mbr.img"
    parts = partition_table(
        img,
        128 * MiB,
        "label: dos\n"
        "start=1MiB, size=40MiB, type=c, bootable\n"
        "size=16MiB, type=83\n"
        "size=16MiB, type=83\n"
        "type=5\n"
        "size=8MiB, type=83\n"
        "size=8MiB, type=83\n"
        "type=83\n",
    )
    by_node = {int(p["node"].rsplit("img", 1)[1]): p for p in parts}
    mkfs_vfat(img, by_node[1], "resin-boot", "-F", "32")
    mkfs_ext(img, by_node[2], "ext4", "resin-rootA")
    mkfs_ext(img, by_node[3], "ext4", "resin-rootB")
    mkfs_ext(img, by_node[5], "ext4", "resin-state")
    mkfs_ext(img, by_node[6], "ext4", "resin-data")
    put_fat_file(img, by_node[1], "config.json", b'{"deviceType": "raspberrypi4-64"}\n', tmp)
    return img


# ---------------------------------------------------------------- layouts


def test_gpt_layout_matches_sfdisk(gpt_image: Path) -> None:
    layout = read_layout(gpt_image)
    assert layout.table == "gpt"
    assert layout.size == 64 * MiB
    expected = sfdisk_json(gpt_image)["partitions"]
    assert [p.index for p in layout.partitions] == [1, 2, 3, 4, 5]
    for part, ref in zip(layout.partitions, expected, strict=True):
        assert part.start == ref["start"] * 512
        assert part.size == ref["size"] * 512
        assert part.type_guid == ref["type"]
        assert part.name == ref["name"]
    assert [(p.label, p.fstype) for p in layout.partitions] == [
        ("resin-boot", "vfat"),
        ("resin-rootA", "ext4"),
        ("resin-rootB", "ext3"),
        ("resin-state", "ext2"),
        ("resin-data", "ext4"),
    ]
    assert layout.by_label("resin-rootB").index == 3


def test_mbr_layout_with_logical_partitions(mbr_image: Path) -> None:
    layout = read_layout(mbr_image)
    assert layout.table == "dos"
    ref = {int(p["node"].rsplit("img", 1)[1]): p for p in sfdisk_json(mbr_image)["partitions"]}
    # The extended container (4) is not listed; logical partitions keep Linux's numbers.
    assert [p.index for p in layout.partitions] == [1, 2, 3, 5, 6, 7]
    for part in layout.partitions:
        assert part.start == ref[part.index]["start"] * 512
        assert part.size == ref[part.index]["size"] * 512
        assert int(part.type_guid or "", 16) == int(ref[part.index]["type"], 16)
        assert part.name == ""
    assert [(p.label, p.fstype) for p in layout.partitions] == [
        ("resin-boot", "vfat"),
        ("resin-rootA", "ext4"),
        ("resin-rootB", "ext4"),
        ("resin-state", "ext4"),
        ("resin-data", "ext4"),
        ("", "unknown"),
    ]
    assert layout.partitions[0].type_guid == "0x0c"


def test_fat32_label_and_config(mbr_image: Path) -> None:
    blkid = run("blkid", "-p", "-O", str(1 * MiB), "-s", "VERSION", "-o", "value", mbr_image)
    assert blkid.strip() == "FAT32"
    assert read_config_json(mbr_image) == {"deviceType": "raspberrypi4-64"}


def test_label_set_by_mlabel_is_read_as_on_disk(gpt_image: Path, tmp_path: Path) -> None:
    img = tmp_path / "relabelled.img"
    run("cp", "--sparse=always", gpt_image, img)
    boot = read_layout(img).by_label("resin-boot")
    run("mlabel", "-i", f"{img}@@{boot.start}", "::resin-boot")
    blkid = run("blkid", "-p", "-O", str(boot.start), "-s", "LABEL", "-o", "value", img)
    layout = read_layout(img)
    # mlabel upper-cases the root-directory label; blkid and read_layout report that.
    assert layout.partitions[0].label == blkid.strip() == "RESIN-BOOT"
    assert layout.by_label("resin-boot") == layout.partitions[0]
    assert read_config_json(img) == CONFIG


def test_missing_label_names_what_exists(gpt_image: Path) -> None:
    layout = read_layout(gpt_image)
    with pytest.raises(MissingPartitionError) as info:
        layout.by_label("flash-boot")
    msg = str(info.value)
    assert "'flash-boot'" in msg and "'resin-rootA'" in msg and str(gpt_image) in msg
    assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)
    assert "\n" not in msg


def test_image_without_resin_boot(tmp_path: Path) -> None:
    img = tmp_path / "plain.img"
    parts = partition_table(img, 24 * MiB, f"label: gpt\nstart=1MiB, type={LINUX_GUID}, name=root\n")
    mkfs_ext(img, parts[0], "ext4", "rootfs")
    assert read_layout(img).labels() == ["rootfs"]
    with pytest.raises(ConfigError, match=r"has no partition labelled 'resin-boot' \(labels found: 'rootfs'\)"):
        read_config_json(img)


def test_backup_gpt_used_when_primary_is_damaged(gpt_image: Path, tmp_path: Path) -> None:
    img = tmp_path / "damaged.img"
    run("cp", "--sparse=always", gpt_image, img)
    with open(img, "r+b") as fh:
        fh.seek(512 + 100)
        fh.write(b"\xff" * 8)  # breaks the primary header's CRC
    layout = read_layout(img)
    assert layout == DiskLayout("gpt", read_layout(gpt_image).partitions, str(img), 64 * MiB)


def test_truncated_image_is_reported(gpt_image: Path, tmp_path: Path) -> None:
    img = tmp_path / "short.img"
    run("cp", "--sparse=always", gpt_image, img)
    os.truncate(img, 50 * MiB)
    with pytest.raises(ConfigError, match=r"short\.img: partition 5 ends at byte .* looks truncated"):
        read_layout(img)


# ---------------------------------------------------------------- qcow2


def test_overlay_reads_same_layout_and_config_as_base(gpt_image: Path, tmp_path: Path) -> None:
    overlay = overlay_of(gpt_image, tmp_path / "overlay.qcow2")
    assert image_format(overlay) == "qcow2"
    assert image_format(gpt_image) == "raw"
    assert qcow2_backing_file(overlay) == str(gpt_image.resolve())
    assert read_layout(overlay).partitions == read_layout(gpt_image).partitions
    assert read_config_json(overlay) == CONFIG


@pytest.mark.parametrize("options", ["cluster_size=65536", "cluster_size=512,compat=0.10", "cluster_size=2M"])
def test_qcow2_reader_matches_qemu(gpt_image: Path, tmp_path: Path, options: str) -> None:
    """Standalone qcow2 and a qcow2-on-qcow2 chain read exactly what qemu-img reads."""
    full = tmp_path / "full.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", "-o", options, gpt_image, full)
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, "-F", "qcow2", "-b", full.name, top)
    run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x5a 50000000 300000", "-c", "write -q -z 36M 1M", top)
    flat = tmp_path / "flat.raw"
    run("qemu-img", "convert", "-O", "raw", top, flat)
    expected = flat.read_bytes()
    with Qcow2Source(top) as src:
        assert src.size == len(expected)
        for start in (0, 1 * MiB, 9 * MiB, 36 * MiB - 4096, 50000000 - 7, 64 * MiB - 100):
            want = expected[start : start + MiB]
            assert src.read(start, MiB) == want + bytes(MiB - len(want))
    assert read_layout(top).partitions == read_layout(gpt_image).partitions


def test_compressed_qcow2_is_refused(gpt_image: Path, tmp_path: Path) -> None:
    packed = tmp_path / "packed.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", gpt_image, packed)
    with pytest.raises(ConfigError, match="compressed qcow2 clusters are not supported"):
        read_layout(packed)


def test_overlay_with_missing_backing_file(gpt_image: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    run("cp", "--sparse=always", gpt_image, base)
    overlay = overlay_of(base, tmp_path / "orphan.qcow2")
    base.unlink()
    assert qcow2_backing_file(overlay) == str(base.resolve())
    with pytest.raises(ConfigError, match=r"orphan\.qcow2: its backing file .*base\.img is missing"):
        read_layout(overlay)


# ---------------------------------------------------------------- writing


def test_write_config_json_changes_overlay_only(gpt_image: Path, tmp_path: Path) -> None:
    before = sha256_of(gpt_image)
    mtime = gpt_image.stat().st_mtime_ns
    overlay = overlay_of(gpt_image, tmp_path / "overlay.qcow2")
    new = {**CONFIG, "hostname": "edited", "nested": {"list": [1, 2, 3]}}
    write_config_json(overlay, new)
    assert read_config_json(overlay) == new
    assert read_config_json(gpt_image) == CONFIG
    assert sha256_of(gpt_image) == before
    assert run("sha256sum", gpt_image).split()[0] == before
    assert gpt_image.stat().st_mtime_ns == mtime
    # qemu's own view of the overlay, read back with mtools, agrees.
    flat = tmp_path / "flat.raw"
    run("qemu-img", "convert", "-O", "raw", overlay, flat)
    boot = read_layout(flat).by_label("resin-boot")
    text = run("mtype", "-i", f"{flat}@@{boot.start}", "::/config.json")
    assert text == json.dumps(new, indent=4) + "\n"
    run("qemu-img", "check", "-q", overlay)
    # Only the changed blocks went into the overlay, not the whole partition.
    assert overlay.stat().st_size < 2 * MiB


def test_write_nested_files_and_overwrite(mbr_image: Path, tmp_path: Path) -> None:
    overlay = overlay_of(mbr_image, tmp_path / "overlay.qcow2")
    boot = read_layout(overlay).by_label("resin-boot")
    blob = random.Random(1).randbytes(300_000)
    write_files_to_fat_in_overlay(overlay, boot, {"/system-connections/wifi": b"[wifi]\n", "splash/big.bin": blob})
    write_files_to_fat_in_overlay(overlay, boot, {"/system-connections/wifi": b"[wifi]\nssid=x\n"})
    assert read_file_from_fat(overlay, boot, "/system-connections/wifi") == b"[wifi]\nssid=x\n"
    assert read_file_from_fat(overlay, boot, "/splash/big.bin") == blob
    assert read_config_json(overlay) == {"deviceType": "raspberrypi4-64"}
    with pytest.raises(ConfigError, match="/splash/big.bin not found"):
        read_file_from_fat(mbr_image, boot, "/splash/big.bin")


def test_full_fat_partition_is_a_config_error(gpt_image: Path, tmp_path: Path) -> None:
    overlay = overlay_of(gpt_image, tmp_path / "overlay.qcow2")
    boot = read_layout(overlay).by_label("resin-boot")
    with pytest.raises(ConfigError, match=r"no room for /huge\.bin \(12582912 bytes\) in the FAT partition"):
        write_files_to_fat_in_overlay(overlay, boot, {"/huge.bin": bytes(12 * MiB)})
    assert read_config_json(overlay) == CONFIG


def test_invalid_config_json_reports_position(gpt_image: Path, tmp_path: Path) -> None:
    overlay = overlay_of(gpt_image, tmp_path / "overlay.qcow2")
    boot = read_layout(overlay).by_label("resin-boot")
    write_files_to_fat_in_overlay(overlay, boot, {"/config.json": b'{\n  "a": 1,\n  "b": \n}\n'})
    with pytest.raises(ConfigError) as info:
        read_config_json(overlay)
    msg = str(info.value)
    assert str(overlay) in msg and "not valid JSON" in msg and "line 4 column 1" in msg
    write_files_to_fat_in_overlay(overlay, boot, {"/config.json": b"[1, 2]"})
    with pytest.raises(ConfigError, match="holds a JSON list, not an object"):
        read_config_json(overlay)


def test_missing_config_json(tmp_path: Path) -> None:
    img = tmp_path / "noconfig.img"
    parts = partition_table(img, 24 * MiB, f"label: gpt\nstart=1MiB, type={ESP_GUID}, name=boot\n")
    mkfs_vfat(img, parts[0], "resin-boot")
    with pytest.raises(
        ConfigError, match=r"/config\.json not found in partition 1 'resin-boot' \(vfat\) of .*noconfig\.img"
    ):
        read_config_json(img)


def test_refuses_to_write_anything_but_an_overlay(gpt_image: Path, tmp_path: Path) -> None:
    before = sha256_of(gpt_image)
    boot = read_layout(gpt_image).by_label("resin-boot")
    with pytest.raises(ConfigError, match="refusing to write to .*: it is a raw image"):
        write_config_json(gpt_image, {"x": 1})
    with pytest.raises(ConfigError, match="refusing to write to .*: it is a raw image"):
        write_files_to_fat_in_overlay(gpt_image, boot, {"/config.json": b"{}"})
    standalone = tmp_path / "standalone.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", gpt_image, standalone)
    qcow_before = sha256_of(standalone)
    with pytest.raises(ConfigError, match="qcow2 without a backing file"):
        write_config_json(standalone, {"x": 1})
    assert sha256_of(standalone) == qcow_before
    assert sha256_of(gpt_image) == before
    overlay = overlay_of(gpt_image, tmp_path / "overlay.qcow2")
    root = read_layout(overlay).by_label("resin-rootA")
    with pytest.raises(ConfigError, match="does not hold a FAT filesystem"):
        write_files_to_fat_in_overlay(overlay, root, {"/x": b"x"})


def test_write_to_locked_overlay_fails_loudly(gpt_image: Path, tmp_path: Path) -> None:
    overlay = overlay_of(gpt_image, tmp_path / "busy.qcow2")
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", os.fspath(overlay)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert holder.stdout is not None
        seen = b""
        deadline = time.monotonic() + 10
        while b"qemu-io>" not in seen and time.monotonic() < deadline:
            seen += holder.stdout.read(1)
        assert b"qemu-io>" in seen, seen
        with pytest.raises(InfraError, match=r"qemu-io failed to write .*lock.*is a QEMU still running on it\?"):
            write_config_json(overlay, {"x": 1})
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    assert read_config_json(overlay) == CONFIG


# ---------------------------------------------------------------- bad input


def test_missing_file_message(tmp_path: Path) -> None:
    path = tmp_path / "nope.img"
    with pytest.raises(ConfigError) as info:
        image_format(path)
    assert str(info.value) == (
        f"image not found: {path} — pass --image with the path of a disk image (.img/.qcow2), "
        "or omit it to use the reference image"
    )


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        ("directory", r"is a directory, not a disk image — pass --image"),
        ("empty", r"is empty \(0 bytes\), not a disk image"),
        ("random", r"is not a disk image: no partition table found \(expected a raw \.img"),
        ("text", r"is not a disk image: no partition table found"),
        ("gzip", r"is a gzip-compressed file, not a disk image — decompress it first \(gunzip -k "),
        ("fat-no-table", r"is not a disk image: no partition table found"),
    ],
)
def test_bad_input_messages(tmp_path: Path, kind: str, pattern: str) -> None:
    path = tmp_path / f"input-{kind}"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "random":
        path.write_bytes(random.Random(7).randbytes(64 * 1024))
    elif kind == "text":
        path.write_text("this is a README, not an image\n" * 100)
    elif kind == "gzip":
        path.write_bytes(gzip.compress(b"\0" * 4096))
    elif kind == "fat-no-table":
        run("truncate", "-s", "8M", path)
        run("mkfs.vfat", "-n", "resin-boot", path)
    for func in (image_format, read_layout, read_config_json, sha256_file):
        if func is sha256_file and kind != "directory":
            continue
        with pytest.raises(ConfigError) as info:
            func(path)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg
        if func is not sha256_file:
            assert re.search(pattern, msg), msg


# ---------------------------------------------------------------- sha256


def test_sha256_matches_hashlib_and_sha256sum_on_sparse_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_CACHE", os.fspath(tmp_path / "cache"))
    path = tmp_path / "sparse.img"
    rng = random.Random(3)
    with open(path, "wb") as fh:
        fh.truncate(64 * MiB)
        for off in (0, 5 * MiB + 123, 32 * MiB - 1, 50 * MiB):
            fh.seek(off)
            fh.write(rng.randbytes(300_000))
    # The file ends in a hole, and has holes between the data extents.
    assert os.stat(path).st_blocks * 512 < 10 * MiB
    expected = sha256_of(path)
    assert sha256_file(path, use_cache=False) == expected
    assert run("sha256sum", path).split()[0] == expected
    for size in (0, 1, 4 * MiB + 1):
        small = tmp_path / f"small-{size}"
        small.write_bytes(rng.randbytes(size))
        assert sha256_file(small) == hashlib.sha256(small.read_bytes()).hexdigest()


def test_sha256_cache_is_used_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("TESTBED_CACHE", os.fspath(cache_dir))
    path = tmp_path / "img"
    path.write_bytes(b"first")
    digest = sha256_file(path)
    assert digest == hashlib.sha256(b"first").hexdigest()
    cache_file = cache_dir / "sha256-cache.json"
    data = json.loads(cache_file.read_text())
    entry = data["entries"][os.path.realpath(path)]
    assert entry["sha256"] == digest and entry["size"] == 5
    # A planted value is returned while the file is unchanged: the cache is really consulted.
    entry["sha256"] = "f" * 64
    cache_file.write_text(json.dumps(data))
    assert sha256_file(path) == "f" * 64
    assert sha256_file(path, use_cache=False) == digest
    path.write_bytes(b"secnd")  # same size, new mtime/ctime
    assert sha256_file(path) == hashlib.sha256(b"secnd").hexdigest()
    cache_file.write_text("not json")
    assert sha256_file(path) == hashlib.sha256(b"secnd").hexdigest()
    assert json.loads(cache_file.read_text())["version"] == 1


def test_sha256_of_image_is_unchanged_by_reading(gpt_image: Path) -> None:
    digest = sha256_file(gpt_image, use_cache=False)
    read_layout(gpt_image)
    read_config_json(gpt_image)
    assert sha256_file(gpt_image, use_cache=False) == digest == sha256_of(gpt_image)
