"""USB HID relay boards "USBRelay1/2/4/8" (V-USB firmware, USB id 16c0:05df).

Protocol, as the boards' firmware speaks it through hidapi:

* switch one channel: feature report of 9 bytes
  ``[0x00 (report id), 0xFF on | 0xFD off, channel (1-based), 0, 0, 0, 0, 0, 0]``;
  all channels: ``[0x00, 0xFE all on | 0xFC all off, 0, ...]``.
* read state: ``get_feature_report(0x01, 9)``; the board answers 8 bytes that start
  at index 0 of the returned list: bytes 0..4 are the board's 5-character serial
  (set by the board, not the USB serial string, which is the same for every board),
  byte 7 is the channel bitmask (bit 0 = channel 1).
* the product string is ``USBRelayN``, N being the number of channels.

The driver talks through the ``hidapi`` package (``import hid``). Tests inject a
device object with ``send_feature_report``, ``get_feature_report`` and ``close``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from testbed.errors import ConfigError, InfraError
from testbed.power.base import DEFAULT_OFF_SECONDS, Switch, check_off_seconds
from testbed.power.spec import internal

VENDOR_ID = 0x16C0
PRODUCT_ID = 0x05DF
PRODUCT_PREFIX = "USBRelay"
CMD_ON = 0xFF
CMD_OFF = 0xFD
CMD_ALL_ON = 0xFE
CMD_ALL_OFF = 0xFC
STATE_REPORT = 0x01
REPORT_LENGTH = 9
SERIAL_LENGTH = 5
STATE_OFFSET = 7


class HidDevice(Protocol):
    """The part of ``hid.device`` the driver uses."""

    def send_feature_report(self, data: bytes | list[int]) -> int: ...
    def get_feature_report(self, report_num: int, max_length: int) -> list[int]: ...
    def close(self) -> None: ...


def switch_report(channel: int, on: bool) -> bytes:
    """The 9-byte feature report that switches one channel."""
    return bytes((0x00, CMD_ON if on else CMD_OFF, channel, 0, 0, 0, 0, 0, 0))


def all_report(on: bool) -> bytes:
    """The 9-byte feature report that switches every channel."""
    return bytes((0x00, CMD_ALL_ON if on else CMD_ALL_OFF, 0, 0, 0, 0, 0, 0, 0))


def parse_state_report(data: list[int] | bytes) -> tuple[str, int]:
    """(serial, channel bitmask) from the answer to ``get_feature_report(0x01, 9)``."""
    if len(data) < STATE_OFFSET + 1:
        raise InfraError(f"HID relay answered a state request with {len(data)} bytes, expected 8: {bytes(data)!r}")
    serial = bytes(data[:SERIAL_LENGTH]).split(b"\0", 1)[0].decode("ascii", "replace")
    return serial, data[STATE_OFFSET]


def _import_hid() -> Any:
    try:
        import hid  # optional dependency, needed only by this driver
    except ImportError:
        raise ConfigError("power driver 'hid-relay' needs the 'hidapi' Python package: pip install hidapi") from None
    return hid


@dataclass
class HidRelay(Switch):
    """One channel of a USB HID relay board, chosen by board serial or by hidraw path.

    With neither ``serial`` nor ``path`` the only such board on the host is used. Every
    switch is read back; InfraError when the relay did not switch.
    """

    channel: int
    serial: str | None = None
    path: str | None = None
    off_seconds: float = DEFAULT_OFF_SECONDS
    device: HidDevice | None = internal()
    hid_api: Any = internal()
    channels: int = internal(8)  # from the product string "USBRelayN" once opened
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.channel <= 8:
            raise ConfigError(f"channel must be 1..8 (the relay number on the board), got {self.channel}")
        if self.serial is not None and self.path is not None:
            raise ConfigError("give either serial or path, not both")
        check_off_seconds(self.off_seconds)

    def preflight(self) -> None:
        if self.hid_api is None and self.device is None:
            _import_hid()

    @property
    def where(self) -> str:
        return f"HID relay {self.serial or self.path or '(only board)'}"

    def on(self) -> None:
        self._set(switch_report(self.channel, True), {self.channel: True})

    def off(self) -> None:
        self._set(switch_report(self.channel, False), {self.channel: False})

    def all_on(self) -> None:
        self._set(all_report(True), dict.fromkeys(range(1, self.channels + 1), True))

    def all_off(self) -> None:
        self._set(all_report(False), dict.fromkeys(range(1, self.channels + 1), False))

    def state(self) -> dict[int, bool]:
        """The state of every channel of the board, read from the board."""
        with self._lock:
            _, mask = self._read(self._open())
        return {ch: bool(mask & (1 << (ch - 1))) for ch in range(1, self.channels + 1)}

    def close(self) -> None:
        with self._lock:
            if self.device is not None:
                try:
                    self.device.close()
                finally:
                    self.device = None

    def _set(self, report: bytes, expect: dict[int, bool]) -> None:
        with self._lock:
            device = self._open()
            try:
                sent = device.send_feature_report(report)
            except (OSError, ValueError) as exc:
                self._forget()
                raise InfraError(
                    f"{self.where}: sending the switch command failed ({exc}); is it still plugged in?"
                ) from None
            if sent < 0:
                self._forget()
                raise InfraError(f"{self.where}: the board refused the switch command; is it still plugged in?")
            _, mask = self._read(device)
            wrong = [ch for ch, on in expect.items() if bool(mask & (1 << (ch - 1))) != on]
            if wrong:
                want = "ON" if expect[wrong[0]] else "OFF"
                raise InfraError(
                    f"{self.where}: channel {', '.join(map(str, wrong))} did not switch {want} "
                    f"(state byte 0x{mask:02x}); the relay is stuck or the board lost power"
                )

    def _read(self, device: HidDevice) -> tuple[str, int]:
        try:
            data = device.get_feature_report(STATE_REPORT, REPORT_LENGTH)
        except (OSError, ValueError) as exc:
            self._forget()
            raise InfraError(f"{self.where}: reading the relay state failed ({exc}); is it still plugged in?") from None
        return parse_state_report(data)

    def _forget(self) -> None:
        # The next action opens the board again (it may have been re-plugged). An
        # injected device (hid_api unset) is the caller's to manage and is kept.
        if self.device is not None and self.hid_api is not None:
            try:
                self.device.close()
            except (OSError, ValueError):
                pass
            self.device = None

    def _open(self) -> HidDevice:
        if self.device is not None:
            return self.device
        hid = self.hid_api if self.hid_api is not None else _import_hid()
        self.hid_api = hid
        boards = [
            d
            for d in hid.enumerate(VENDOR_ID, PRODUCT_ID)
            if str(d.get("product_string") or "").startswith(PRODUCT_PREFIX)
        ]
        if not boards:
            raise InfraError(
                f"{self.where}: no USB HID relay board (USB id 16c0:05df, product 'USBRelayN') found; "
                "is it plugged in? Check 'lsusb' and give the user access to /dev/hidraw* with a udev rule"
            )
        found: list[str] = []
        for info in boards:
            raw_path = info["path"]
            path = raw_path.decode() if isinstance(raw_path, bytes) else str(raw_path)
            if self.path is not None and path != self.path:
                found.append(path)
                continue
            device = hid.device()
            try:
                device.open_path(raw_path if isinstance(raw_path, bytes) else raw_path.encode())
            except OSError as exc:
                raise InfraError(
                    f"{self.where}: cannot open {path} ({exc}); give the user access to /dev/hidraw* with a udev rule"
                ) from None
            try:
                serial, _ = self._read(device)
            except InfraError:
                device.close()
                raise
            if self.serial is not None and serial != self.serial:
                found.append(serial)
                device.close()
                continue
            if self.serial is None and self.path is None and len(boards) > 1:
                found.append(serial)
                device.close()
                continue
            self.channels = _channel_count(str(info.get("product_string")))
            if self.channel > self.channels:
                device.close()
                raise ConfigError(f"{self.where} has {self.channels} channels, channel {self.channel} does not exist")
            self.device = device
            return device
        if self.serial is None and self.path is None:
            raise ConfigError(
                f"several HID relay boards are plugged in (serials {', '.join(found)}); set power.serial to one of them"
            )
        raise InfraError(f"{self.where} not found; the boards present are: {', '.join(found)}")


def _channel_count(product: str) -> int:
    try:
        return int(product[len(PRODUCT_PREFIX) :])
    except ValueError:
        return 8
