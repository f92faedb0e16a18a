"""Small shared pieces: owned child processes, condition waits, private run directories."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from testbed.errors import ConfigError, InfraError

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Runs in the child between fork and exec: the kernel sends ``sig`` when its parent dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, sig)
    # The parent may already be gone between fork and prctl.
    if os.getppid() == 1:
        os._exit(1)


die_with_parent = _die_with_parent  # for a subprocess.Popen's preexec_fn (functools.partial for the signal)


class OwnedProcess:
    """A child process that dies with its owner.

    The child gets PR_SET_PDEATHSIG=SIGKILL, so a ``kill -9`` of the owner takes it down
    too; ``close()`` (and the context manager) kills it and reaps it. Use for every helper
    and emulator testbed starts.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        pass_fds: Sequence[int] = (),
        stdout: int | None = subprocess.DEVNULL,
        stderr_path: Path | None = None,
        cwd: Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        death_signal: int = signal.SIGKILL,
    ) -> None:
        """``death_signal``: what the child gets when its owner dies (SIGKILL; a helper that must
        let go of something first, such as a lease keeper releasing a place, asks for SIGTERM)."""
        self.argv = list(argv)
        self.stderr_path = stderr_path
        binary = shutil.which(self.argv[0])
        if binary is None:
            raise InfraError(f"{self.argv[0]} not found on PATH; install it (see README, 'Requirements')")
        err = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [binary, *self.argv[1:]],
                stdin=stdin,
                stdout=stdout,
                stderr=err,
                pass_fds=tuple(pass_fds),
                preexec_fn=functools.partial(_die_with_parent, death_signal),
                cwd=cwd,
                env=env,
            )
        finally:
            if stderr_path:
                err.close()  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, lines: int = 20) -> str:
        if not self.stderr_path or not self.stderr_path.exists():
            return ""
        text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def kill(self) -> None:
        """Kill at once (a power cut, not a shutdown) and reap."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    close = kill

    def __enter__(self) -> OwnedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    max_interval: float = 0.5,
    abort: Callable[[], None] | None = None,
    on_timeout: Callable[[str], Exception] | None = None,
) -> T:
    """Wait until ``predicate()`` returns something truthy and return it.

    This is for conditions with no event to block on (an SSH banner behind a user-mode
    forward). ``abort`` runs between attempts and raises to stop early (QEMU died, kernel
    panic). On timeout ``on_timeout(message)`` builds the exception (default InfraError).
    """
    deadline = time.monotonic() + timeout
    pause = interval
    gate = threading.Event()
    while True:
        if abort is not None:
            abort()
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            message = f"timed out after {timeout:g}s waiting for {what}"
            raise (on_timeout(message) if on_timeout else InfraError(message))
        gate.wait(min(pause, remaining))
        pause = min(pause * 1.5, max_interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runtime_base() -> Path:
    """Where the runs' private directories live: ``TESTBED_RUNTIME_DIR``, else the system's temp directory."""
    return Path(os.environ.get("TESTBED_RUNTIME_DIR") or tempfile.gettempdir())


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None if
    there is no such process: with the PID, it names one process (a PID is reused, this pair not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after its end.
    return stat.rpartition(")")[2].split()[19]


OWNER_FILE = ".owner"  # in each private directory: "PID START" of the process that made it


def _owner() -> str:
    pid = os.getpid()
    return f"{pid} {_start_time(pid)}\n"


_swept: set[Path] = set()


def sweep_runtime_dirs(base: Path) -> list[Path]:
    """Remove the private directories under ``base`` whose owner is gone (a run killed with
    ``kill -9`` cannot remove its own); never one whose owner still runs, nor one without an
    owner file (another tool's, or one being made right now). Returns those removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith("testbed-"):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue  # not a directory, or another user's: not ours to remove
            pid, started = (Path(entry.path) / OWNER_FILE).read_text().split()
        except (OSError, ValueError):
            continue
        if not pid.isdigit() or _start_time(int(pid)) == started:
            continue  # its owner runs
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def private_dir(prefix: str = "testbed-") -> Path:
    """A new 0700 directory for sockets, overlays and firmware copies of one run.

    It holds ``.owner``: this process's PID and start time (a PID is reused, the pair is not).
    The first one a process makes also removes the leftovers of runs whose process is gone
    (``sweep_runtime_dirs``). The name stays short: unix sockets live in it (108 bytes a path).
    """
    base = runtime_base()
    if base not in _swept:
        _swept.add(base)
        sweep_runtime_dirs(base)
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        path.chmod(0o700)
        (path / OWNER_FILE).write_text(_owner())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise InfraError(no_space(base, exc)) from None
        raise
    return path


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) of the filesystem that holds ``path`` or its nearest existing parent."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def no_space(path: Path, exc: BaseException | None = None) -> str:
    """One line for a full disk: the path, its free space, and what to do."""
    detail = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
    return f"no space left on the disk of {path}{detail}: {_mib(free_bytes(path))} free; free space there"


def check_free_space(path: Path, need: int, what: str, fix: str) -> None:
    """InfraError (the lab's disk) unless the filesystem of ``path`` has ``need`` bytes free for ``what``."""
    have = free_bytes(path)
    if have < need:
        raise InfraError(f"{path} has {_mib(have)} free, {what} need at least {_mib(need)}: {fix}")


def listening_unix_socket(path: Path) -> socket.socket:
    """Bind and listen on a unix socket that a child inherits by fd.

    Binding before the child starts means the parent can connect at once, with no wait
    for the child to create the socket.
    """
    if path.exists():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    os.set_inheritable(sock.fileno(), True)
    return sock


def cache_dir() -> Path:
    """Where testbed keeps built images and hashes between runs."""
    path = Path(os.environ.get("TESTBED_CACHE") or Path.home() / ".cache" / "testbed")
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_tool(name: str, package: str) -> str:
    """Path of a host tool, or a ConfigError naming the package that provides it."""
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"{name} is not installed: install the '{package}' package (apt-get install {package})")
    return found


def qemu_img(*args: str) -> None:
    """Run ``qemu-img`` with ``args``; a failure is an InfraError with its message."""
    tool = require_tool("qemu-img", "qemu-utils")
    done = subprocess.run([tool, *args], capture_output=True, text=True)
    if done.returncode != 0:
        message = done.stderr.strip()
        if "No space left" in message:
            # The file qemu-img writes is the last argument: say where and how much is free.
            raise InfraError(f"qemu-img {args[0]}: {no_space(Path(args[-1]).parent)}")
        raise InfraError(f"qemu-img {' '.join(args)} failed: {message}")
