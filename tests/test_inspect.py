"""``python -m testbed inspect``: the reference image, defective copies of it (qcow2 overlays, so no
2 GiB copy), bad input, a Raspberry Pi style MBR image built here, and compressed images.

Nothing here boots: inspect reads images offline.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed import image as img
from testbed import inspect, reference
from testbed.profile import PROFILES_DIR, load_profile

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
# A real ed25519 public key's shape: its base64 must never reach the output.
SSH_BLOB = base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes(range(32))).decode()
SSH_KEY = f"ssh-ed25519 {SSH_BLOB} alice@laptop"
API_KEY = "0123456789abcdef0123456789abcdef"


def require_tools(*tools: str) -> None:
    """Fail (CI=true) or skip when a host tool is missing; sbin tools are found where inspect finds them."""
    missing = [t for t in tools if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]
    if not missing:
        return
    message = f"needs {', '.join(missing)} (install with ./run, see README)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


def run(*argv: str | os.PathLike[str], stdin: str | None = None) -> str:
    proc = subprocess.run([os.fspath(a) for a in argv], input=stdin, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{argv} failed: {proc.stdout}{proc.stderr}"
    return proc.stdout


def inspect_cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m testbed inspect ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "testbed", "inspect", *(os.fspath(a) for a in args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


# ---------------------------------------------------------------- the reference image and its copies


@pytest.fixture(scope="module")
def reference_image() -> Path:
    """The reference image (cached; a build running elsewhere is waited for on its lock).

    Under CI=true it must be there: a failed build fails the tests instead of skipping them.
    """
    require_tools("mcopy", "mdir", "debugfs", "qemu-img", "qemu-io")
    try:
        return reference.build(log=lambda _l: None)
    except reference.BuildError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"cannot build the reference image here: {exc}")


@pytest.fixture
def overlay(reference_image: Path, tmp_path: Path) -> Path:
    """A qcow2 overlay over the reference image, to edit defects into without copying 2 GiB."""
    dest = tmp_path / "copy.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", reference_image, dest)
    return dest


def _manifest(image: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((image.parent / reference.MANIFEST_NAME).read_text())
    return data


def test_reference_image_page(reference_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    proc = inspect_cli(reference_image)
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\n  inspect of the reference image: {elapsed:.2f} s for the command, {_inspect_seconds(proc.stdout)}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for label in ("resin-boot", "resin-rootA", "resin-rootB", "resin-state", "resin-data"):
        assert label in out
    assert "table    GPT" in out
    assert '"hostname": "testbed-ref"' in out  # config.json, pretty
    assert f'VERSION_ID="{reference.BuildOptions().version}"' in out
    assert _manifest(reference_image)["kernel"] in out
    assert "active root  resin-rootA (resin_root_part=A in /grubenv)" in out
    assert "upgrade_available=0 bootcount=0" in out
    assert "resin-rootB (partition 3): empty" in out
    assert "fingerprint  /balenaos.fingerprint, " in out
    assert "EFI/BOOT/BOOTX64.EFI (name: x86_64, PE machine: x86_64)" in out
    assert "no problems" in out
    assert not proc.stderr


def _inspect_seconds(page: str) -> str:
    last = page.strip().splitlines()[-1] if page.strip() else ""
    return last[last.find("(") + 1 : last.rfind(")")] if "(" in last else "no timing"


def test_reference_image_json(reference_image: Path) -> None:
    proc = inspect_cli(reference_image, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["table"] == "gpt" and data["problems"] == []
    labels = [p["label"] for p in data["partitions"]]
    assert labels == ["resin-boot", "resin-rootA", "resin-rootB", "resin-state", "resin-data"]
    root_a, root_b = data["roots"]
    assert root_a["os_release"]["VERSION_ID"] == reference.BuildOptions().version
    assert _manifest(reference_image)["kernel"] in root_a["kernel_versions"]
    assert root_a["fingerprint"] == "/balenaos.fingerprint" and root_a["fingerprint_files"] > 1000
    assert root_b["state"] == "empty"
    assert data["boot"]["active_root"] == "resin-rootA"
    assert data["boot"]["envs"][0]["variables"] == dict(reference.GRUBENV_DEFAULTS)
    assert data["config"] == {
        "state": "ok",
        "data": json.loads((REPO / "images/boot/config.json").read_text()),
        "error": "",
    }


def test_facts_for_the_report(reference_image: Path) -> None:
    ins = inspect.inspect_image(reference_image, load_profile("qemu-x86_64"))
    facts = ins.facts()
    assert facts["partition_table"] == "gpt"
    assert [p["label"] for p in facts["partitions"]][:2] == ["resin-boot", "resin-rootA"]
    assert facts["partitions"][0]["size"] == 40 * MiB
    assert facts["os_release"]["resin-rootA"]["VERSION_ID"] == reference.BuildOptions().version
    assert facts["os_release"]["resin-rootB"] == "empty"
    assert facts["kernels"]["resin-rootA"] == [_manifest(reference_image)["kernel"]]
    assert facts["active_root"] == "resin-rootA"
    assert facts["fingerprint"]["resin-rootA"] > 1000 and facts["fingerprint"]["resin-rootB"] is None
    assert facts["problems"] == []
    json.dumps(facts)  # report.json takes it as it is
    assert json.loads(ins.to_json())["device"] == "qemu-x86_64"


def test_secrets_in_config_json_are_shortened(overlay: Path) -> None:
    config = img.read_config_json(overlay)
    config["os"]["sshKeys"] = [SSH_KEY]
    config |= {"deviceApiKey": API_KEY, "apiKey": API_KEY, "mixpanelToken": API_KEY, "wifiPassword": "hunter2hunter2"}
    img.write_config_json(overlay, config)
    proc = inspect_cli(overlay)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    as_json = inspect_cli(overlay, "--json")
    for out in (proc.stdout, as_json.stdout):
        assert SSH_BLOB not in out and API_KEY not in out and "hunter2hunter2" not in out
        assert "ssh-ed25519 SHA256:" in out and "alice@laptop" in out
        assert "0123…" in out and "hunt…" in out
    data = json.loads(as_json.stdout)["config"]["data"]
    assert data["deviceApiKey"] == data["apiKey"] == data["mixpanelToken"] == "0123…"
    assert data["hostname"] == "testbed-ref"


def test_invalid_config_json_is_a_problem_with_its_fix(overlay: Path) -> None:
    boot = img.read_layout(overlay).by_label("resin-boot")
    img.write_files_to_fat_in_overlay(overlay, boot, {"/config.json": b'{"hostname": "x",\n'})
    proc = inspect_cli(overlay)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 problem" in proc.stdout
    assert "/config.json in the resin-boot partition is not valid JSON" in proc.stdout
    assert "    fix: fix or regenerate it" in proc.stdout
    problems = json.loads(inspect_cli(overlay, "--json").stdout)["problems"]
    assert [p["fix"] for p in problems] == ["fix or regenerate it"]


def test_missing_fingerprint_is_a_problem_with_its_fix(overlay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root_a = img.read_layout(overlay).by_label("resin-rootA")
    img.edit_ext4_in_overlay(overlay, root_a, {"/balenaos.fingerprint": None})
    started = time.monotonic()
    proc = inspect_cli(overlay)
    with capsys.disabled():  # rootA is in the overlay now, so it is copied out once
        print(f"\n  inspect of an overlay with an edited root: {time.monotonic() - started:.2f} s")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "  - resin-rootA has no /balenaos.fingerprint" in proc.stdout
    assert "    fix: write the md5sum of every file of the root to /balenaos.fingerprint" in proc.stdout
    assert "fingerprint  none" in proc.stdout


def test_the_users_image_is_only_read(reference_image: Path) -> None:
    before = reference_image.stat()
    assert inspect_cli(reference_image).returncode == 0
    after = reference_image.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


# ---------------------------------------------------------------- bad input: one line, exit 4


def _misspelled_profile(tmp: Path) -> Path:
    text = (PROFILES_DIR / "qemu-x86_64.yaml").read_text()
    assert "memory_mib: 1024" in text
    path = tmp / "qemu-x86_64.yaml"
    path.write_text(text.replace("memory_mib: 1024", "memroy_mib: 1024"))
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "image not found: {tmp}/nothing.img"),
        ("text", "{tmp}/notes.txt is not a disk image: no partition table found"),
        ("device", "unknown device 'no-such-board'"),
        ("key", "{tmp}/qemu-x86_64.yaml: unknown key 'qemu.memroy_mib' (did you mean 'memory_mib'?)"),
    ],
)
def test_bad_input_is_one_line_and_exit_4(case: str, expected: str, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("these are notes, not a disk image\n")
    args: list[str | Path] = {
        "missing": [tmp_path / "nothing.img"],
        "text": [tmp_path / "notes.txt"],
        "device": [tmp_path / "notes.txt", "--device", "no-such-board"],
        "key": [tmp_path / "notes.txt", "--device", _misspelled_profile(tmp_path)],  # the profile is read first
    }[case]
    proc = inspect_cli(*args)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("testbed: ")
    assert expected.format(tmp=tmp_path) in lines[0]


def test_help_says_the_exit_codes() -> None:
    proc = inspect_cli("--help")
    assert proc.returncode == 0
    assert "0 no problems; 1 problems found" in " ".join(proc.stdout.split())


# ---------------------------------------------------------------- an MBR image, as on a Raspberry Pi


ARM64_IMAGE_HEADER = bytes(0x38) + b"ARM\x64" + bytes(8)  # what an arm64 kernel Image has at 0x38


def build_mbr_image(tmp: Path, sizes_mib: tuple[int, int, int, int, int]) -> Path:
    """p1 FAT resin-boot (config.json, resinOS_uEnv.txt), p2/p3 ext4 resin-rootA/B, p4 extended,
    p5/p6 ext4 resin-state/resin-data; rootA holds os-release, a kernel, modules and a fingerprint."""
    require_tools("sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "mdir", "debugfs")
    boot, root, _root_b, state, data = sizes_mib
    image = tmp / "pi.img"
    run("truncate", "-s", f"{sum(sizes_mib) + 8}M", image)
    script = (
        f"label: dos\nstart=1MiB, size={boot}MiB, type=c, bootable\nsize={root}MiB, type=83\n"
        f"size={root}MiB, type=83\ntype=5\nsize={state}MiB, type=83\nsize={data}MiB, type=83\n"
    )
    run("sfdisk", "-q", image, stdin=script)
    parts = {p["node"][-1]: p for p in json.loads(run("sfdisk", "-J", image))["partitiontable"]["partitions"]}
    start, kib = (lambda n: str(parts[n]["start"] * 512)), (lambda n: f"{parts[n]['size'] // 2}k")
    fat = "16" if boot >= 16 else "12"  # mkfs.fat would pick FAT32 for a type-c partition, too small for it
    run(
        "mkfs.vfat",
        "-F",
        fat,
        "-n",
        "resin-boot",
        "--offset",
        str(parts["1"]["start"]),
        image,
        str(parts["1"]["size"] // 2),
    )
    for name, text in (
        ("config.json", json.dumps({"hostname": "pi", "deviceApiKey": API_KEY, "os": {"sshKeys": [SSH_KEY]}})),
        ("resinOS_uEnv.txt", "resin_root_part=2\nupgrade_available=0\n"),
    ):
        (tmp / name).write_text(text)
        run("mcopy", "-i", f"{image}@@{start('1')}", tmp / name, f"::/{name}")
    tree = tmp / "rootA"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/os-release").write_text('NAME="Pi OS"\nVERSION_ID=2.0.1\nPRETTY_NAME="Pi OS 2.0.1"\n')
    (tree / "etc").mkdir()
    (tree / "etc/os-release").symlink_to("../usr/lib/os-release")
    (tree / "boot").mkdir()
    (tree / "boot/vmlinuz-6.1.0-test").write_bytes(ARM64_IMAGE_HEADER)
    (tree / "usr/lib/modules/6.1.0-test").mkdir(parents=True)
    (tree / "balenaos.fingerprint").write_text("d41d8cd98f00b204e9800998ecf8427e  /etc/hostname\n" * 3)
    for n, label, content in (("2", "resin-rootA", tree), ("3", "resin-rootB", None), ("5", "resin-state", None)):
        extra = ["-d", str(content)] if content else []
        run("mkfs.ext4", "-q", "-F", "-L", label, *extra, "-E", f"offset={start(n)}", image, kib(n))
    run("mkfs.ext4", "-q", "-F", "-L", "resin-data", "-E", f"offset={start('6')}", image, kib("6"))
    return image


@pytest.fixture(scope="module")
def pi_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sized for the raspberrypi4-64 profile's bounds (sparse: a few MiB on disk)."""
    return build_mbr_image(tmp_path_factory.mktemp("pi"), (40, 256, 256, 16, 64))


def test_mbr_image_lists_the_extended_container(pi_image: Path) -> None:
    proc = inspect_cli(pi_image, "--device", "raspberrypi4-64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line[:3].strip().isdigit()}
    assert list(rows) == ["1", "2", "3", "4", "5", "6"]
    assert "(extended)" in rows["4"] and "container of 5, 6, not in the label order" in rows["4"]
    for n, label in (("1", "resin-boot"), ("2", "resin-rootA"), ("3", "resin-rootB"), ("5", "resin-state")):
        assert label in rows[n] and rows[n].endswith("ok")
    assert "table    MBR (dos)" in proc.stdout
    assert "u-boot env   /resinOS_uEnv.txt: resin_root_part=2 upgrade_available=0" in proc.stdout
    assert "active root  resin-rootA (resin_root_part=2 in /resinOS_uEnv.txt)" in proc.stdout
    assert 'VERSION_ID="2.0.1"' in proc.stdout and "6.1.0-test" in proc.stdout
    assert "[aarch64]" in proc.stdout  # the kernel's header, matching the profile's arch
    assert "fingerprint  /balenaos.fingerprint, 3 files" in proc.stdout
    assert API_KEY not in proc.stdout and SSH_BLOB not in proc.stdout
    assert "no problems" in proc.stdout


def test_mbr_image_facts_and_a_gpt_profile(pi_image: Path) -> None:
    ins = inspect.inspect_image(pi_image, load_profile("raspberrypi4-64"))
    kinds = [(p["number"], p["kind"]) for p in ins.facts()["partitions"]]
    assert kinds == [
        (1, "partition"),
        (2, "partition"),
        (3, "partition"),
        (4, "extended"),
        (5, "partition"),
        (6, "partition"),
    ]
    assert ins.facts()["kernels"] == {"resin-rootA": ["6.1.0-test"], "resin-rootB": []}
    # Against the x86 QEMU profile: the table type and the kernel's architecture are wrong.
    wrong = [p.what for p in inspect.inspect_image(pi_image, load_profile("qemu-x86_64")).problems]
    assert "the partition table is MBR, the profile expects GPT" in wrong
    assert "the kernel in resin-rootA is for aarch64, the device qemu-x86_64 is x86_64" in wrong


# ---------------------------------------------------------------- compressed images (testbed.unpack)


@pytest.fixture(scope="module")
def tiny_pi(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small MBR image and a copy of the raspberrypi4-64 profile whose bounds it fits."""
    tmp = tmp_path_factory.mktemp("tiny")
    image = build_mbr_image(tmp, (8, 8, 8, 4, 8))
    data = yaml.safe_load((PROFILES_DIR / "raspberrypi4-64.yaml").read_text())
    data["name"] = "tiny-pi"
    for spec in data["layout"]["partitions"]:
        spec["min_mib"] = 1
    profile = tmp / "tiny-pi.yaml"
    profile.write_text(yaml.safe_dump(data))
    return image, profile


def _gzip(image: Path, dest: Path) -> None:
    with open(image, "rb") as src, gzip.open(dest, "wb", compresslevel=1) as out:
        shutil.copyfileobj(src, out)


def _zip(image: Path, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.write(image, "pi.img")


@pytest.mark.parametrize(("suffix", "pack"), [(".img.gz", _gzip), (".zip", _zip)], ids=["gz", "zip"])
def test_compressed_image_is_unpacked_once_and_inspected(
    suffix: str, pack: Callable[[Path, Path], None], tiny_pi: tuple[Path, Path], tmp_path: Path
) -> None:
    image, profile = tiny_pi
    packed = tmp_path / f"pi{suffix}"
    pack(image, packed)
    env = {"TESTBED_CACHE": str(tmp_path / "cache")}
    for _ in range(2):  # the second run finds it in the cache
        proc = inspect_cli(packed, "--device", profile, "--json", env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        data = json.loads(proc.stdout)
        assert data["image"] == str(packed) and data["read_from"] != str(packed)
        assert Path(data["read_from"]).is_relative_to(tmp_path / "cache")
        assert [p["kind"] for p in data["partitions"]].count("extended") == 1
        assert data["roots"][0]["os_release"]["VERSION_ID"] == "2.0.1"
    assert len(list((tmp_path / "cache/unpacked").glob("*/*"))) == 1


# ---------------------------------------------------------------- the readers' pieces


def test_uboot_env_binary_and_redundant() -> None:
    body = b"resin_root_part=3\0upgrade_available=1\0\0" + bytes(64)
    plain = struct.pack("<I", binascii.crc32(body)) + body
    redundant = struct.pack("<I", binascii.crc32(body)) + b"\x01" + body
    assert inspect._parse_uboot_env(plain) == ({"resin_root_part": "3", "upgrade_available": "1"}, "")
    assert inspect._parse_uboot_env(redundant)[0]["resin_root_part"] == "3"
    assert "bad CRC" in inspect._parse_uboot_env(b"\0\0\0\0" + body)[1]


def test_redact_config() -> None:
    shown = inspect.redact_config(
        {"provisioningApiKey": API_KEY, "nested": {"token": 12345678}, "os": {"sshKeys": ["not a key"]}, "a": [1]}
    )
    assert shown == {
        "provisioningApiKey": "0123…",
        "nested": {"token": "1234…"},
        "os": {"sshKeys": ["not …"]},
        "a": [1],
    }
    assert inspect.redact_config({"password": "abc"}) == {"password": "a…"}  # never more than half of it


def test_architecture_mismatch_is_seen(reference_image: Path) -> None:
    """The x86_64 reference image against an aarch64 profile: its EFI loader and its kernel say so."""
    problems = inspect.inspect_image(reference_image, load_profile("raspberrypi4-64")).problems
    wrong = {p.what: p.fix for p in problems}
    loader = "the EFI loader EFI/BOOT/BOOTX64.EFI is for x86_64, the device raspberrypi4-64 is aarch64"
    assert wrong[loader] == "use an image built for aarch64, or pick the profile of this image's device with --device"
    assert "the kernel in resin-rootA is for x86_64, the device raspberrypi4-64 is aarch64" in wrong
    assert "the partition table is GPT, the profile expects MBR" in wrong
