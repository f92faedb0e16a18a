"""One run at a time per board: an flock on a lock file per device, with the holder written in it.

A lock file lives in ``$TESTBED_LOCK_DIR`` (default ``/run/lock/testbed``) and is named
after what it guards: the board's serial port (its real path, so ``/dev/ttyUSB0`` and
its ``/dev/serial/by-id/`` link are one lock) or any other key. ``flock`` is released
by the kernel when the holder dies, however it dies, so a crashed run never leaves a
stale lock; the holder's pid, host, user, start time and command line are written into
the file so that a second run can say who holds the board.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import json
import os
import re
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError, InfraError

DEFAULT_LOCK_DIR = Path("/run/lock/testbed")


def lock_dir() -> Path:
    return Path(os.environ.get("TESTBED_LOCK_DIR") or DEFAULT_LOCK_DIR)


def lock_key(resource: str) -> str:
    """A file name for ``resource``: a device path is resolved first (links name the same port)."""
    if resource.startswith("/"):
        resource = os.path.realpath(resource)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", resource).strip("_")
    return name or "device"


def describe_holder(info: dict[str, Any]) -> str:
    if not info:
        return "another run (it wrote no holder details)"
    return (
        f"pid {info.get('pid')} on {info.get('host')} by {info.get('user')} since {info.get('started')}: "
        f"{info.get('command', '')}"
    )


class DeviceLock:
    """An exclusive lock on one board, held from ``acquire()`` until ``release()`` or process exit.

    ``acquire(wait)``: with ``wait`` 0 a held lock fails at once; otherwise the call waits
    up to ``wait`` seconds. Either way the InfraError names the holder.
    """

    def __init__(self, resource: str, *, what: str = "", directory: Path | None = None) -> None:
        self.resource = resource
        self.what = what or resource
        self.directory = directory or lock_dir()
        self.path = self.directory / f"{lock_key(resource)}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Every user of the lab may need to lock; the sticky bit keeps files their owners'.
            if self.directory.stat().st_uid == os.getuid():
                os.chmod(self.directory, 0o1777)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the board lock {self.path} ({exc}); set TESTBED_LOCK_DIR to a directory "
                "every user of the lab can write"
            ) from None
        return fd

    def holder(self) -> dict[str, Any]:
        """What the current holder wrote into the lock file ({} if nothing readable)."""
        try:
            text = self.path.read_text()
            data = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self, wait: float = 0.0) -> None:
        fd = self._open()
        deadline = time.monotonic() + wait
        gate = threading.Event()
        pause = 0.05
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    holder = describe_holder(self.holder())
                    waited = f"after waiting {wait:g}s (--lock-wait)" if wait > 0 else "(no --lock-wait given)"
                    raise InfraError(
                        f"{self.what} is in use by {holder}; lock {self.path} still held {waited}. "
                        "Wait for that run to end, or pass --lock-wait SECONDS to queue behind it"
                    )
                # flock has no timed wait; polling the non-blocking lock is the portable way.
                gate.wait(min(pause, remaining))
                pause = min(pause * 1.5, 1.0)
        except BaseException:
            os.close(fd)
            raise
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "user": getpass.getuser(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
            "resource": self.resource,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        # Closing the descriptor drops the flock.
        os.close(fd)

    def __enter__(self) -> DeviceLock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
