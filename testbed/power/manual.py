"""Power by hand: testbed asks the person at the desk and waits for Enter.

For a bench with no relay yet. By default it talks to the controlling terminal
(``/dev/tty``), not to stdin/stdout, because pytest captures those. Tests pass their
own streams (a pipe or a pty).
"""

from __future__ import annotations

import os
import select
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from testbed.errors import ConfigError, InfraError
from testbed.power.base import Switch, check_off_seconds
from testbed.power.spec import internal


class _Output(Protocol):
    """Where questions go: a text stream given by code, or the tty wrapped in _TextOnBinary."""

    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


@dataclass
class ManualPower(Switch):
    """Asks "switch ON the power of <board> and press Enter" and waits for the Enter.

    ``timeout`` (seconds, optional) bounds the wait for a person; without it the wait is
    unbounded, as a person may be fetching a cable. End of input (no person, no
    terminal) is an InfraError.
    """

    board: str = "the board"
    timeout: float | None = None
    off_seconds: float = 0.0
    input: IO[Any] | None = internal()
    output: IO[Any] | None = internal()
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _tty: IO[Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")
        check_off_seconds(self.off_seconds)

    def on(self) -> None:
        self.ask(f"switch ON the power of {self.board} and press Enter")

    def off(self) -> None:
        self.ask(f"switch OFF the power of {self.board} and press Enter")

    def cut(self) -> None:
        self.ask(f"pull the power plug of {self.board} NOW (no shutdown) and press Enter")

    def cycle(self) -> None:
        self.ask(f"switch OFF the power of {self.board}, wait a few seconds, switch it ON again and press Enter")

    def close(self) -> None:
        if self._tty is not None:
            self._tty.close()
            self._tty = None

    def ask(self, request: str) -> None:
        """Write ``request`` and return when a line arrives on the input."""
        with self._lock:
            inp, out = self._streams()
            _drain(inp)
            out.write(f"\n>>> testbed: {request} ")
            out.flush()
            self._wait_for_enter(inp, request)

    def _streams(self) -> tuple[IO[Any], _Output]:
        if self.input is not None and self.output is not None:
            return self.input, self.output
        if self._tty is None:
            try:
                self._tty = open("/dev/tty", "r+b", buffering=0)  # noqa: SIM115 - kept open for the session
            except OSError as exc:
                raise ConfigError(
                    f"power driver 'manual' needs a person at a terminal, but there is none ({exc}); "
                    "run testbed from a terminal or choose a relay driver for this board"
                ) from None
        return self.input or self._tty, self.output or _TextOnBinary(self._tty)

    def _wait_for_enter(self, inp: IO[Any], request: str) -> None:
        fd = _fileno(inp)
        if fd is None:
            if not inp.readline():
                raise InfraError(f"no answer (end of input) to: {request}")
            return
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # Wait on the descriptor itself: a person's Enter is the event.
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                raise InfraError(f"nobody pressed Enter within {self.timeout:g}s (power.timeout) for: {request}")
            # Read bytes straight from the descriptor; a buffered reader could swallow a
            # later Enter meant for the next question.
            chunk = os.read(fd, 1)
            if not chunk:
                raise InfraError(f"no answer (end of input) to: {request}")
            if chunk == b"\n":
                return


def _fileno(stream: IO[Any]) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


def _drain(stream: IO[Any]) -> None:
    """Forget keys pressed before a question: an old Enter must not answer it."""
    fd = _fileno(stream)
    if fd is None:
        return
    while select.select([fd], [], [], 0)[0]:
        if not os.read(fd, 4096):
            return


class _TextOnBinary:
    """Text writes on a binary tty handle."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        return self.raw.write(text.encode())

    def flush(self) -> None:
        self.raw.flush()
