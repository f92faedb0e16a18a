"""The serial console: always drained, logged with timestamps, driven with pexpect.

A reader thread reads the transport (a QEMU socket, a pty, a serial port) at all times:
a guest that cannot write its console blocks, so nobody may stop reading. What it reads
goes to the timestamped log, to the watchers (kernel panic) and to a queue that a
pexpect spawn consumes when a test waits for something.
"""

from __future__ import annotations

import codecs
import collections
import itertools
import os
import queue
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import pexpect
from pexpect.spawnbase import SpawnBase

from testbed.errors import ConfigError, DutError, InfraError

if TYPE_CHECKING:
    # The stub's name for what expect() takes: a str, bytes, compiled regex, EOF or TIMEOUT.
    from pexpect.spawnbase import _InputRePattern

PANIC_PATTERNS = (
    re.compile(rb"Kernel panic - not syncing[^\r\n]*"),
    re.compile(rb"end Kernel panic[^\r\n]*"),
)
SHELL_PROMPT = "TB-SH# "


class Transport(Protocol):
    """A byte stream to a console: a socket, a pty or a serial port."""

    def read(self, size: int) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class SocketTransport:
    """A connected stream socket (QEMU's serial chardev, a serial server)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        try:
            return self.sock.recv(size)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise InfraError(f"console connection lost while writing: {exc}") from None

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class FdTransport:
    """A file descriptor: the master side of a pty, or an opened tty."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # close() wakes a reader blocked on the fd through this pipe.
        self._wake_r, self._wake_w = os.pipe()

    def read(self, size: int) -> bytes:
        try:
            ready, _, _ = select.select([self.fd, self._wake_r], [], [])
            if self._wake_r in ready:
                return b""
            return os.read(self.fd, size)
        except OSError:  # EIO: the other side of a pty closed
            return b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                raise InfraError(f"console write failed: {exc}") from None
            view = view[written:]

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        for fd in (self.fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class SerialTransport:
    """A serial port opened with pyserial: a local tty, ``/dev/serial/by-id/...``, ``rfc2217://`` or ``socket://``.

    The port is locked exclusively where the platform allows (a second opener of a local
    tty fails at once). If the port fails while reading (a USB adapter pulled out, a
    serial server gone) ``read`` returns end of stream and ``error`` says what happened;
    a failed write raises InfraError.
    """

    # A read returns at least this often, so close() is seen even on transports without cancel_read().
    POLL_S = 0.5

    def __init__(self, url: str, baudrate: int) -> None:
        import serial  # pyserial; imported here so QEMU-only hosts do not load it

        self.url = url
        self.error: str = ""
        self._closing = False
        self._serial_errors: tuple[type[BaseException], ...] = (serial.SerialException, OSError)
        # pyserial's RFC 2217 client has no write timeout (a serial server's TCP send blocks only
        # as long as the network does); every local port gets one.
        options: dict[str, Any] = {"timeout": self.POLL_S, "exclusive": True}
        if not url.startswith("rfc2217://"):
            options["write_timeout"] = 5.0
        try:
            self.port = serial.serial_for_url(url, baudrate=baudrate, **options)
        except ValueError as exc:
            raise ConfigError(
                f"serial console {url!r} is not a usable port or URL ({exc}); use a device such as "
                "/dev/serial/by-id/usb-FTDI_...-if00-port0, or rfc2217://host:port, socket://host:port"
            ) from None
        except serial.SerialException as exc:
            busy = "lock" in str(exc).lower()
            hint = (
                "another program holds the port (a terminal, another run): close it"
                if busy
                else "is the USB serial adapter plugged in? List adapters with 'ls -l /dev/serial/by-id/'; "
                "for 'permission denied' add the user to the dialout group"
            )
            raise InfraError(f"cannot open serial console {url}: {exc}; {hint}") from None
        try:
            # Bytes left from before this open (a previous boot's prompt) belong to no one now.
            self.port.reset_input_buffer()
        except (serial.SerialException, OSError):
            pass

    def read(self, size: int) -> bytes:
        while not self._closing:
            try:
                data = self.port.read(1)
                if data:
                    waiting = self.port.in_waiting
                    if waiting:
                        data += self.port.read(min(waiting, size - 1))
                    return bytes(data)
            except Exception as exc:  # noqa: BLE001 - pyserial raises odd types on a port closed under a read
                if not self._closing:
                    self.error = f"serial adapter {self.url} failed while reading ({exc}): unplugged or gone"
                return b""
        return b""

    def write(self, data: bytes) -> None:
        try:
            self.port.write(data)
        except self._serial_errors as exc:
            self.error = self.error or f"serial adapter {self.url} failed while writing ({exc})"
            raise InfraError(f"{self.error}: the USB serial adapter vanished or the serial server closed") from None

    def close(self) -> None:
        self._closing = True
        cancel = getattr(self.port, "cancel_read", None)
        if cancel is not None:
            try:
                cancel()
            except self._serial_errors:
                pass
        try:
            self.port.close()
        except self._serial_errors:
            pass


@dataclass
class CommandResult:
    """What one command on the device gave back; kept as evidence."""

    command: str
    exit_code: int
    stdout: str
    stderr: str
    started: str
    duration_s: float
    transport: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class _QueueSpawn(SpawnBase):
    """pexpect over the bytes the reader thread hands over."""

    # SpawnBase sets these in its __init__ and class body; its stub leaves them out.
    _decoder: codecs.IncrementalDecoder
    _log: Callable[[str | bytes, str], None]

    def __init__(self, console: Console) -> None:
        super().__init__(timeout=30, maxread=65536, searchwindowsize=None, encoding="utf-8", codec_errors="replace")
        self._console = console
        self.child_fd = -1

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> str:
        if timeout == -1:
            timeout = self.timeout
        self._console.check_fault()
        try:
            chunk = self._console._rx.get(timeout=timeout)
        except queue.Empty:
            self._console.check_fault()
            raise pexpect.TIMEOUT("console quiet") from None
        if chunk is None:
            self._console._rx.put(None)
            self.flag_eof = True
            raise pexpect.EOF("console closed")
        parts = [chunk]
        while True:
            try:
                more = self._console._rx.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._console._rx.put(None)
                break
            parts.append(more)
        data = b"".join(parts)
        s = self._decoder.decode(data, final=False)
        self._log(s, "read")
        return s

    def send(self, s: str | bytes) -> int:
        data = s.encode() if isinstance(s, str) else s
        self._console.transport_write(data)
        return len(data)

    def sendline(self, s: str = "") -> int:
        return self.send(s + "\r")

    def isalive(self) -> bool:
        return not self._console.closed


@dataclass
class ConsoleLog:
    """The console log file, one line per console line, each stamped with wall and boot time."""

    path: Path
    _fh: IO[str] | None = None
    _partial: bytearray = field(default_factory=bytearray)
    _start: float = field(default_factory=time.monotonic)

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def mark(self, text: str) -> None:
        """A line of testbed's own (power on, restore), so the log reads as a timeline."""
        self._start = time.monotonic() if text.startswith("power on") else self._start
        self._write_line(f"==== testbed: {text} ====")

    def insert_earlier(self, what: str, lines: str) -> None:
        """The log of an earlier boot (as another run wrote it, each line with its own stamps),
        between two marks: the first boot of a device restored from a warm device."""
        self.mark(f"{what}: begin")
        if self._fh is not None:
            self._fh.write(lines if lines.endswith("\n") or not lines else lines + "\n")
        self.mark(f"{what}: end")

    def feed(self, data: bytes) -> list[str]:
        self._partial.extend(data)
        lines = []
        while True:
            idx = self._partial.find(b"\n")
            if idx < 0:
                break
            raw = bytes(self._partial[:idx]).rstrip(b"\r")
            del self._partial[: idx + 1]
            line = _clean(raw)
            lines.append(line)
            self._write_line(line)
        # A prompt has no newline until someone answers it; log it when it appears so the
        # log's timeline shows when the device was ready for a login.
        if _PROMPT_END.search(self._partial):
            line = _clean(bytes(self._partial))
            self._partial.clear()
            lines.append(line)
            self._write_line(line)
        return lines

    def partial(self) -> str:
        return _clean(bytes(self._partial))

    def _write_line(self, line: str) -> None:
        if self._fh is None:
            return
        now = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
        self._fh.write(f"[{now} +{time.monotonic() - self._start:8.3f}] {line}\n")
        self._fh.flush()

    def close(self) -> None:
        if self._partial:
            self._write_line(self.partial())
            self._partial.clear()
        if self._fh:
            self._fh.close()
            self._fh = None


_PROMPT_END = re.compile(rb"login: ?$")
_ANSI = re.compile(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")


def _clean(raw: bytes) -> str:
    """Console bytes as readable text: no colour codes or carriage returns."""
    text = raw.decode("utf-8", errors="replace")
    text = _ANSI.sub("", text)
    return text.replace("\r", "")


class Console:
    """A device's serial console.

    ``expect()`` waits for a pattern with a named timeout; ``login()`` gets a shell;
    ``run()`` runs one command and returns its exit code and output (stdout and stderr
    arrive merged on a serial line). A kernel panic seen at any time fails the next wait
    at once, with the console tail.
    """

    def __init__(self, transport: Transport, log: ConsoleLog, name: str = "console") -> None:
        self.transport = transport
        self.log = log
        self.name = name
        self.closed = False
        self.closed_reason = ""
        self.logged_in = False
        # What the reader read, for the spawn; None once the transport closed, and it stays
        # queued so every later read sees the end too.
        self._rx: queue.Queue[bytes | None] = queue.Queue()
        self._tail: collections.deque[str] = collections.deque(maxlen=200)
        self._fault: DutError | None = None
        self._window = bytearray()
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self.watchers: list[Callable[[str], None]] = []
        self.spawn = _QueueSpawn(self)
        self._thread = threading.Thread(target=self._reader, name=f"{name}-reader", daemon=True)
        self._thread.start()

    # -- reading -----------------------------------------------------------------------
    def _reader(self) -> None:
        while True:
            data = self.transport.read(65536)
            if not data:
                break
            self._rx.put(data)
            for line in self.log.feed(data):
                self._tail.append(line)
                for watcher in self.watchers:
                    watcher(line)
            self._watch(data)
        self.closed_reason = getattr(self.transport, "error", "") or ""
        self.closed = True
        self._rx.put(None)

    def _watch(self, data: bytes) -> None:
        self._window.extend(data)
        del self._window[:-4096]
        if self._fault is None:
            for pattern in PANIC_PATTERNS:
                found = pattern.search(self._window)
                if found:
                    self._fault = DutError(f"kernel panic on {self.name}: {found.group(0).decode(errors='replace')}")
                    break

    def clear_fault(self) -> None:
        """Forget a kernel panic seen so far (for waits where a panic is part of the test)."""
        self._fault = None
        self._window.clear()

    def check_fault(self) -> None:
        if self._fault is not None:
            raise DutError(f"{self._fault}\nlast console lines:\n{self.tail()}")

    def lines(self) -> list[str]:
        """The complete lines read so far (the last 200)."""
        return list(self._tail)

    def tail(self, lines: int = 25) -> str:
        out = list(self._tail)[-lines:]
        partial = self.log.partial()
        if partial:
            out.append(partial)
        return "\n".join(out)

    def transport_write(self, data: bytes) -> None:
        if self.closed:
            why = self.closed_reason or "the machine is off or the adapter went away"
            raise InfraError(f"{self.name} is closed ({why}); last console lines:\n{self.tail()}")
        try:
            self.transport.write(data)
        except InfraError as exc:
            raise InfraError(f"{exc}; last console lines:\n{self.tail()}") from None

    # -- waiting -----------------------------------------------------------------------
    def expect(
        self,
        patterns: str | Sequence[str],
        timeout: float,
        what: str,
        *,
        error: type[Exception] = DutError,
    ) -> int:
        """Wait for one of ``patterns`` (regexes); return its index.

        On timeout raise ``error`` naming ``what`` and showing the last console lines.
        """
        pats: list[_InputRePattern] = [patterns] if isinstance(patterns, str) else list(patterns)
        try:
            return int(self.spawn.expect(pats, timeout=timeout))
        except pexpect.TIMEOUT:
            raise error(
                f"timed out after {timeout:g}s waiting for {what} on {self.name}; last console lines:\n{self.tail()}"
            ) from None
        except pexpect.EOF:
            why = f" ({self.closed_reason})" if self.closed_reason else ""
            raise InfraError(
                f"{self.name} closed{why} while waiting for {what}; last console lines:\n{self.tail()}"
            ) from None

    def drain(self) -> None:
        """Forget what was read so far, so the next expect sees only new output."""
        self.read_available()
        self.spawn.buffer = ""

    def read_available(self) -> bytes:
        """What the device printed since the last read, without waiting (an interactive terminal
        reads it this way; the console log has it all anyway)."""
        chunks: list[bytes] = []
        while True:
            try:
                item = self._rx.get_nowait()
            except queue.Empty:
                break
            if item is None:  # the end of the stream stays for the next reader
                self._rx.put(None)
                break
            chunks.append(item)
        return b"".join(chunks)

    def sendline(self, line: str) -> None:
        self.spawn.sendline(line)

    # -- shell -------------------------------------------------------------------------
    def login(self, user: str, login_prompt: str, timeout: float) -> None:
        """Log in at the getty and prepare a quiet shell with a known prompt."""
        with self._lock:
            self.drain()
            self.sendline("")
            self.expect([login_prompt, r"[#$] ?$"], timeout, f"a login prompt ({login_prompt!r})")
            self.sendline(user)
            idx = self.expect([r"[Pp]assword: ?$", r"[#$] ?$"], timeout, "a shell prompt after logging in")
            if idx == 0:
                raise DutError(f"{self.name} asks a password for {user}: serial login needs a passwordless account")
            # One line so it is one round trip: a known prompt, no echo, no bracketed paste, and
            # only the kernel's warnings and worse between command output (they are the trouble
            # testbed/trouble.py watches for; the chatter below them would garble commands).
            # The two functions print a command's markers (see run): each command then costs a
            # few bytes more than itself, and every byte of a UART is an interrupt of the guest.
            self.sendline(
                "export PS1='TB-SH''# ' PS2='' TERM=dumb; stty -echo; bind 'set enable-bracketed-paste off' 2>/dev/null;"
                " dmesg -n 5 2>/dev/null; _tbB() { printf '@@TB%sB\\n' \"$1\"; };"
                ' _tbE() { printf \'\\n@@TB%sE:%s\\n\' "$1" "$2"; }; unset PROMPT_COMMAND'
            )
            self.expect(re.escape(SHELL_PROMPT), timeout, "the prepared shell prompt")
            self.logged_in = True

    def run(self, command: str, timeout: float) -> CommandResult:
        """Run ``command`` in the logged-in shell; return exit code and output."""
        if not self.logged_in:
            raise DutError(f"not logged in on {self.name}")
        with self._lock:
            n = next(self._seq)
            begin, end = f"@@TB{n}B", f"@@TB{n}E"
            started, t0 = utcnow(), time.monotonic()
            self.drain()
            # The markers are printed by the functions login defined, so that an echoed command
            # line never matches. One compound command, so no prompt is printed inside the
            # output; the end marker starts on a new line of its own, so output without a final
            # newline stays exact.
            self.sendline(f"_tbB {n};{{ {command}\n}};_tbE {n} $?")
            self.expect(re.escape(begin) + r"\r?\n", timeout, f"the start of `{command}`")
            self.expect(r"\r?\n" + re.escape(end) + r":(\d+)\r?\n", timeout, f"`{command}` to finish")
            duration = time.monotonic() - t0
            match = self.spawn.match
            output = _clean(self.spawn.before.encode()) if self.spawn.before else ""
            assert match is not None and not isinstance(match, type)
            return CommandResult(
                command=command,
                exit_code=int(match.group(1)),
                stdout=output,
                stderr="",
                started=started,
                duration_s=duration,
                transport="serial",
            )

    def close(self) -> None:
        if not self.closed:
            self.transport.close()
        self._thread.join(timeout=5)
        self.closed = True
