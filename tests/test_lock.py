"""Board locks between two real processes: fail at once naming the holder, wait, take over after the holder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.errors import InfraError
from testbed.lab.lock import DeviceLock, lock_key

HOLDER = """
import sys
from pathlib import Path
from testbed.lab.lock import DeviceLock
lock = DeviceLock(sys.argv[1], directory=Path(sys.argv[2]))
lock.acquire()
print("held", flush=True)
sys.stdin.readline()  # hold until told to go
lock.release()
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path: Path):
    """A second process holding the lock on /dev/ttyUSB-test until its stdin says go."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, "/dev/ttyUSB-test", str(tmp_path), "--board", "rpi4"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_second_run_fails_at_once_naming_the_holder(holder, tmp_path: Path) -> None:
    lock = DeviceLock("/dev/ttyUSB-test", what="board rpi4", directory=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(InfraError) as err:
        lock.acquire(0)
    assert time.monotonic() - t0 < 1
    message = str(err.value)
    assert f"pid {holder.pid}" in message and "board rpi4 is in use" in message, message
    assert "--board rpi4" in message  # the holder's command line
    assert "--lock-wait" in message


def test_second_run_waits_and_gives_up_after_lock_wait(holder, tmp_path: Path) -> None:
    lock = DeviceLock("/dev/ttyUSB-test", directory=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(InfraError, match=r"after waiting 0.5s"):
        lock.acquire(0.5)
    assert 0.5 <= time.monotonic() - t0 < 3


def test_second_run_gets_the_board_when_the_holder_lets_go(holder, tmp_path: Path) -> None:
    lock = DeviceLock("/dev/ttyUSB-test", directory=tmp_path)
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released"
    lock.acquire(10)
    try:
        assert lock.holder()["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_killed_holder_leaves_no_stale_lock(holder, tmp_path: Path) -> None:
    holder.kill()
    holder.wait()
    lock = DeviceLock("/dev/ttyUSB-test", directory=tmp_path)
    lock.acquire(0)
    lock.release()


def test_two_names_of_one_port_are_one_lock(tmp_path: Path) -> None:
    real = tmp_path / "ttyUSB0"
    real.touch()
    link = tmp_path / "usb-FTDI-if00-port0"
    link.symlink_to(real)
    assert lock_key(str(link)) == lock_key(str(real))
    first = DeviceLock(str(real), directory=tmp_path / "locks")
    first.acquire()
    try:
        with pytest.raises(InfraError, match=f"pid {os.getpid()}"):
            DeviceLock(str(link), directory=tmp_path / "locks").acquire(0)
    finally:
        first.release()
