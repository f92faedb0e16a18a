"""The desk, on real QEMU under a real pseudo-terminal: ``python -m testbed console``, a run with
``--keep-on-failure``, and kernel trouble printed during a check flagged or failing it.

Each test drives the command as a person at a terminal would (pexpect spawns it on a pty) and
checks that nothing it started (QEMU, its private directory) outlives it.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pexpect
import pytest

from testbed import reference

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference_image(qemu_tools: None) -> Path:
    return reference.build(log=lambda _line: None)


def _desk_env(runtime: Path) -> dict[str, str]:
    """A desk: a terminal, not CI (``--keep-on-failure`` is refused under CI=true)."""
    runtime.mkdir(exist_ok=True)
    return {**os.environ, "CI": "false", "TESTBED_RUNTIME_DIR": str(runtime), "PYTHONUNBUFFERED": "1"}


def _left_behind(runtime: Path) -> list[str]:
    """What the run left: QEMU processes started for it, files in its runtime directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and str(runtime).encode() in cmdline:
                pids.append(f"qemu pid {entry.name}")
    return pids + [str(p) for p in runtime.iterdir()]


def _log_in(child: pexpect.spawn) -> None:
    """At the serial console: a login prompt (or a shell), root without a password."""
    child.send("\r")
    if child.expect([r"login: ", r"# "], timeout=120) == 0:
        child.send("root\r")
        child.expect(r"# ", timeout=60)


def test_console_reaches_a_shell_and_leaves_with_ctrl_bracket(reference_image: Path, tmp_path: Path) -> None:
    runtime, reports = tmp_path / "rt", tmp_path / "reports"
    child = pexpect.spawn(
        sys.executable, ["-m", "testbed", "console", "--mode", "development", "--report-dir", str(reports)],
        cwd=REPO, env=_desk_env(runtime), timeout=400, encoding="utf-8", codec_errors="replace",
    )  # fmt: skip
    try:
        child.expect(r"ssh -p (\d+) -i \S+id_ed25519 .*root@127\.0\.0\.1")
        child.expect(r"connected to the serial console")
        _log_in(child)
        child.send("echo desk-$((40+2))\r")
        child.expect("desk-42")
        child.send("\x1d")
        child.expect("left the serial console")
        child.expect(pexpect.EOF, timeout=120)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    assert _left_behind(runtime) == []
    log = next(reports.glob("qemu-x86_64/console-*/console.log")).read_text()
    assert "desk-42" in log and "Linux version" in log


CHECKS = """
from testbed.util import wait_until


def _printed(dut, kind):
    # The console reaches testbed a moment after the command returns.
    wait_until(lambda: any(t.kind == kind for t in dut.trouble.since(0)), 30, f"a kernel {kind} on the console")


def test_a_kernel_warning_is_flagged(dut):
    dut.run("echo '<4>WARNING: CPU: 0 PID: 1 at drivers/testbed/warn.c:42 testbed_warn+0x10/0x20' > /dev/kmsg")
    _printed(dut, "warning")


def test_a_kernel_oops_fails_the_check(dut):
    dut.run("echo '<1>Oops: 0000 [#1] PREEMPT SMP NOPTI' > /dev/kmsg")
    _printed(dut, "oops")


def test_a_failed_unit_is_flagged(dut):
    dut.run("systemd-run --wait --unit=testbed-broken false")  # fails, without a word on the console
"""


def test_kernel_trouble_and_a_device_kept_after_a_failure(reference_image: Path, tmp_path: Path) -> None:
    """A WARNING during a check is attached and flagged, an Oops fails its check; with
    --keep-on-failure the device stays up until Enter, and its console can be attached meanwhile."""
    runtime, reports = tmp_path / "rt", tmp_path / "reports"
    checks = tmp_path / "checks" / "test_trouble.py"
    checks.parent.mkdir()
    checks.write_text(textwrap.dedent(CHECKS))
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pytest", "-p", "no:cacheprovider", str(checks), "--report-dir", str(reports), "--keep-on-failure"],
        cwd=checks.parent, env=_desk_env(runtime), timeout=400, encoding="utf-8", codec_errors="replace",
    )  # fmt: skip
    try:
        child.expect(r"1\. qemu-x86_64: ssh -p \d+ ")
        child.expect(r"device number, or Enter to finish> ")
        child.send("1\r")
        child.expect("connected to the serial console")
        _log_in(child)
        child.send("echo kept-$((6*7))\r")
        child.expect("kept-42")
        child.send("\x1d")
        child.expect(r"device number, or Enter to finish> ")
        child.send("\r")
        child.expect(pexpect.EOF, timeout=120)
    finally:
        child.close(force=True)
    assert child.exitstatus == 1, child.before
    assert _left_behind(runtime) == []
    run = next(reports.glob("qemu-x86_64/latest"))
    report = json.loads((run / "report.json").read_text())
    tests = {t["nodeid"].rsplit("::", 1)[1]: t for t in report["tests"]}
    warned, oops = tests["test_a_kernel_warning_is_flagged"], tests["test_a_kernel_oops_fails_the_check"]
    assert warned["outcome"] == "passed"
    trouble = [e for e in warned["evidence"] if e["kind"] == "trouble"]
    assert [e["command"] for e in trouble] == ["warning on qemu-x86_64"], warned["evidence"]
    assert "testbed_warn" in trouble[0]["stdout"] and trouble[0]["exit_code"] == 0
    assert (oops["outcome"], oops["kind"]) == ("failed", "dut")
    assert "kernel trouble" in oops["message"] and "Oops: 0000" in oops["message"]
    assert not [e for e in oops["evidence"] if e["kind"] == "trouble" and "warning" in e["command"]]
    html = (run / "report.html").read_text()
    assert "kernel or service trouble while this check ran" in html and "testbed_warn" in html
    assert "FAILS THE CHECK: oops on qemu-x86_64" in html
    unit = tests["test_a_failed_unit_is_flagged"]
    assert unit["outcome"] == "passed"
    flagged = [e for e in unit["evidence"] if e["kind"] == "trouble"]
    assert [e["command"] for e in flagged] == ["unit on qemu-x86_64"], unit["evidence"]
    assert "testbed-broken.service" in flagged[0]["stdout"] and flagged[0]["exit_code"] == 0
