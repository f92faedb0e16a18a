"""What most power drivers share: a switch whose cut is an off and whose cycle is off, wait, on."""

from __future__ import annotations

import time

from testbed.errors import ConfigError

DEFAULT_OFF_SECONDS = 5.0


class Switch:
    """Mixin for drivers that can only switch on and off.

    Subclasses provide ``on()``, ``off()`` and an ``off_seconds`` attribute. ``cut()`` is
    an abrupt loss of power, which for a relay is simply off. ``cycle()`` is off, then
    ``off_seconds`` without power, then on.
    """

    off_seconds: float

    def on(self) -> None:
        raise NotImplementedError

    def off(self) -> None:
        raise NotImplementedError

    def cut(self) -> None:
        self.off()

    def close(self) -> None:
        """Let go of the driver's port or device (nothing to let go of by default)."""

    def preflight(self) -> None:
        """Before the run: ConfigError if this host lacks what the driver needs (an optional
        package). Touches no hardware; nothing to check by default."""

    def cycle(self) -> None:
        self.off()
        # Not a synchronisation wait: the board's capacitors must discharge, or it may not
        # reset at all. The time is the profile's power.off_seconds.
        time.sleep(self.off_seconds)
        self.on()


def check_off_seconds(value: float) -> None:
    """ConfigError unless ``value`` is a sane off time for a power cycle."""
    if value < 0:
        raise ConfigError(f"off_seconds must be 0 or more, got {value}")
