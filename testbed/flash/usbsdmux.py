"""Flashing through a USB-SD-Mux: the SD card switches between host and board.

Sequence: ``usbsdmux <sg> host`` (the card is now on the host's USB reader), wait until
the card's block device is there with a medium, write and verify it with the
block-device writer, ``usbsdmux <sg> dut`` (the card is back in the board).

The mux is driven through the CLI of the ``usbsdmux`` PyPI package. ``sg`` is the
mux's SCSI generic device (``/dev/sg1``, or the stable ``/dev/usb-sd-mux/id-...``
link from its udev rules). The card's block device is ``device`` when the profile
gives it, else the block device that sysfs shows under the same USB reader as the sg
device. If the write fails the mux stays in host mode: the board must not boot a
half-written card, and a person can inspect the card.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ConfigError, InfraError
from testbed.flash.base import FlashResult, Progress
from testbed.flash.blockdev import write_image
from testbed.power.command import run_checked
from testbed.power.spec import internal
from testbed.util import wait_until

SYS_SG = Path("/sys/class/scsi_generic")


def block_device_beside(sg: Path) -> Path | None:
    """The block device (``/dev/sdX``) of the SCSI device that ``sg`` (``/dev/sgN``) belongs to, if any."""
    name = sg.resolve().name
    block_dir = SYS_SG / name / "device" / "block"
    try:
        names = sorted(p.name for p in block_dir.iterdir())
    except OSError:
        return None
    return Path("/dev") / names[0] if names else None


def _has_medium(path: Path, allow_file: bool) -> bool:
    """True once ``path`` exists and has a non-zero size (a card reader without card has size 0)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if stat.S_ISREG(st.st_mode):
        return allow_file and st.st_size > 0
    if not stat.S_ISBLK(st.st_mode):
        return False
    size_file = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/size")
    try:
        return int(size_file.read_text()) > 0
    except (OSError, ValueError):
        return False


@dataclass
class UsbSdMuxFlasher:
    """Flasher for a board whose SD card sits in a USB-SD-Mux.

    ``appear_timeout``: seconds to wait for the card's block device after switching to
    host (USB enumeration and the card's initialisation). ``command_timeout``: seconds
    for one ``usbsdmux`` call.
    """

    sg: str
    device: str | None = None
    appear_timeout: float = 30.0
    command_timeout: float = 20.0
    verify: bool = True
    discard: bool = True
    allow_file: bool = False
    progress: Progress | None = internal()

    def __post_init__(self) -> None:
        if self.appear_timeout <= 0 or self.command_timeout <= 0:
            raise ConfigError("appear_timeout and command_timeout must be positive")

    def flash(self, image: Path) -> FlashResult:
        if not Path(self.sg).exists():
            raise ConfigError(
                f"USB-SD-Mux {self.sg} does not exist: is the mux plugged in? Its control device is a /dev/sg* "
                "node (see 'lsscsi -g' or /dev/usb-sd-mux/ from its udev rules); set flash.sg to it"
            )
        self.switch("host")
        card = wait_until(
            self._card,
            self.appear_timeout,
            f"the SD card behind USB-SD-Mux {self.sg} to appear as a block device with a medium (flash.appear_timeout)",
            on_timeout=lambda message: InfraError(
                f"{message}; is a card inserted in the mux? Check 'lsblk' and 'dmesg'"
            ),
        )
        result = write_image(
            image, card, allow_file=self.allow_file, verify=self.verify, discard=self.discard, progress=self.progress
        )
        self.switch("dut")
        return result

    def switch(self, mode: str) -> None:
        """Run ``usbsdmux <sg> <mode>`` (host, dut, off)."""
        if shutil.which("usbsdmux") is None:
            raise ConfigError("the 'usbsdmux' command is not installed: pip install usbsdmux")
        run_checked(["usbsdmux", self.sg, mode], self.command_timeout, f"usbsdmux {mode}")

    def _card(self) -> Path | None:
        path = Path(self.device) if self.device else block_device_beside(Path(self.sg))
        if path is not None and _has_medium(path, self.allow_file):
            return path
        return None
