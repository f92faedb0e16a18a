"""An LCUS serial relay module emulated on a pty.

``RelayEmulator`` opens a pseudo-terminal and behaves like the relay module behind a
CH340 adapter: the serial relay driver opens ``emulator.port`` (``/dev/pts/N``) exactly
as it opens ``/dev/ttyUSB0``, so tests and the virtual-board bench run the production
code path. A reader thread parses the command frames; bad frames are logged and
ignored, as the hardware ignores them. Each change of a channel's state is handed to
``on_change(channel, state)`` on a separate dispatcher thread, in order, so a slow
callback (starting a VM) never stalls the parsing, and a failing callback is logged and
kept in ``callback_errors`` without stopping the emulator.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import tty
from collections.abc import Callable

from testbed.errors import InfraError
from testbed.power.serial_relay import START, STATUS_QUERY

log = logging.getLogger(__name__)

OnChange = Callable[[int, bool], None]


class RelayEmulator:
    """A relay module with ``channels`` relays on a pty.

    ``port``: the pty path the driver opens. ``frames``: every valid 4-byte frame
    received, raw, in order. ``rejected``: ``(bytes, reason)`` for everything that was
    ignored. ``state(channel)``: the relay's current state. ``on_change`` is called only
    when a channel actually changes (switching an ON relay on again does nothing), from
    the dispatcher thread. With ``answer_status`` the module answers the 0xFF status
    query with ``CH1:OFF \\r\\n``-style lines, as LCUS-1 variants do.
    """

    def __init__(
        self,
        channels: int = 4,
        on_change: OnChange | None = None,
        *,
        answer_status: bool = False,
    ) -> None:
        if not 1 <= channels <= 8:
            raise ValueError(f"an LCUS module has 1..8 channels, not {channels}")
        self.channels = channels
        self.on_change = on_change
        self.answer_status = answer_status
        self.frames: list[bytes] = []
        self.rejected: list[tuple[bytes, str]] = []
        self.status_queries = 0
        self.callback_errors: list[BaseException] = []
        self._states = dict.fromkeys(range(1, channels + 1), False)
        self._cond = threading.Condition()
        self._closed = False
        self._master, self._slave = os.openpty()
        # Raw mode: no echo, no CR/LF translation; frame bytes such as 0x0A must pass untouched.
        tty.setraw(self._slave)
        # The emulator holds the slave open itself, so the master never sees a hangup
        # when the driver closes and reopens the port.
        self.port = os.ttyname(self._slave)
        self._wake_r, self._wake_w = os.pipe()
        # (channel, on) changes for the dispatcher; None tells it the emulator closed.
        self._events: queue.SimpleQueue[tuple[int, bool] | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read_loop, name=f"relay-emulator {self.port}", daemon=True)
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name=f"relay-callbacks {self.port}", daemon=True
        )
        self._reader.start()
        self._dispatcher.start()

    def state(self, channel: int) -> bool:
        """Whether relay ``channel`` (1-based) is on."""
        with self._cond:
            return self._states[channel]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Block until ``predicate()`` is true after some input was processed.

        The predicate runs under the emulator's lock each time the reader processed
        input, so it sees ``frames``, ``rejected`` and states consistently.
        """
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise InfraError(f"relay emulator {self.port}: timed out after {timeout:g}s waiting for {what}")

    def close(self) -> None:
        """Unplug the module: stop the threads and close the pty.

        A driver that still holds the port open gets an I/O error on its next write,
        as with a USB adapter pulled out.
        """
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        self._reader.join(5)
        self._events.put(None)
        # A callback stuck in the bench must not hang the test run; the thread is a daemon.
        self._dispatcher.join(5)
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> RelayEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_loop(self) -> None:
        pending = bytearray()
        while True:
            try:
                ready, _, _ = select.select([self._master, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in ready:
                return
            try:
                data = os.read(self._master, 4096)
            except OSError as exc:
                log.warning("relay emulator %s: read failed: %s", self.port, exc)
                return
            if not data:
                return
            pending += data
            with self._cond:
                self._parse(pending)
                self._cond.notify_all()

    def _parse(self, buf: bytearray) -> None:
        """Consume complete commands from ``buf``; a partial frame stays for the next read."""
        noise = bytearray()
        while buf:
            first = buf[0]
            if first == STATUS_QUERY:
                del buf[0]
                self.status_queries += 1
                if self.answer_status:
                    self._answer_status()
                continue
            if first != START:
                noise.append(first)
                del buf[0]
                continue
            if len(buf) < 4:
                break
            raw = bytes(buf[:4])
            _, channel, state, checksum = raw
            if checksum != (START + channel + state) & 0xFF:
                self._reject(raw, "bad checksum")
                # Resynchronise on a start byte inside the bad frame: it may have been a
                # truncated frame followed directly by a good one.
                restart = raw.find(bytes((START,)), 1)
                del buf[: restart if restart > 0 else 4]
                continue
            del buf[:4]
            if not 1 <= channel <= self.channels:
                self._reject(raw, f"no channel {channel} on a {self.channels}-channel module")
                continue
            if state not in (0, 1):
                self._reject(raw, f"unknown state byte 0x{state:02x}")
                continue
            self.frames.append(raw)
            log.debug("relay emulator %s: frame %s", self.port, raw.hex(" "))
            on = state == 1
            if self._states[channel] != on:
                self._states[channel] = on
                self._events.put((channel, on))
        if noise:
            self._reject(bytes(noise), "no start byte 0xA0")

    def _reject(self, raw: bytes, reason: str) -> None:
        log.warning("relay emulator %s: ignored %s: %s", self.port, raw.hex(" "), reason)
        self.rejected.append((raw, reason))

    def _answer_status(self) -> None:
        text = "".join(f"CH{ch}:{'ON' if on else 'OFF'} \r\n" for ch, on in self._states.items())
        try:
            os.write(self._master, text.encode())
        except OSError as exc:
            log.warning("relay emulator %s: status answer failed: %s", self.port, exc)

    def _dispatch_loop(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            channel, on = event
            callback = self.on_change
            if callback is None:
                continue
            try:
                callback(channel, on)
            except BaseException as exc:  # noqa: BLE001 - a bench callback must never kill the relay
                log.exception("relay emulator %s: on_change(%d, %s) failed", self.port, channel, on)
                with self._cond:
                    self.callback_errors.append(exc)
                    self._cond.notify_all()
