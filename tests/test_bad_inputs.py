"""Every kind of bad input tried, in one table: one line naming the file, field or option and the
fix, exit 4, no traceback, nothing booted and nothing of the user's changed.

Each row makes its inputs in a private directory (a good balenaOS-like image built here with
sfdisk, mkfs and mtools, and one thing wrong), runs pytest in a subprocess as CI would, on a
check that asks for the session's device (``dut``), and checks:

- the exit code (4: the user's to fix);
- no "Traceback" anywhere in stdout and stderr;
- exactly one *error line*: of all lines of stdout and stderr, those that look like an error
  (``ERROR_LINE``: pytest's ``ERROR:``/``E   `` lines, an ``Exit:`` line, anything with
  "Error", "error", "FAILED" or "Traceback") are exactly one, and it holds the row's words;
- nothing booted: the run's ``TESTBED_RUNTIME_DIR`` (where every machine makes its private
  directory before QEMU or a board is touched) is still empty, no ``console*.log`` was written,
  and the run took seconds;
- the user's files are unmodified (sha256 of every input file before and after).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tools

pytest_plugins = ["pytester"]

MiB = 1 << 20
PROFILES = REPO / "device_profiles"
DEVICE = "qemu-x86_64"
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_GUID = "0FC63DAF-8379-11D4-A477-00A0C93EC93B"
CHECK = """
def test_boots(dut):
    pass
"""
ERROR_LINE = re.compile(r"ERROR|[Ee]rror\b|Exit:|^E\s|FAILED|Traceback")
SECONDS = 30  # a run that refuses its input before any boot takes a few seconds


def run(*argv: str | os.PathLike[str], stdin: str | None = None) -> None:
    done = subprocess.run([os.fspath(a) for a in argv], input=stdin, capture_output=True, text=True)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"


def make_disk(path: Path, labels: list[str] | None, config: bytes | None = b'{"deviceType": "genericx86-64"}') -> Path:
    """A 48 MiB GPT disk of five partitions; with ``labels``, filesystems with those labels (the
    first FAT, holding ``config`` as /config.json), without, no filesystems at all."""
    run("truncate", "-s", str(48 * MiB), path)
    run(
        "sfdisk", "-q", path,
        stdin="label: gpt\n"
        f"start=1MiB, size=8MiB, type={ESP_GUID}\n"
        + "".join(f"size=8MiB, type={LINUX_GUID}\n" for _ in range(3))
        + f"type={LINUX_GUID}\n",
    )  # fmt: skip
    if labels is None:
        return path
    starts = [1 + 8 * i for i in range(5)]
    run("mkfs.vfat", "-n", labels[0], "--offset", str(starts[0] * 2048), path, str(8 * 1024))
    for label, start in zip(labels[1:], starts[1:], strict=True):
        size = "8M" if start < starts[-1] else f"{48 - start - 1}M"
        run("mkfs.ext4", "-q", "-F", "-L", label, "-E", f"offset={start * MiB}", path, size)
    if config is not None:
        payload = path.parent / "config.json"
        payload.write_bytes(config)
        run("mcopy", "-i", f"{path}@@{starts[0] * MiB}", payload, "::/config.json")
        payload.unlink()
    return path


@pytest.fixture(scope="module")
def good_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image the default profile accepts before a boot: its labels and a config.json."""
    require_tools("sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "mtype")
    labels = [p["label"] for p in _profile_partitions()]
    return make_disk(tmp_path_factory.mktemp("good") / "balena.img", labels)


def _profile_partitions() -> list[dict[str, str]]:
    import yaml

    return yaml.safe_load((PROFILES / f"{DEVICE}.yaml").read_text())["layout"]["partitions"]


@dataclass
class Case:
    """A row's inputs: ``dir`` holds the user's files (hashed before and after)."""

    dir: Path
    good_image: Path
    monkeypatch: pytest.MonkeyPatch

    def image(self, name: str = "disk.img") -> Path:
        target = self.dir / name
        target.write_bytes(self.good_image.read_bytes())
        return target

    def file(self, name: str, data: bytes) -> Path:
        target = self.dir / name
        target.write_bytes(data)
        return target

    def profile(self, old: str, new: str, base: str = DEVICE, name: str | None = None) -> Path:
        text = (PROFILES / f"{base}.yaml").read_text()
        assert old in text, f"{base}.yaml no longer holds {old!r}: update this row"
        folder = self.dir / "profiles"
        folder.mkdir(exist_ok=True)
        target = folder / f"{name or base}.yaml"
        target.write_text(text.replace(old, new, 1))
        return target


Args = Callable[[Case], list[str]]


@dataclass(frozen=True)
class Row:
    args: Args
    words: tuple[str, ...]
    suite: str = ""  # a path under the repository instead of the one-check module


def _no_labels(c: Case) -> list[str]:
    return ["--image", str(make_disk(c.dir / "nolabels.img", None))]


def _wrong_labels(c: Case) -> list[str]:
    return ["--image", str(make_disk(c.dir / "other.img", ["BOOT", "root", "root2", "state", "data"]))]


def _no_config(c: Case) -> list[str]:
    labels = [p["label"] for p in _profile_partitions()]
    return ["--image", str(make_disk(c.dir / "noconfig.img", labels, config=None))]


def _bad_config(c: Case) -> list[str]:
    labels = [p["label"] for p in _profile_partitions()]
    return ["--image", str(make_disk(c.dir / "badconfig.img", labels, config=b'{"deviceType": '))]


def _gz_no_labels(c: Case) -> list[str]:
    raw = make_disk(c.dir / "nolabels.img", None)
    packed = c.dir / "nolabels.img.gz"
    packed.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=1))
    raw.unlink()
    return ["--image", str(packed)]


def _truncated(c: Case) -> list[str]:
    image = c.image("truncated.img")
    os.truncate(image, 20 * MiB)
    return ["--image", str(image)]


def _loop(c: Case) -> list[str]:
    link = c.dir / "loop.img"
    link.symlink_to(link.name)
    return ["--image", str(link)]


def _fifo(c: Case) -> list[str]:
    os.mkfifo(c.dir / "pipe.img")
    return ["--image", str(c.dir / "pipe.img")]


def _image(c: Case) -> list[str]:
    return ["--image", str(c.image())]


def _board(c: Case, *more: str) -> list[str]:
    return ["--device", "raspberrypi4-64", "--image", str(c.image()), *more]


def _hid_without_hidapi(c: Case) -> list[str]:
    # The package made unimportable for this run, as on a host where it is not installed.
    shim = c.dir / "no-hidapi"
    shim.mkdir()
    (shim / "hid.py").write_text("raise ImportError('No module named hid')\n")
    c.monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))
    return _board(c, "--serial", "/dev/null", "--relay", "hid-relay:1", "--flash-to", "none")


ROWS: dict[str, Row] = {
    # -- images ----------------------------------------------------------------------------
    "image-missing": Row(lambda c: ["--image", str(c.dir / "missing.img")], ("missing.img", "not found", "--image")),
    "image-directory": Row(lambda c: ["--image", str(c.dir)], ("is a directory", "--image")),
    "image-empty": Row(lambda c: ["--image", str(c.file("empty.img", b""))], ("empty.img", "empty")),
    "image-truncated": Row(_truncated, ("truncated.img", "truncated", "re-download or rebuild")),
    "image-not-a-disk": Row(
        lambda c: ["--image", str(c.file("notes.img", b"hello\n" * 2000))], ("notes.img", "is not a disk image")
    ),
    "image-no-labels": Row(_no_labels, ("nolabels.img", "no partition labelled 'resin-boot'", "--device")),
    "image-wrong-labels": Row(_wrong_labels, ("other.img", "labels found: 'BOOT'", "resin-boot")),
    "image-without-config-json": Row(_no_config, ("noconfig.img", "config.json not found")),
    "image-config-json-not-json": Row(_bad_config, ("badconfig.img", "config.json", "not valid JSON")),
    "image-link-loop": Row(_loop, ("loop.img", "cannot read image")),
    "image-fifo": Row(_fifo, ("pipe.img", "not a disk image file")),
    "image-vmdk": Row(
        lambda c: ["--image", str(c.file("disk.vmdk", b"KDMV" + bytes(8188)))],
        ("disk.vmdk", "VMDK", "qemu-img convert"),
    ),
    "image-gz-not-gzip": Row(
        lambda c: ["--image", str(c.file("disk.img.gz", b"plain text"))], ("disk.img.gz", "not a gzip file")
    ),
    "image-gz-no-labels": Row(_gz_no_labels, ("nolabels.img.gz (unpacked)", "no partition labelled 'resin-boot'")),
    # -- profiles --------------------------------------------------------------------------
    "profile-unknown-name": Row(
        lambda c: ["--device", "no-such-device", *_image(c)], ("no-such-device", "known devices")
    ),
    "profile-bad-yaml": Row(
        lambda c: ["--device", str(c.profile("name: qemu-x86_64", "name: [qemu")), *_image(c)],
        ("qemu-x86_64.yaml", "not valid YAML", "line"),
    ),
    "profile-unknown-key": Row(
        lambda c: ["--device", str(c.profile("  memory_mib:", "  memroy_mib:")), *_image(c)],
        ("unknown key 'qemu.memroy_mib'", "did you mean 'memory_mib'"),
    ),
    "profile-missing-key": Row(
        lambda c: ["--device", str(c.profile("arch: x86_64\n", "")), *_image(c)], ("missing required key 'arch'",)
    ),
    "profile-misspelled-required-key": Row(
        lambda c: ["--device", str(c.profile("  machine: qemux86-64", "  machne: qemux86-64")), *_image(c)],
        ("unknown key 'os.machne'", "did you mean 'machine'"),
    ),
    "profile-wrong-type": Row(
        lambda c: ["--device", str(c.profile("  memory_mib: 1024", "  memory_mib: lots")), *_image(c)],
        ("qemu.memory_mib", "lots"),
    ),
    "profile-negative-timeout": Row(
        lambda c: ["--device", str(c.profile("  boot_to_ssh: 240", "  boot_to_ssh: -5")), *_image(c)],
        ("timeouts.boot_to_ssh is -5", "more than 0"),
    ),
    "profile-zero-timeout": Row(
        lambda c: ["--device", str(c.profile("  command: 120", "  command: 0")), *_image(c)],
        ("timeouts.command is 0", "more than 0"),
    ),
    "profile-name-not-file": Row(
        lambda c: ["--device", str(c.profile("name: qemu-x86_64", "name: qemu-x86_64", name="other")), *_image(c)],
        ("other.yaml", "'name' is 'qemu-x86_64'", "make them match"),
    ),
    "profile-firmware-missing": Row(
        lambda c: ["--device", str(c.profile("    code: /usr/", "    code: /nonexistent/usr/")), *_image(c)],
        ("qemu.firmware.code is /nonexistent/usr/", "apt-get install ovmf"),
    ),
    "profile-qemu-binary-missing": Row(
        lambda c: [
            "--device",
            str(c.profile("  binary: qemu-system-x86_64", "  binary: qemu-system-x86_64-gone")),
            *_image(c),
        ],
        ("qemu.binary 'qemu-system-x86_64-gone' is not installed", "apt-get install qemu-system-x86"),
    ),  # fmt: skip
    # -- options ---------------------------------------------------------------------------
    "option-mode-bogus": Row(lambda c: ["--mode", "bogus", *_image(c)], ("--mode 'bogus'", "development")),
    "option-power-cuts-negative": Row(
        lambda c: ["--hup-power-cuts", "-3", *_image(c)], ("--hup-power-cuts '-3'", "0 or more")
    ),
    "option-power-cuts-not-a-number": Row(
        lambda c: ["--hup-power-cuts", "many", *_image(c)], ("--hup-power-cuts 'many'",)
    ),
    "option-run-id-not-a-name": Row(lambda c: ["--run-id", "a/b", *_image(c)], ("--run-id 'a/b'", "letters")),
    "option-inherit-wait-alone": Row(lambda c: ["--inherit-wait", *_image(c)], ("--inherit-wait", "--inherit REPORT")),
    "option-report-dir-is-a-file": Row(
        lambda c: ["--report-dir", str(c.file("reports", b"")), *_image(c)], ("--report-dir", "is a file")
    ),
    "option-report-dir-under-a-file": Row(
        lambda c: ["--report-dir", str(c.file("plain", b"") / "reports"), *_image(c)],
        ("--report-dir", "which is a file"),
    ),
    "option-report-dir-cannot-be-made": Row(
        lambda c: ["--report-dir", "/proc/1/testbed-reports", *_image(c)],
        ("--report-dir /proc/1/testbed-reports", "cannot"),
    ),
    "option-board-port-on-qemu": Row(
        lambda c: ["--serial", "/dev/ttyUSB0", *_image(c)], ("--serial", "apply to boards")
    ),
    "option-relay-bad-format": Row(
        lambda c: _board(c, "--relay", "serial-relay:/dev/ttyUSB1:first"),
        ("--relay 'serial-relay:/dev/ttyUSB1:first'", "write"),
    ),
    # -- board ports and drivers ---------------------------------------------------------
    "board-serial-port-missing": Row(
        lambda c: _board(c, "--serial", "/dev/nonexistent-tty"),
        ("serial port /dev/nonexistent-tty does not exist", "/dev/serial/by-id"),
    ),
    "board-relay-port-missing": Row(
        lambda c: _board(c, "--serial", "/dev/null", "--relay", "serial-relay:/dev/nonexistent-relay:1"),
        ("relay port /dev/nonexistent-relay does not exist", "/dev/serial/by-id"),
    ),
    "board-hid-relay-without-hidapi": Row(_hid_without_hidapi, ("hid-relay", "hidapi", "pip install hidapi")),
    # -- update bundles ------------------------------------------------------------------
    "hup-image-without-bundle": Row(_image, ("--hup-bundle PATH", "--image"), suite="suites/hup"),
    "hup-bundle-missing": Row(
        lambda c: ["--hup-bundle", str(c.dir / "gone.ext4"), *_image(c)], ("--hup-bundle", "gone.ext4", "no such file")
    ),
    "hup-bundle-directory": Row(lambda c: ["--hup-bundle", str(c.dir), *_image(c)], ("--hup-bundle", "a directory")),
}


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ERROR_LINE.search(line)]


def assert_refused(text: str, code: int, words: tuple[str, ...], runtime: Path, reports: Path, took: float) -> None:
    assert code == 4, text
    assert "Traceback" not in text, text
    lines = error_lines(text)
    assert len(lines) == 1, f"expected one error line, got {lines}:\n{text}"
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"{missing} not in the error line {lines[0]!r}"
    assert not list(runtime.iterdir()), f"a machine was made: {list(runtime.iterdir())}"
    if reports.is_dir():
        assert not list(reports.rglob("console*.log")), "a device was powered on"
        assert not list(reports.rglob("report.json")), "a run was opened"
    assert took < SECONDS, f"took {took:.1f}s: something beyond the input check ran"


@pytest.fixture
def case(pytester: pytest.Pytester, good_image: Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    monkeypatch.setenv("TESTBED_CACHE", str(pytester.path / "cache"))
    monkeypatch.setenv("TESTBED_RUNTIME_DIR", str(pytester.mkdir("runtime")))
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("CI", raising=False)
    return Case(pytester.mkdir("inputs"), good_image, monkeypatch)


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_is_one_line_and_exit_4(name: str, case: Case, pytester: pytest.Pytester) -> None:
    row = ROWS[name]
    args = row.args(case)
    before = hashes(case.dir)
    pytester.makepyfile(test_checks=textwrap.dedent(CHECK))
    target = [str(REPO / row.suite)] if row.suite else []
    reports = pytester.path / "reports"
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        *target, "-p", "no:cacheprovider", "--report-dir", str(reports), *args, timeout=SECONDS * 2
    )
    took = time.monotonic() - started
    text = "\n".join(result.outlines + result.errlines)
    if "--report-dir" in args:  # the row's own (the last --report-dir wins)
        reports = Path(args[args.index("--report-dir") + 1])
    assert_refused(text, result.ret, row.words, pytester.path / "runtime", reports, took)
    assert hashes(case.dir) == before, "the user's files changed"


def test_the_table_has_every_kind() -> None:
    kinds = {name.split("-")[0] for name in ROWS}
    assert kinds == {"image", "profile", "option", "board", "hup"}
    assert len(ROWS) >= 25


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (lambda c: ["certify", "--modes", "development", "--image", str(c.dir / "missing.img")], ("missing.img", "not found")),
        (lambda c: ["smoke", "--device", "raspberrypi4-64", "--image", str(c.image()), "--serial", "/dev/nonexistent-tty"],
         ("/dev/nonexistent-tty does not exist", "/dev/serial/by-id")),
        (lambda c: ["smoke", *_no_labels(c)], ("nolabels.img", "no partition labelled 'resin-boot'")),
    ],
    ids=["certify-missing-image", "smoke-missing-serial-port", "smoke-no-labels"],
)  # fmt: skip
def test_the_commands_refuse_bad_input_the_same_way(
    command: Args, words: tuple[str, ...], case: Case, pytester: pytest.Pytester
) -> None:
    """``python -m testbed certify|smoke`` run pytest in a process of their own and add their lines."""
    args = command(case)
    before = hashes(case.dir)
    reports = pytester.path / "reports"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "testbed", *args, "--report-dir", str(reports)],
        capture_output=True, text=True, timeout=SECONDS * 2, cwd=REPO,
    )  # fmt: skip
    took = time.monotonic() - started
    assert_refused(done.stdout + done.stderr, done.returncode, words, pytester.path / "runtime", reports, took)
    assert hashes(case.dir) == before


def test_unknown_key_is_named_before_the_missing_one(tmp_path: Path) -> None:
    """``machne:`` for ``machine:`` is both an unknown key and a missing one: the misspelling is the fix."""
    from testbed.errors import ConfigError
    from testbed.profile import load_profile

    text = (PROFILES / f"{DEVICE}.yaml").read_text()
    path = tmp_path / f"{DEVICE}.yaml"
    path.write_text(text.replace("  machine: qemux86-64", "  machne: qemux86-64", 1))
    with pytest.raises(ConfigError, match=r"unknown key 'os\.machne' \(did you mean 'machine'\?\)"):
        load_profile(str(path))
