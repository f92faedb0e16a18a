"""Machines a DUT runs on: QEMU (``qemu``) or a real board (``board``), chosen by the profile's ``kind``."""

from __future__ import annotations

from pathlib import Path

from testbed.console import ConsoleLog
from testbed.machines.base import Machine
from testbed.profile import Profile


def make_machine(profile: Profile, image: Path, console_log: ConsoleLog, image_format: str = "raw") -> Machine:
    """The machine for ``profile.kind``: ``qemu`` boots a qcow2 overlay, ``board`` flashes and powers a board."""
    if profile.kind == "board":
        from testbed.machines.board import BoardMachine

        return BoardMachine(profile, image, console_log, image_format)
    from testbed.machines.qemu import QemuMachine

    return QemuMachine(profile, image, console_log, image_format)


__all__ = ["Machine", "make_machine"]
