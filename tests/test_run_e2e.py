"""A whole testbed run as a user starts it: pytest on the smoke suite, in a subprocess.

Checks the report files, that the image is unchanged, that bad input gets one clear line,
and that no QEMU outlives its run, even after Ctrl-C or kill -9 of pytest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import image as img
from testbed import reference
from testbed.util import wait_until

REPO = Path(__file__).resolve().parent.parent


def _env(runtime: Path) -> dict[str, str]:
    runtime.mkdir(exist_ok=True)
    return {**os.environ, "TESTBED_RUNTIME_DIR": str(runtime), "PYTHONUNBUFFERED": "1"}


def _pytest(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


def _qemu_pids(marker: Path) -> list[int]:
    """QEMU processes whose command line mentions ``marker`` (the run's private directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"qemu-system-x86_64") and str(marker).encode() in b" ".join(cmdline):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def reference_image(qemu_tools: None) -> Path:
    return reference.build()


def test_smoke_run_writes_a_passing_report_and_leaves_the_image_untouched(
    reference_image: Path, tmp_path: Path
) -> None:
    before = img.sha256_file(reference_image, use_cache=False)
    reports, runtime = tmp_path / "reports", tmp_path / "rt"
    done = _pytest("suites/smoke", "--report-dir", str(reports), env=_env(runtime))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    latest = reports / "qemu-x86_64" / "latest"
    assert latest.is_symlink()
    report = json.loads((latest / "report.json").read_text())
    assert report["result"] == "passed"
    assert report["device"] == "qemu-x86_64"
    assert report["image"] == {"path": str(reference_image), "sha256": before, "format": "raw"}
    assert report["timings"]["boot_to_ssh_s"] > 0
    assert {t["outcome"] for t in report["tests"]} == {"passed"}
    assert len(report["tests"]) == 4
    fields = {"kind", "transport", "command", "exit_code", "stdout", "stderr", "started", "duration_s", "device"}
    for test in report["tests"]:
        assert test["evidence"], f"{test['nodeid']} kept no evidence"
        for ev in test["evidence"]:
            assert set(ev) == fields
    # The power on is a step on the check that booted the device; the boot's stages are in the report.
    steps = [ev["command"] for test in report["tests"] for ev in test["evidence"] if ev["kind"] == "step"]
    assert "power on (cold)" in steps and "save snapshot ready" in steps, steps
    cold = next(b for b in report["timings"]["boots"] if b["kind"] == "cold")
    stages = [s["stage"] for s in cold["stages"]]
    assert stages[0] == "firmware" and stages[-1] == "ssh" and "kernel" in stages, stages
    assert cold["ssh_ready_s"] == report["timings"]["boot_to_ssh_s"]
    junit = (latest / "junit.xml").read_text()
    assert 'name="image_sha256"' in junit and before in junit
    console = (latest / "console.log").read_text()
    assert "login:" in console and "ssh ready" in console

    assert img.sha256_file(reference_image, use_cache=False) == before
    assert _qemu_pids(runtime) == []


def _problem(args: list[str], tmp_path: Path) -> str:
    done = _pytest("suites/smoke", "--report-dir", str(tmp_path / "r"), *args, timeout=120)
    assert done.returncode == 4, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_missing_image_is_one_clear_line(tmp_path: Path) -> None:
    line = _problem(["--image", str(tmp_path / "nope.img")], tmp_path)
    assert "nope.img" in line and "not found" in line and "--image" in line


def test_a_file_that_is_not_a_disk_image_is_one_clear_line(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.img"
    bogus.write_text("these are my notes, not a disk\n" * 100)
    line = _problem(["--image", str(bogus)], tmp_path)
    assert "notes.img" in line and "not a disk image" in line


def test_an_unknown_device_is_one_clear_line(tmp_path: Path) -> None:
    line = _problem(["--device", "qemu-x86-64-typo"], tmp_path)
    assert "qemu-x86-64-typo" in line and "qemu-x86_64" in line and "--device" in line


def test_a_misspelled_profile_key_is_one_clear_line(tmp_path: Path) -> None:
    profile = tmp_path / "mydev.yaml"
    text = (REPO / "device_profiles" / "qemu-x86_64.yaml").read_text()
    profile.write_text(text.replace("name: qemu-x86_64", "name: mydev").replace("memory_mib:", "memroy_mib:"))
    line = _problem(["--device", str(profile)], tmp_path)
    assert "mydev.yaml" in line and "memroy_mib" in line and "memory_mib" in line


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill-9", "ctrl-c", "sigterm"])
def test_no_qemu_outlives_its_pytest(reference_image: Path, tmp_path: Path, how: signal.Signals) -> None:
    runtime = tmp_path / "rt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "suites/smoke", "--report-dir", str(tmp_path / "r")],
        cwd=REPO, env=_env(runtime), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: _qemu_pids(runtime), 120, "QEMU to start under pytest")
        proc.send_signal(how)
        proc.wait(timeout=60)
        wait_until(lambda: not _qemu_pids(runtime), 15, "QEMU to exit after its pytest went away")
        if how != signal.SIGKILL:  # a run that could clean up removed what it made
            assert sorted(p.name for p in runtime.iterdir()) == [], f"left in {runtime} after {how.name}"
        else:  # kill -9 left its directory: the next run removes it, its owner being gone
            assert list(runtime.iterdir()), "kill -9 left nothing: this test no longer sees a leftover"
            done = _pytest("--collect-only", "-q", "suites/smoke", env=_env(runtime), timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            assert sorted(p.name for p in runtime.iterdir()) == [], f"left in {runtime} after the next run"
    finally:
        proc.kill()
        proc.wait()
