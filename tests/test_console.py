"""The serial console code on a real pty, with a real bash behind a getty-like login."""

from __future__ import annotations

import os
import pty
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.console import Console, ConsoleLog, FdTransport
from testbed.errors import DutError, InfraError

HERE = Path(__file__).parent


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(HERE / "fake_getty.sh")], stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    log = ConsoleLog(tmp_path / "console.log")
    log.open()
    c = Console(FdTransport(master), log, name="pty console")
    yield c
    proc.kill()
    proc.wait()
    c.close()
    log.close()


def test_login_and_run_returns_exit_code_and_output(console: Console) -> None:
    console.login("root", r"login: ?$", timeout=10)
    ok = console.run("echo hello; echo world", timeout=10)
    assert (ok.exit_code, ok.stdout) == (0, "hello\nworld\n")
    bad = console.run("echo oops >&2; false", timeout=10)
    assert bad.exit_code == 1
    assert "oops" in bad.stdout  # a serial line merges stderr into stdout
    assert console.run("exit_with() { return $1; }; exit_with 42", timeout=10).exit_code == 42


def test_output_that_looks_like_a_marker_does_not_confuse_run(console: Console) -> None:
    console.login("root", r"login: ?$", timeout=10)
    tricky = console.run("echo '@@TB1E:0'; printf 'no newline at end'", timeout=10)
    assert tricky.exit_code == 0
    assert tricky.stdout == "@@TB1E:0\nno newline at end"


def test_console_log_has_timestamped_lines(console: Console, tmp_path: Path) -> None:
    console.login("root", r"login: ?$", timeout=10)
    console.run("echo logged-line", timeout=10)
    text = (tmp_path / "console.log").read_text()
    line = next(ln for ln in text.splitlines() if ln.endswith("] logged-line"))
    assert line.startswith("[") and "+" in line.split("]")[0]


def test_timeout_names_what_was_awaited_and_shows_the_tail(console: Console) -> None:
    console.login("root", r"login: ?$", timeout=10)
    console.run("echo before-the-hang", timeout=10)
    with pytest.raises(DutError) as err:
        console.expect("never-printed", timeout=0.5, what="a pattern that never comes")
    message = str(err.value)
    assert "a pattern that never comes" in message and "before-the-hang" in message


def test_kernel_panic_fails_the_next_wait_at_once(console: Console) -> None:
    console.login("root", r"login: ?$", timeout=10)
    console.sendline("echo 'Kernel panic - not syncing: VFS: Unable to mount root fs'")
    with pytest.raises(DutError, match="kernel panic"):
        console.expect("something-else", timeout=30, what="anything")


def test_closed_console_is_an_infra_error(console: Console) -> None:
    console.login("root", r"login: ?$", timeout=10)
    console.sendline("exit")
    with pytest.raises(InfraError, match="closed"):
        console.expect("never", timeout=10, what="output after the shell exited")
