"""Putting an OS image on a real board's boot medium: the Flasher capability and its drivers.

A device profile names the driver and its settings, e.g.::

    flash: {driver: usbsdmux, sg: /dev/usb-sd-mux/id-000000000367}
    flash: {driver: blockdev, device: /dev/disk/by-id/usb-Generic_STORAGE_DEVICE-0:0}

``make_flasher(spec)`` validates that mapping and returns the driver. Adding a way to
flash is one module with a dataclass implementing ``Flasher`` and one line in ``DRIVERS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from testbed.flash.base import FlashResult, Progress
from testbed.flash.blockdev import BlockDeviceFlasher, write_image
from testbed.flash.usbsdmux import UsbSdMuxFlasher
from testbed.power.spec import build


@runtime_checkable
class Flasher(Protocol):
    """Writes an image (raw, .gz, .xz, .zst) to the board's boot medium and verifies it.

    Refusals of the target (not a block device, mounted, host disk, too small) are
    ConfigError raised before anything is written; lab failures are InfraError.
    """

    def flash(self, image: Path) -> FlashResult: ...


DRIVERS: dict[str, type[Flasher]] = {
    "blockdev": BlockDeviceFlasher,
    "usbsdmux": UsbSdMuxFlasher,
}


def make_flasher(spec: dict[str, Any], *, progress: Progress | None = None) -> Flasher:
    """The driver for a profile's ``flash:`` mapping; ``progress`` gets (phase, done, total) callbacks."""
    return build("flash", DRIVERS, spec, progress=progress)


__all__ = [
    "DRIVERS",
    "BlockDeviceFlasher",
    "FlashResult",
    "Flasher",
    "Progress",
    "UsbSdMuxFlasher",
    "make_flasher",
    "write_image",
]
