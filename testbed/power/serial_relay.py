"""LCUS-type USB serial relay modules (CH340 USB-serial chip and a small microcontroller).

Wire protocol, 9600 baud 8N1, one 4-byte frame per command::

    0xA0  channel (1-based)  state (0x00 off, 0x01 on)  checksum = (0xA0 + channel + state) & 0xFF

The modules do not acknowledge commands. Some (LCUS-1 variants) answer a one-byte
status query ``0xFF`` with text lines such as ``CH1:ON``; ``verify: true`` in the
profile uses that answer to check each switch, for modules that have it.

The port is opened through ``serial.serial_for_url``, so a device path
(``/dev/ttyUSB0``, ``/dev/serial/by-id/...``) or a URL (``rfc2217://host:port``,
``socket://host:port``) work alike.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import Protocol

import serial

from testbed.errors import ConfigError, InfraError
from testbed.power.base import DEFAULT_OFF_SECONDS, Switch, check_off_seconds

START = 0xA0
STATUS_QUERY = 0xFF
BAUDRATE = 9600
MAX_CHANNEL = 8
_STATUS_LINE = re.compile(rb"CH\s*(\d+)\s*:\s*(ON|OFF)", re.IGNORECASE)


def frame(channel: int, on: bool) -> bytes:
    """The 4-byte command frame that switches ``channel`` on or off."""
    state = 0x01 if on else 0x00
    return bytes((START, channel, state, (START + channel + state) & 0xFF))


def parse_status(text: bytes) -> dict[int, bool]:
    """Channel states from a status answer such as ``b"CH1:OFF \\r\\nCH2:ON \\r\\n"``."""
    return {int(m.group(1)): m.group(2).upper() == b"ON" for m in _STATUS_LINE.finditer(text)}


class _Port(Protocol):
    """What the driver uses of a port.

    serial_for_url returns a class per URL scheme (a device path, socket://, rfc2217://),
    and no base class they share declares all of these.
    """

    def write(self, data: bytes, /) -> int | None: ...
    def flush(self) -> None: ...
    def reset_input_buffer(self) -> None: ...
    def read_until(self, expected: bytes = ..., size: int | None = ...) -> bytes: ...
    def close(self) -> None: ...


@dataclass
class SerialRelay(Switch):
    """One channel of an LCUS serial relay module.

    The port is opened at the first action and kept open. If it fails (the adapter was
    unplugged), the action raises InfraError naming the port, and the next action opens
    the port afresh, so a re-plugged adapter works again without a restart.
    """

    port: str
    channel: int
    baudrate: int = BAUDRATE
    off_seconds: float = DEFAULT_OFF_SECONDS
    verify: bool = False
    answer_timeout: float = 1.0
    _serial: _Port | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.channel <= MAX_CHANNEL:
            raise ConfigError(
                f"channel must be 1..{MAX_CHANNEL} (the number printed next to the relay), got {self.channel}"
            )
        if self.baudrate <= 0:
            raise ConfigError(f"baudrate must be positive, got {self.baudrate}")
        if self.answer_timeout <= 0:
            raise ConfigError(f"answer_timeout must be positive, got {self.answer_timeout}")
        check_off_seconds(self.off_seconds)

    def preflight(self) -> None:
        if "://" not in self.port and not os.path.exists(self.port):
            by_id = "/dev/serial/by-id"
            present = sorted(os.listdir(by_id)) if os.path.isdir(by_id) else []
            listed = ", ".join(f"{by_id}/{p}" for p in present) or f"none in {by_id}/ (is the relay plugged in?)"
            raise ConfigError(
                f"relay port {self.port} does not exist (--relay, or power.port in the profile): ports present: {listed}"
            )

    def on(self) -> None:
        self._switch(True)

    def off(self) -> None:
        self._switch(False)

    def query(self) -> bool:
        """Ask the module for the state of this channel (0xFF status query).

        Only some modules answer; InfraError when no answer for this channel arrives
        within ``answer_timeout``.
        """
        with self._lock:
            return self._query()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _switch(self, on: bool) -> None:
        with self._lock:
            self._send(frame(self.channel, on))
            if self.verify:
                state = self._query()
                if state != on:
                    raise InfraError(
                        f"relay {self.port} channel {self.channel} reports {'ON' if state else 'OFF'} after being "
                        f"switched {'ON' if on else 'OFF'}: the relay module is faulty or wired to another channel"
                    )

    def _open(self) -> _Port:
        if self._serial is not None:
            return self._serial
        try:
            port = serial.serial_for_url(
                self.port, baudrate=self.baudrate, timeout=self.answer_timeout, write_timeout=2.0
            )
        except ValueError as exc:
            raise ConfigError(
                f"power port '{self.port}' is not a usable serial port or URL ({exc}); use a device path such as "
                "/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0 or a URL such as rfc2217://host:port"
            ) from None
        except serial.SerialException as exc:
            raise InfraError(
                f"cannot open relay port {self.port}: {exc}. Is the relay's USB cable plugged in? "
                "List adapters with 'ls -l /dev/serial/by-id/' and set power.port to the right one; "
                "for 'permission denied' add the user to the dialout group"
            ) from None
        self._serial = port
        return port

    def _drop(self) -> None:
        if self._serial is not None:
            try:
                self._serial.close()
            except (OSError, serial.SerialException):
                pass
            self._serial = None

    def _send(self, data: bytes) -> None:
        port = self._open()
        try:
            port.write(data)
            port.flush()
        except (OSError, serial.SerialException) as exc:
            self._drop()
            raise InfraError(
                f"relay port {self.port} failed while writing ({exc}): the USB adapter vanished or was unplugged; "
                "check the cable and 'ls -l /dev/serial/by-id/'"
            ) from None

    def _query(self) -> bool:
        port = self._open()
        try:
            port.reset_input_buffer()
        except (OSError, serial.SerialException):
            pass
        self._send(bytes((STATUS_QUERY,)))
        answer = b""
        try:
            # Each read blocks for at most answer_timeout (the port's read timeout); an
            # empty read means the module went quiet.
            while True:
                line = port.read_until(b"\n")
                if not line:
                    break
                answer += line
                states = parse_status(answer)
                if self.channel in states:
                    return states[self.channel]
        except (OSError, serial.SerialException) as exc:
            self._drop()
            raise InfraError(f"relay port {self.port} failed while reading ({exc}): the USB adapter vanished") from None
        raise InfraError(
            f"relay {self.port} did not report channel {self.channel} within {self.answer_timeout:g}s after a status "
            f"query (got {answer!r}); many LCUS modules never answer: set power.verify to false for those"
        )
