"""Machines a DUT runs on: QEMU (``qemu``) or a real board (``board``), chosen by the profile's ``kind``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.console import ConsoleLog
from testbed.errors import ConfigError
from testbed.machines.base import Machine
from testbed.profile import Profile


def make_machine(
    profile: Profile,
    image: Path,
    console_log: ConsoleLog,
    image_format: str = "raw",
    *,
    lab_nics: list[Any] | None = None,
    media: dict[str, Path] | None = None,
) -> Machine:
    """The machine for ``profile.kind``: ``qemu`` boots a qcow2 overlay, ``board`` flashes and powers a board.

    ``lab_nics`` (taps on the farm's lab network) and ``media`` (read-only disks attached from
    power-on) exist on QEMU only; a board given either is a ConfigError.
    """
    if profile.kind == "board":
        if lab_nics or media:
            raise ConfigError(
                f"{profile.source}: a board has no lab NICs or attached media; "
                "run this check on a QEMU profile, or copy the file with dut.upload()"
            )
        from testbed.machines.board import BoardMachine

        return BoardMachine(profile, image, console_log, image_format)
    from testbed.machines.qemu import QemuMachine

    machine = QemuMachine(profile, image, console_log, image_format, lab_nics)
    machine.media.update(media or {})
    return machine


__all__ = ["Machine", "make_machine"]
