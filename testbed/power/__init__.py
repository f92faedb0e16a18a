"""Switching a real board's power: the Power capability and its drivers.

A device profile names the driver and its settings, e.g.::

    power: {driver: serial-relay, port: /dev/serial/by-id/usb-1a86_USB_Serial-if00-port0, channel: 1}

``make_power(spec)`` validates that mapping and returns the driver. Adding a relay type
is one module with a dataclass implementing ``Power`` and one line in ``DRIVERS``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from testbed.power.base import Switch
from testbed.power.command import CommandPower
from testbed.power.gpio import GpioPower
from testbed.power.hid_relay import HidRelay
from testbed.power.labgrid_power import LabgridNetworkPower
from testbed.power.manual import ManualPower
from testbed.power.serial_relay import SerialRelay
from testbed.power.spec import build


@runtime_checkable
class Power(Protocol):
    """Mains power of one board.

    ``on``/``off`` switch and return once the switch happened (or raise). ``cut`` is an
    abrupt loss of power for power-loss tests (for a relay, the same as off). ``cycle``
    is off, the profile's ``off_seconds`` without power (capacitors must discharge),
    then on. Lab failures raise InfraError; wrong settings raise ConfigError.
    """

    def on(self) -> None: ...
    def off(self) -> None: ...
    def cycle(self) -> None: ...
    def cut(self) -> None: ...
    def close(self) -> None: ...


DRIVERS: dict[str, type[Power]] = {
    "serial-relay": SerialRelay,
    "hid-relay": HidRelay,
    "gpio": GpioPower,
    "command": CommandPower,
    "manual": ManualPower,
    "labgrid-network": LabgridNetworkPower,
}


def make_power(spec: dict[str, Any], **code_args: Any) -> Power:
    """The driver for a profile's ``power:`` mapping.

    ``code_args`` are settings only code may give (``input``/``output`` streams of the
    manual driver, an injected HID ``device``). ConfigError names the driver, the bad
    or missing key and the allowed keys.
    """
    return build("power", DRIVERS, spec, **code_args)


def preflight(spec: dict[str, Any]) -> None:
    """Check a ``power:`` mapping before the run starts, without touching the hardware: its keys,
    and what its driver needs on this host (an optional package). ConfigError says how to fix it."""
    driver = make_power(spec)
    try:
        if isinstance(driver, Switch):
            driver.preflight()
    finally:
        driver.close()


__all__ = [
    "DRIVERS",
    "CommandPower",
    "GpioPower",
    "HidRelay",
    "ManualPower",
    "Power",
    "SerialRelay",
    "make_power",
    "preflight",
]
