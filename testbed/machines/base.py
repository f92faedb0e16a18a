"""What the DUT needs of a machine (the core), and what some machines can do besides (capabilities).

The core is the same for every machine: prepare the disk, power on/off/cut, the console,
endpoints of device services, facts. Everything else is a capability: a small Protocol that a
machine either provides or not, stated once in its :class:`Capabilities`. The DUT exposes them
(``dut.snapshots``, ``dut.link``, ``dut.media``, ``dut.reflash``; ``None`` where missing); a
suite asks for one through ``testbed.capabilities.require`` which skips with a reason naming
the capability and the device.

Adding a machine kind means a class with the core and a ``Capabilities`` of what it can do,
and one line in ``testbed.machines.make_machine``'s registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from testbed.console import Console

T = TypeVar("T")

# Told to the DUT's boot model: ("reset", reason) when a machine restarted after a guest
# reset, ("flash", target) and ("flashed", summary) around writing a board's storage.
MachineEvents = Callable[[str, str], None]


class Snapshots(Protocol):
    """Save and load the running machine's whole state (RAM, disks, firmware variables) by name."""

    def save_snapshot(self, name: str) -> None: ...
    def load_snapshot(self, name: str) -> None: ...


class DiskCopy(Protocol):
    """Give a new machine of the same profile and image a copy of this one's disks and snapshots."""

    def copy_disks_to(self, other: Machine) -> None: ...

    def export_disks(self, save: Callable[[dict[str, Path]], T]) -> T:
        """``save(files)`` with this machine's disk files by name (snapshots included), nothing
        changing under them while it runs; returns what ``save`` returned."""
        ...

    def import_disks(self, load: Callable[[dict[str, Path], str], bool]) -> bool:
        """Before the first power on: ``load(destinations, accel)`` copies disk files saved by
        ``export_disks`` (of a machine of the same profile and image, under the accelerator
        ``accel``) to the destinations and returns True, or returns False to prepare as usual."""
        ...


class LinkControl(Protocol):
    """Take the device's network link down and up, as pulling and plugging its cable would."""

    def set_link(self, up: bool) -> None: ...


class ExtraMedia(Protocol):
    """Read-only media attached from power on (an update bundle, like a USB stick)."""

    def attach_media(self, media: dict[str, Path]) -> None: ...
    def media_device(self, name: str) -> str: ...


class Reflash(Protocol):
    """Write the image to the device's storage again at the next power on (a board's way back
    to its first boot)."""

    def reflash(self) -> None: ...


@dataclass(frozen=True)
class Capabilities:
    """The optional capabilities of one machine; ``None`` where it has none."""

    snapshots: Snapshots | None = None
    disk_copy: DiskCopy | None = None
    link: LinkControl | None = None
    media: ExtraMedia | None = None
    reflash: Reflash | None = None

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


class Machine(Protocol):
    """A device's hardware side: disk preparation, power, console, network endpoints.

    ``prepare()`` creates ``overlay``, a qcow2 over the user's image into which the DUT
    writes the effective config.json (the user's file is only read). ``power_on()``
    returns the console, already being drained; ``power_cut()`` is an abrupt loss of
    power. ``endpoint(name, hostname)`` is where this host reaches a device service
    ("ssh", "engine"); ``hostname`` is the device's configured hostname, for boards
    found as ``<hostname>.local``. ``network_up()`` tells whether the guest has brought a NIC
    up in this boot, or None where the machine cannot see that (SSH probes wait for it).
    ``events`` is told of what the machine does besides the console (see ``MachineEvents``).
    ``console_is_evidence`` says whether a silent console by ``timeouts.boot_to_login`` is
    the lab's fault (a board: power, wiring, an unwritten card); a virtual machine's faults
    show as the machine dying instead, and an image may keep its kernel off the console.
    ``boots_on_this_host`` says whether its boots take this host's CPU (a QEMU guest: each boot
    holds one of the host's boot slots, ``testbed.budget``) or a board's own.
    """

    kind: ClassVar[str]
    console_is_evidence: ClassVar[bool]
    boots_on_this_host: ClassVar[bool]
    prepared: bool
    overlay: Path
    accel: str
    accel_note: str
    events: MachineEvents | None

    @property
    def capabilities(self) -> Capabilities: ...
    @property
    def console(self) -> Console | None: ...
    @property
    def powered_on_at(self) -> float: ...

    def prepare(self) -> None: ...
    def power_on(self) -> Console: ...
    def power_cut(self) -> None: ...
    def power_off(self, timeout: float) -> None: ...
    def is_on(self) -> bool: ...
    def check_alive(self) -> None: ...
    def endpoint(self, name: str, hostname: str | None = None) -> tuple[str, int]: ...
    def network_up(self) -> bool | None: ...
    def facts(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
