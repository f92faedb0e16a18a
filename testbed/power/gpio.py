"""Power through one GPIO line (a relay or MOSFET driven by the lab host's GPIO header).

Uses libgpiod v2 through the ``gpiod`` Python package (``gpiod.request_lines``). The
package is imported only when the line is first switched, so testbed works without it
when no profile uses this driver. The line is requested as an output at the first
action and held: releasing it would let the kernel leave the pin floating.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import ConfigError, InfraError
from testbed.power.base import DEFAULT_OFF_SECONDS, Switch, check_off_seconds

CONSUMER = "testbed-power"


def import_gpiod() -> Any:
    """The ``gpiod`` module (libgpiod v2), or a ConfigError that says how to install it."""
    try:
        import gpiod  # optional dependency, needed only by this driver
    except ImportError:
        raise ConfigError(
            "power driver 'gpio' needs the 'gpiod' Python package (libgpiod v2 bindings): pip install 'gpiod>=2'"
        ) from None
    if not hasattr(gpiod, "request_lines"):
        raise ConfigError(
            f"power driver 'gpio' needs libgpiod v2 bindings, found gpiod {getattr(gpiod, '__version__', '?')} "
            "(v1 API): pip install 'gpiod>=2'"
        )
    return gpiod


@dataclass
class GpioPower(Switch):
    """Power on = line active. ``active_low`` for boards whose relay closes on a low pin.

    ``line`` is the offset on the chip or the line's name (as ``gpioinfo`` shows it).
    """

    line: int | str
    chip: str = "/dev/gpiochip0"
    active_low: bool = False
    off_seconds: float = DEFAULT_OFF_SECONDS
    _request: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.line, int) and self.line < 0:
            raise ConfigError(f"line must be an offset of 0 or more or a line name, got {self.line}")
        if isinstance(self.line, str) and not self.line:
            raise ConfigError("line must not be empty; give the line offset or its name from 'gpioinfo'")
        if not self.chip.startswith("/"):
            # gpiod v2 wants a path; accept the short name that gpiodetect prints.
            self.chip = f"/dev/{self.chip}"
        check_off_seconds(self.off_seconds)

    def preflight(self) -> None:
        import_gpiod()

    def on(self) -> None:
        self._set(True)

    def off(self) -> None:
        self._set(False)

    def close(self) -> None:
        with self._lock:
            if self._request is not None:
                self._request.release()
                self._request = None

    def _set(self, active: bool) -> None:
        gpiod = import_gpiod()
        from gpiod.line import Direction, Value

        value = Value.ACTIVE if active else Value.INACTIVE
        with self._lock:
            try:
                if self._request is None:
                    if os.path.exists(self.chip) and not gpiod.is_gpiochip_device(self.chip):
                        raise ConfigError(
                            f"{self.chip} is not a GPIO chip; list chips with 'gpiodetect' and set power.chip"
                        )
                    # Request with the wanted value at once, so the pin never shows the other state.
                    settings = gpiod.LineSettings(
                        direction=Direction.OUTPUT, active_low=self.active_low, output_value=value
                    )
                    self._request = gpiod.request_lines(self.chip, consumer=CONSUMER, config={self.line: settings})
                else:
                    self._request.set_value(self.line, value)
            except FileNotFoundError:
                raise InfraError(
                    f"GPIO chip {self.chip} does not exist; list chips with 'gpiodetect' and set power.chip"
                ) from None
            except PermissionError:
                raise InfraError(
                    f"no permission to use {self.chip}; add the user to the gpio group or adjust its udev rule"
                ) from None
            except ValueError as exc:
                raise ConfigError(f"GPIO line {self.line!r} on {self.chip}: {exc}; check 'gpioinfo'") from None
            except OSError as exc:
                self._request = None
                raise InfraError(
                    f"switching GPIO line {self.line!r} on {self.chip} failed: {exc} "
                    "(line busy? see 'gpioinfo' for its consumer)"
                ) from None
