"""Machines a DUT runs on, chosen by the profile: QEMU (``kind: qemu``), a real board
(``kind: board``), or a board on the virtual bench (``kind: board`` with ``board.bench: virtual``).

Adding a machine kind is a class with the ``Machine`` core and its ``Capabilities``
(``testbed.machines.base``) and one entry in ``_KINDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.console import ConsoleLog
from testbed.errors import ConfigError
from testbed.machines.base import Capabilities, Machine
from testbed.profile import Profile


def _qemu(profile: Profile, image: Path, console_log: ConsoleLog, image_format: str, lab_nics: list[Any]) -> Machine:
    from testbed.machines.qemu import QemuMachine

    return QemuMachine(profile, image, console_log, image_format, lab_nics)


def _board(profile: Profile, image: Path, console_log: ConsoleLog, image_format: str, lab_nics: list[Any]) -> Machine:
    from testbed.machines.board import BoardMachine

    return BoardMachine(profile, image, console_log, image_format)


def _remote_board(
    profile: Profile, image: Path, console_log: ConsoleLog, image_format: str, lab_nics: list[Any]
) -> Machine:
    from testbed.machines.remote import RemoteBoardMachine

    return RemoteBoardMachine(profile, image, console_log, image_format)


def _virtual_board(
    profile: Profile, image: Path, console_log: ConsoleLog, image_format: str, lab_nics: list[Any]
) -> Machine:
    from testbed.machines.virtual_bench import VirtualBoardMachine

    return VirtualBoardMachine(profile, image, console_log, image_format)


Factory = Callable[[Profile, Path, ConsoleLog, str, list[Any]], Machine]
# (kind, bench) -> how to make one, and the capabilities it provides (known before one exists).
# "several": more than one device of the profile at once (a real board is one board).
_KINDS: dict[tuple[str, str], tuple[Factory, frozenset[str]]] = {
    ("qemu", ""): (_qemu, frozenset({"snapshots", "disk_copy", "link", "media", "lab_nics", "several"})),
    ("board", ""): (_board, frozenset({"reflash"})),
    ("board", "virtual"): (_virtual_board, frozenset({"reflash", "several"})),
    ("board", "labgrid"): (_remote_board, frozenset({"reflash"})),
}


def _kind(profile: Profile) -> tuple[str, str]:
    if profile.kind == "board" and profile.board is not None and profile.board.place:
        return "board", "labgrid"
    bench = profile.board.bench if profile.kind == "board" and profile.board is not None else "none"
    return profile.kind, "" if bench == "none" else bench


def provides(profile: Profile) -> frozenset[str]:
    """The capabilities a machine of ``profile`` has, before one is made (e.g. to decide whether
    to attach a medium or copy a file over SSH instead)."""
    return _KINDS[_kind(profile)][1]


def check_host(profile: Profile) -> None:
    """What a machine of ``profile`` needs on this host (an emulator, firmware, a serial port, a
    relay driver's package), checked before any machine exists: ConfigError naming the profile
    key or the option and the fix. The run calls it once, before anything boots."""
    kind = _kind(profile)
    if kind == ("board", "labgrid"):
        from testbed.machines.remote import check_host as remote_check

        remote_check(profile)
        return
    if kind == ("board", ""):
        from testbed.machines.board import check_host as board_check

        board_check(profile)
        return
    from testbed.machines.qemu import check_host as qemu_check

    assert profile.qemu is not None  # QEMU and the virtual bench: the profile's validator
    qemu_check(profile.qemu, profile.source)


def make_machine(
    profile: Profile,
    image: Path,
    console_log: ConsoleLog,
    image_format: str = "raw",
    *,
    lab_nics: list[Any] | None = None,
    media: dict[str, Path] | None = None,
) -> Machine:
    """The machine for ``profile``. ``lab_nics`` (taps on the farm's lab network) and ``media``
    (read-only disks attached from power on) need the machine's capabilities for them; a
    machine without is a ConfigError that says what to do instead.
    """
    factory, capabilities = _KINDS[_kind(profile)]
    if lab_nics and "lab_nics" not in capabilities:
        raise ConfigError(f"{profile.source}: a {profile.kind} device has no NIC on the lab network; run this on QEMU")
    if media and "media" not in capabilities:
        raise ConfigError(
            f"{profile.source}: a {profile.kind} device has no attached media; copy the file with dut.upload()"
        )
    machine = factory(profile, image, console_log, image_format, list(lab_nics or []))
    if media:
        attach = machine.capabilities.media
        assert attach is not None  # stated by _KINDS
        attach.attach_media(media)
    return machine


__all__ = ["Capabilities", "Machine", "check_host", "make_machine", "provides"]
