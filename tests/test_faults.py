"""Faults of the lab, not of the device or the input: a run killed with ``kill -9`` (its private
directory removed by the next run), a full disk where the overlays or the reports live (exit 75,
one line naming the path and its free space), and QEMU killed in the middle of a check (exit 75,
pytest's own summary counts the same errors as report.json, and the next check runs on the
device restored to its snapshot).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import util
from tests.conftest import require_tools
from tests.test_bad_inputs import ERROR_LINE, _profile_partitions, make_disk

HOLD = """
import sys
from testbed.util import private_dir

def test_hold():
    print("HOLDING", private_dir(), flush=True)
    sys.stdin.readline()
"""
NOTHING = """
def test_nothing():
    pass
"""


def _env(runtime: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "CI")}
    return {**env, "TESTBED_RUNTIME_DIR": str(runtime), "PYTHONUNBUFFERED": "1", **more}


def _pytest(cwd: Path, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _holder(cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
    """A pytest run that made its private directory and holds it until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "-q", "test_hold.py"],
        cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:  # blocks until the run says where its directory is
        if line.startswith("HOLDING "):
            return proc, Path(line.split(" ", 1)[1].strip())
    proc.wait()
    raise AssertionError(f"the holding run ended without a private directory (exit {proc.returncode})")


# -- a run killed with kill -9 ------------------------------------------------------------
def test_a_killed_runs_directory_is_removed_by_the_next_run_and_a_live_ones_kept(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    (tmp_path / "test_hold.py").write_text(textwrap.dedent(HOLD))
    (tmp_path / "test_nothing.py").write_text(textwrap.dedent(NOTHING))
    env = _env(runtime)
    killed, killed_dir = _holder(tmp_path, env)
    alive, alive_dir = _holder(tmp_path, env)
    try:
        (killed_dir / "disk.qcow2").write_bytes(b"x" * 4096)  # as an overlay would be
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed_dir.is_dir()  # kill -9: nothing could clean up

        done = _pytest(tmp_path, "test_nothing.py", env=env)

        assert done.returncode == 0, done.stdout + done.stderr
        assert not killed_dir.exists(), "the killed run's directory is still there"
        assert alive_dir.is_dir(), "the directory of a run that still runs was removed"
    finally:
        for proc in (killed, alive):
            if proc.stdin is not None:
                proc.stdin.close()
            proc.kill()
            proc.wait()


def test_a_reused_pid_does_not_keep_a_leftover(tmp_path: Path) -> None:
    """The owner is the PID *and* its start time: a directory whose PID now belongs to another
    process (here: this one, started at another time) is a leftover; one without an owner file
    is not testbed's to judge."""
    pid = os.getpid()
    started = util._start_time(pid)
    mine, reused, unowned = (tmp_path / f"testbed-{n}" for n in ("mine", "bench-reused", "unowned"))
    for d in (mine, reused, unowned):
        d.mkdir()
    (mine / util.OWNER_FILE).write_text(f"{pid} {started}\n")
    (reused / util.OWNER_FILE).write_text(f"{pid} {int(started or 0) + 1}\n")

    assert util.sweep_runtime_dirs(tmp_path) == [reused]
    assert mine.is_dir() and unowned.is_dir()


def test_private_dirs_name_their_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_RUNTIME_DIR", str(tmp_path))
    made = util.private_dir("testbed-board-")
    assert (made / util.OWNER_FILE).read_text().split() == [str(os.getpid()), util._start_time(os.getpid())]
    assert made.stat().st_mode & 0o777 == 0o700
    assert len(made.name) == len("testbed-board-") + 8  # unix sockets live in it: kept short


# -- a full disk ------------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs in a private directory (needs root), unmounted after the test."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        message = f"mounting a tmpfs needs root: {done.stderr.decode().strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(path: Path, leave: int = 0) -> None:
    """Write ``path``'s filesystem full, but for about ``leave`` bytes."""
    free = util.free_bytes(path)
    with open(path / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * max(free - leave, 0))
        except OSError:
            pass


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools("sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "mtype")
    return make_disk(tmp_path_factory.mktemp("img") / "balena.img", [p["label"] for p in _profile_partitions()])


def _one_line(text: str, *words: str) -> str:
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if ERROR_LINE.search(line)]
    assert len(lines) == 1, text
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_full_disk_for_the_overlays_is_a_lab_fault(tiny_fs: Path, image: Path, tmp_path: Path) -> None:
    (tmp_path / "test_boots.py").write_text("def test_boots(dut):\n    pass\n")
    done = _pytest(
        tmp_path, "test_boots.py", "--image", str(image), "--report-dir", str(tmp_path / "r"), env=_env(tiny_fs)
    )

    assert done.returncode == 75, done.stdout + done.stderr
    line = _one_line(done.stdout + done.stderr, str(tiny_fs), "MiB free", "TESTBED_RUNTIME_DIR")
    assert re.search(r"has 1[0-2]\.\d MiB free", line), line
    assert not [p for p in tiny_fs.iterdir()], "a device was made"


def test_full_disk_for_the_reports_is_a_lab_fault(tiny_fs: Path, image: Path, tmp_path: Path) -> None:
    _fill(tiny_fs, leave=1 << 20)
    (tmp_path / "test_boots.py").write_text("def test_boots(dut):\n    pass\n")
    runtime = tmp_path / "rt"
    runtime.mkdir()
    done = _pytest(tmp_path, "test_boots.py", "--image", str(image), "--report-dir", str(tiny_fs), env=_env(runtime))

    assert done.returncode == 75, done.stdout + done.stderr
    _one_line(done.stdout + done.stderr, str(tiny_fs), "MiB free", "--report-dir")
    assert not list(runtime.iterdir()), "a device was made"


def test_a_disk_that_fills_during_the_run_is_a_lab_fault(tiny_fs: Path, image: Path, tmp_path: Path) -> None:
    """The report cannot be written at the end: one line naming the run directory and its free space."""
    (tmp_path / "test_fills.py").write_text(
        textwrap.dedent(
            f"""
            def test_fills(image_under_test):
                with open({str(tiny_fs / "filler")!r}, "wb") as fh:
                    try:
                        fh.write(bytes(64 << 20))
                    except OSError:
                        pass
            """
        )
    )
    done = _pytest(tmp_path, "test_fills.py", "--image", str(image), "--report-dir", str(tiny_fs), env=_env(tmp_path))

    assert done.returncode == 75, done.stdout + done.stderr
    _one_line(done.stdout + done.stderr, str(tiny_fs / "qemu-x86_64"), "0.0 MiB free")


# -- QEMU killed in the middle of a check -------------------------------------------------
KILLED = """
import os
import signal

def test_a_before(dut):
    assert dut.run("true").ok

def test_b_qemu_killed_during_the_check(dut):
    os.kill(dut.machine.process.proc.pid, signal.SIGKILL)
    dut.run("sleep 10")

def test_c_after(dut):
    dut.run("true")
"""


@pytest.fixture(scope="module")
def reference_image(qemu_tools: None) -> Path:
    from testbed import reference

    return reference.build()


def test_qemu_killed_in_a_check_is_an_error_everywhere_and_the_next_check_runs_on_a_restored_device(
    reference_image: Path, tmp_path: Path
) -> None:
    (tmp_path / "test_killed.py").write_text(textwrap.dedent(KILLED))
    runtime = tmp_path / "rt"
    runtime.mkdir()
    reports = tmp_path / "r"
    done = _pytest(
        tmp_path, "test_killed.py", "--report-dir", str(reports), "-p", "no:randomly", env=_env(runtime), timeout=900
    )
    text = done.stdout + done.stderr

    assert done.returncode == 75, text
    (report_file,) = (p for p in reports.glob("*/*/report.json") if p.parent.name != "latest")
    report = json.loads(report_file.read_text())
    assert report["counts"] == {"passed": 2, "failed": 0, "error": 1, "skipped": 0}, text
    tests = {t["nodeid"].rpartition("::")[2]: t for t in report["tests"]}
    killed, after = tests["test_b_qemu_killed_during_the_check"], tests["test_c_after"]
    assert (killed["outcome"], killed["kind"]) == ("error", "infra"), killed
    assert "QEMU" in killed["message"], killed["message"]
    # The check after the fault ran on the device restored to its first snapshot, and says so.
    assert after["outcome"] == "passed", after
    assert "restored to snapshot 'ready'" in after["recovered"], after
    assert [e for e in after["evidence"] if e["command"] == "recovery after a lab fault"], after["evidence"]
    assert tests["test_a_before"]["recovered"] == "" and killed["recovered"] == ""
    suite = ET.parse(report_file.parent / "junit.xml").getroot().find("testsuite")
    assert suite is not None and (suite.get("failures"), suite.get("errors")) == ("0", "1")
    # pytest's own last line tells a CI reader the same: an error, no failure.
    summary = [line for line in done.stdout.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)][-1]
    assert "2 passed" in summary and "1 error" in summary and "failed" not in summary, summary
    assert "ERROR test_killed.py::test_b_qemu_killed_during_the_check" in done.stdout
    assert not list(runtime.iterdir()), "the run's private directories were left"
    shutil.rmtree(reports, ignore_errors=True)
