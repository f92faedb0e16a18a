"""The image flasher: real images written to real files and, where the kernel lets us,
loop block devices; the refusals checked against this machine's own mountinfo and /sys."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.errors import ConfigError, InfraError
from testbed.flash import DRIVERS, BlockDeviceFlasher, Flasher, UsbSdMuxFlasher, make_flasher, write_image
from testbed.flash.blockdev import image_format, xz_uncompressed_size
from testbed.flash.disks import check_target, host_disks, parse_mountinfo, sysfs_dir
from testbed.image import read_layout

MiB = 1 << 20


def make_image_bytes() -> bytes:
    """A small disk image: data, a long zero run (unused space), data with an odd tail."""
    head = hashlib.shake_256(b"boot partition").digest(MiB + 4096)
    tail = hashlib.shake_256(b"rootfs").digest(300_001)
    return head + bytes(2 * MiB) + tail


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """The same image raw, gzip, xz and (when the zstandard package is there) zstd."""
    folder = tmp_path_factory.mktemp("images")
    data = make_image_bytes()
    paths = {"raw": folder / "os.img", "gzip": folder / "os.img.gz", "xz": folder / "os.img.xz"}
    paths["raw"].write_bytes(data)
    paths["gzip"].write_bytes(gzip.compress(data, compresslevel=1))
    paths["xz"].write_bytes(lzma.compress(data, preset=0))
    try:
        import zstandard
    except ImportError:
        return paths
    paths["zstd"] = folder / "os.img.zst"
    # Streamed compression: the frame does not record the content size.
    chunks = zstandard.ZstdCompressor(level=1).compressobj()
    paths["zstd"].write_bytes(chunks.compress(data) + chunks.flush())
    return paths


@pytest.fixture(scope="module")
def image_sha(images) -> str:
    return hashlib.sha256(images["raw"].read_bytes()).hexdigest()


# --- writing and verifying ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "gzip", "xz", "zstd"])
def test_writes_and_verifies_each_format(images, image_sha, tmp_path, fmt):
    if fmt not in images:
        pytest.skip("zstd images need the zstandard package (pip install zstandard)")
    target = tmp_path / "card.img"
    seen: list[tuple[str, int, int | None]] = []
    result = write_image(images[fmt], target, allow_file=True, progress=lambda *a: seen.append(a))
    size = images["raw"].stat().st_size
    assert image_format(images[fmt]) == fmt
    assert target.read_bytes() == images["raw"].read_bytes()
    assert result.sha256 == image_sha
    assert result.verified is True
    assert result.bytes_written == size
    assert result.zeroing == "new-file"
    # The 2 MiB zero run is not written: the new file is sparse there.
    assert result.bytes_skipped >= 2 * MiB - 64 * 1024
    assert target.stat().st_blocks * 512 < size - MiB
    writes = [done for phase, done, _ in seen if phase == "write"]
    assert writes == sorted(writes) and writes[-1] == size
    assert ("verify", size, size) in seen


def test_overwrites_an_existing_bigger_target_in_place(images, image_sha, tmp_path):
    target = tmp_path / "card.img"
    target.write_bytes(b"\xff" * (8 * MiB))  # an old card full of 0xFF
    result = write_image(images["xz"], target, allow_file=True)
    size = images["raw"].stat().st_size
    assert result.zeroing == "punch-hole"
    assert result.verified and result.sha256 == image_sha
    content = target.read_bytes()
    assert len(content) == 8 * MiB  # a device does not shrink
    assert content[:size] == images["raw"].read_bytes()
    assert content[size:] == b"\xff" * (8 * MiB - size)


def test_a_truncated_zstd_image_is_refused_before_a_write(images, tmp_path):
    """zstandard's reader ends a cut-off stream quietly: without a check the short image would be
    written and verified against itself."""
    if "zstd" not in images:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: needs the zstandard package")
        pytest.skip("needs the zstandard package (pip install zstandard)")
    cut = tmp_path / "cut.img.zst"
    data = images["zstd"].read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    target = tmp_path / "card.img"
    with pytest.raises(ConfigError, match="truncated or damaged zstd"):
        write_image(cut, target, allow_file=True)
    assert not target.exists() or target.stat().st_size == 0


def test_flasher_driver_from_spec(images, tmp_path):
    target = tmp_path / "card.img"
    phases: set[str] = set()
    flasher = make_flasher(
        {"driver": "blockdev", "device": str(target), "allow_file": True},
        progress=lambda phase, done, total: phases.add(phase),
    )
    assert isinstance(flasher, BlockDeviceFlasher) and isinstance(flasher, Flasher)
    result = flasher.flash(images["gzip"])
    assert result.verified
    assert phases == {"measure", "write", "verify"}


def test_uncompressed_size_of_multi_stream_xz(tmp_path):
    path = tmp_path / "two.xz"
    # Two streams with stream padding between and after them, as the xz format allows.
    path.write_bytes(lzma.compress(b"a" * 5000) + bytes(8) + lzma.compress(b"b" * 7000) + bytes(4))
    assert xz_uncompressed_size(path) == 12000
    result = write_image(path, tmp_path / "t.img", allow_file=True)
    assert result.bytes_written == 12000 and result.verified


def test_verification_catches_a_changed_target(images, tmp_path):
    target = tmp_path / "card.img"

    def meddle(phase: str, done: int, total: int | None) -> None:
        # Something else writes to the card between the write and the read-back.
        if phase == "verify" and done == 0:
            with open(target, "r+b") as f:
                f.seek(12345)
                f.write(b"\x00\x01")

    with pytest.raises(InfraError, match=f"verification of {target} failed"):
        write_image(images["raw"], target, allow_file=True, progress=meddle)


def test_zstd_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    image = tmp_path / "os.img.zst"
    image.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ConfigError, match="pip install zstandard"):
        write_image(image, tmp_path / "t.img", allow_file=True)


def test_corrupt_image_is_config_error(images, tmp_path):
    broken = tmp_path / "broken.img.gz"
    broken.write_bytes(images["gzip"].read_bytes()[:-5000])
    with pytest.raises(ConfigError, match="broken.img.gz is not a valid gzip file"):
        write_image(broken, tmp_path / "t.img", allow_file=True)


# --- refusals -----------------------------------------------------------------------------------


def test_target_too_small_is_refused_before_writing(images, tmp_path):
    target = tmp_path / "small.img"
    target.write_bytes(b"\xaa" * MiB)
    with pytest.raises(ConfigError) as err:
        write_image(images["xz"], target, allow_file=True)
    assert f"flash target {target} holds only {MiB} bytes" in str(err.value)
    assert "use a larger card" in str(err.value)
    assert target.read_bytes() == b"\xaa" * MiB  # untouched


def test_regular_file_needs_allow_file(images, tmp_path):
    target = tmp_path / "card.img"
    target.write_bytes(bytes(8 * MiB))
    with pytest.raises(ConfigError) as err:
        write_image(images["raw"], target)
    assert f"flash target {target} is a regular file, not a block device" in str(err.value)
    assert "allow_file: true" in str(err.value)
    assert target.read_bytes() == bytes(8 * MiB)


@pytest.mark.parametrize(("path", "kind"), [("/dev/null", "a character device"), ("/tmp", "a directory")])
def test_not_a_block_device(images, path, kind):
    with pytest.raises(ConfigError, match=f"flash target {path} is {kind}, not a block device"):
        write_image(images["raw"], Path(path))


def test_missing_target_and_missing_image(images, tmp_path):
    with pytest.raises(ConfigError, match="does not exist: plug in the card reader"):
        write_image(images["raw"], tmp_path / "sdz")
    with pytest.raises(ConfigError, match="build or download it first"):
        write_image(tmp_path / "nope.img", tmp_path / "t.img", allow_file=True)


def _root_devno() -> tuple[int, int]:
    """The device number of '/' from this process's real mountinfo (the last mount on / wins)."""
    mounts = [m for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text()) if m.mountpoint == "/"]
    assert mounts, "no mount on / in /proc/self/mountinfo"
    return mounts[-1].devno


def _node_for(devno: tuple[int, int], tmp_path: Path) -> Path:
    """A block device node for ``devno``: one in /dev, or one made with mknod."""
    for entry in os.scandir("/dev"):
        try:
            st = entry.stat()
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == devno:
            return Path(entry.path)
    if os.geteuid() != 0:
        pytest.skip(f"no /dev node for {devno} and not root to make one")
    node = tmp_path / "disk-node"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(*devno))
    return node


def test_root_disk_is_refused_as_a_host_disk(tmp_path):
    # check_target only reads; it is what write_image runs before opening anything.
    devno = _root_devno()
    sysdir = sysfs_dir(devno)
    if sysdir is None:
        # An overlay or network root (0:N) sits on no block device of ours: nothing to refuse.
        assert all(not str(d).endswith(f"{devno[0]}:{devno[1]}") for d in host_disks())
        pytest.skip(f"/ is on {devno[0]}:{devno[1]}, which is no block device here (overlay/network root)")
    disk = sysdir.parent if (sysdir / "partition").exists() else sysdir
    assert "holds /" in host_disks()[disk]
    node = _node_for((int(x) for x in (disk / "dev").read_text().split(":")), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        check_target(node)
    message = str(err.value)
    assert "is one of this host's own disks" in message and "holds /" in message
    assert disk.name in message


# --- real block devices (loop) ------------------------------------------------------------------


def _losetup(*args: str) -> str:
    return subprocess.run(["losetup", *args], check=True, capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.fixture
def loop_factory(tmp_path) -> Iterator:
    missing = [tool for tool in ("losetup", "partx", "sfdisk", "mkfs.ext4", "mount") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.skip(
            f"loop device tests need root and these tools: losetup partx sfdisk mkfs.ext4 mount "
            f"(missing: {', '.join(missing) or 'none'})"
        )
    attached: list[str] = []

    def attach(size: int, *, partitions: str | None = None) -> tuple[str, Path]:
        backing = tmp_path / f"backing{len(attached)}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        if partitions:
            subprocess.run(["sfdisk", "-q", str(backing)], input=partitions, text=True, check=True, timeout=30)
        try:
            dev = _losetup("-f", "--show", *(["-P"] if partitions else []), str(backing))
        except (subprocess.CalledProcessError, OSError) as exc:
            pytest.skip(f"cannot attach a loop device here: {exc}")
        attached.append(dev)
        if partitions and shutil.which("partx"):
            # The scan that -P asks for does not always run here; partx adds the partitions.
            subprocess.run(["partx", "-a", dev], check=False, capture_output=True, timeout=30)
        return dev, backing

    yield attach
    for dev in attached:
        subprocess.run(["losetup", "-d", dev], check=False, timeout=30)


@pytest.fixture
def mounter(tmp_path) -> Iterator:
    mounted: list[Path] = []

    def mount(dev: Path) -> Path:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(dev)], check=True, capture_output=True, timeout=60)
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", str(dev), str(point)], check=True, capture_output=True, timeout=30)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False, timeout=30)


def test_writes_a_real_block_device(loop_factory, images, image_sha):
    dev, backing = loop_factory(8 * MiB)
    with open(backing, "r+b") as f:
        f.write(b"\x5a" * (8 * MiB))  # old content everywhere, zero runs included
    result = write_image(images["xz"], Path(dev))
    size = images["raw"].stat().st_size
    assert result.verified and result.sha256 == image_sha
    assert result.zeroing == "discard"  # loop devices support BLKDISCARD and read discarded blocks as zeros
    assert result.bytes_skipped >= 2 * MiB - 64 * 1024
    with open(backing, "rb") as f:
        assert f.read(size) == images["raw"].read_bytes()


def test_real_block_device_without_discard_writes_zeros(loop_factory, images):
    dev, backing = loop_factory(8 * MiB)
    with open(backing, "r+b") as f:
        f.write(b"\x5a" * (8 * MiB))
    result = make_flasher({"driver": "blockdev", "device": dev, "discard": False}).flash(images["gzip"])
    assert result.zeroing == "written" and result.bytes_skipped == 0 and result.verified


def test_real_block_device_too_small(loop_factory, images):
    dev, backing = loop_factory(2 * MiB)
    with pytest.raises(ConfigError, match=f"flash target {dev} holds only {2 * MiB} bytes"):
        write_image(images["raw"], Path(dev))
    assert backing.read_bytes() == bytes(2 * MiB)


def test_mounted_device_is_refused(loop_factory, mounter, images):
    dev, _ = loop_factory(16 * MiB)
    point = mounter(Path(dev))
    with pytest.raises(ConfigError) as err:
        write_image(images["raw"], Path(dev))
    assert f"is mounted at {point}" in str(err.value) and "unmount it first" in str(err.value)


def test_mounted_partition_refuses_its_disk(loop_factory, mounter, tmp_path):
    dev, _ = loop_factory(16 * MiB, partitions="label: dos\n,6M\n,\n")
    name = Path(dev).name
    part_sys = Path(f"/sys/class/block/{name}/{name}p1")
    if not part_sys.exists():
        pytest.skip("the kernel did not scan the loop device's partitions")
    # No udev here to make /dev/loopNp1: make the node from the number sysfs gives.
    major, minor = (int(x) for x in (part_sys / "dev").read_text().split(":"))
    part = tmp_path / f"{name}p1"
    os.mknod(part, stat.S_IFBLK | 0o600, os.makedev(major, minor))
    with pytest.raises(ConfigError, match=f"is a partition of {name}: an OS image goes to the whole disk"):
        check_target(part)
    point = mounter(part)
    with pytest.raises(ConfigError, match=f"{name}p1 is mounted at {point}"):
        check_target(Path(dev))


def test_device_claimed_exclusively_is_refused(loop_factory, images):
    dev, backing = loop_factory(8 * MiB)
    # What a mount in another mount namespace looks like from here: an exclusive claim.
    holder = os.open(dev, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(ConfigError, match="is in use"):
            write_image(images["raw"], Path(dev))
    finally:
        os.close(holder)
    assert backing.read_bytes() == bytes(8 * MiB)


# --- USB-SD-Mux ---------------------------------------------------------------------------------


FAKE_USBSDMUX = """#!/bin/sh
# Stands in for the usbsdmux CLI: records each call; in host mode the card shows up.
echo "$*" >> "$MUX_LOG"
if [ -n "$MUX_FAIL" ]; then echo "$MUX_FAIL" >&2; exit 1; fi
if [ "$2" = host ] && [ -n "$MUX_CARD" ]; then truncate -s 8M "$MUX_CARD"; fi
exit 0
"""


@pytest.fixture
def fake_mux(tmp_path, monkeypatch) -> dict[str, Path]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "usbsdmux"
    tool.write_text(FAKE_USBSDMUX)
    tool.chmod(0o755)
    sg = tmp_path / "sg7"
    sg.write_bytes(b"")
    log = tmp_path / "mux.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MUX_LOG", str(log))
    return {"sg": sg, "log": log, "card": tmp_path / "card.img"}


def test_usbsdmux_sequence(fake_mux, images, image_sha, monkeypatch):
    monkeypatch.setenv("MUX_CARD", str(fake_mux["card"]))
    flasher = make_flasher(
        {"driver": "usbsdmux", "sg": str(fake_mux["sg"]), "device": str(fake_mux["card"]), "allow_file": True}
    )
    assert isinstance(flasher, UsbSdMuxFlasher)
    result = flasher.flash(images["gzip"])
    assert result.verified and result.sha256 == image_sha
    assert fake_mux["log"].read_text().splitlines() == [f"{fake_mux['sg']} host", f"{fake_mux['sg']} dut"]


def test_usbsdmux_card_never_appears(fake_mux, images):
    flasher = UsbSdMuxFlasher(sg=str(fake_mux["sg"]), device=str(fake_mux["card"]), allow_file=True, appear_timeout=0.3)
    with pytest.raises(InfraError) as err:
        flasher.flash(images["raw"])
    message = str(err.value)
    assert "timed out after 0.3s waiting for the SD card behind USB-SD-Mux" in message
    assert "(flash.appear_timeout)" in message and "is a card inserted" in message
    # Stays in host mode: the board must not boot a card that was not written.
    assert fake_mux["log"].read_text().splitlines() == [f"{fake_mux['sg']} host"]


def test_usbsdmux_failure_shows_its_stderr(fake_mux, images, monkeypatch):
    monkeypatch.setenv("MUX_FAIL", "Does /dev/sg7 really point to a USB-SD-Mux?")
    flasher = UsbSdMuxFlasher(sg=str(fake_mux["sg"]), device=str(fake_mux["card"]), allow_file=True)
    with pytest.raises(InfraError, match="(?s)usbsdmux host failed with exit code 1.*really point to a USB-SD-Mux"):
        flasher.flash(images["raw"])


def test_usbsdmux_missing_mux_or_tool(tmp_path, images, monkeypatch):
    with pytest.raises(ConfigError, match="USB-SD-Mux /dev/sg-testbed-none does not exist"):
        UsbSdMuxFlasher(sg="/dev/sg-testbed-none").flash(images["raw"])
    sg = tmp_path / "sg0"
    sg.write_bytes(b"")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ConfigError, match="pip install usbsdmux"):
        UsbSdMuxFlasher(sg=str(sg)).flash(images["raw"])


# --- make_flasher spec validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"device": "/dev/sdb"}, "flash: missing key 'driver'; set it to one of: blockdev, usbsdmux"),
        ({"driver": "dd"}, "flash: unknown driver 'dd'"),
        ({"driver": "blockdev"}, "flash driver 'blockdev': missing key 'device'"),
        (
            {"driver": "blockdev", "device": "/dev/sdb", "verfy": False},
            "unknown key 'verfy' (did you mean 'verify'?); allowed keys: device, verify, discard, allow_file",
        ),
        ({"driver": "blockdev", "device": "/dev/sdb", "progress": "x"}, "unknown key 'progress'"),
        (
            {"driver": "usbsdmux", "sg": "/dev/sg1", "appear_timeout": "30s"},
            "key 'appear_timeout' must be a number, got '30s'",
        ),
        ({"driver": "usbsdmux", "sg": "/dev/sg1", "appear_timeout": 0}, "must be positive"),
    ],
)
def test_make_flasher_spec_errors(spec, expected):
    with pytest.raises(ConfigError) as err:
        make_flasher(spec)
    assert expected in str(err.value)
    assert set(DRIVERS) == {"blockdev", "usbsdmux"}


def test_an_mbr_image_with_logical_partitions_is_flashed_whole(loop_factory, tmp_path):
    """A Raspberry Pi's layout (p1-p3 primaries, p4 the extended container, p5 and p6 logical): after
    the write, the block device's own table reads back with the same partitions where the image has
    them, the EBR chain of the logical ones included."""
    image = tmp_path / "rpi.img"
    image.write_bytes(b"")
    os.truncate(image, 16 * MiB)
    subprocess.run(
        ["sfdisk", "-q", str(image)],
        input="label: dos\nsize=2MiB, type=c, bootable\nsize=3MiB, type=83\nsize=3MiB, type=83\n"
        "type=5\nsize=2MiB, type=83\ntype=83\n",
        text=True, check=True, timeout=30,
    )  # fmt: skip
    layout = read_layout(image)
    assert [p.index for p in layout.partitions] == [1, 2, 3, 5, 6]
    dev, _backing = loop_factory(16 * MiB)
    assert write_image(image, Path(dev)).verified
    shown = subprocess.run(
        ["partx", "--show", "--noheadings", "-o", "NR,START,SECTORS", dev],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split("\n")  # fmt: skip
    rows = {int(nr): (int(start), int(sectors)) for nr, start, sectors in (r.split() for r in shown if r.strip())}
    assert set(rows) == {1, 2, 3, 4, 5, 6}  # partx lists the extended container as p4
    for part in layout.partitions:
        assert rows[part.index] == (part.start // 512, part.size // 512), part.describe()
