"""What the DUT needs of a machine, QEMU or a real board."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from testbed.console import Console


class Machine(Protocol):
    """A device's hardware side: disk preparation, power, console, network endpoints.

    ``prepare()`` creates ``overlay``, a qcow2 over the user's image into which the DUT
    writes the effective config.json (the user's file is only read). ``power_on()``
    returns the console, already being drained; ``power_cut()`` is an abrupt loss of
    power. ``endpoint(name, hostname)`` is where this host reaches a device service
    ("ssh", "engine"); ``hostname`` is the device's configured hostname, for boards
    found as ``<hostname>.local``. ``snapshots`` tells whether ``save_snapshot`` and
    ``load_snapshot`` exist (QEMU); a board returns to its first-boot state by being
    flashed again (``reflash()``). ``network_up()`` tells whether the guest has brought a NIC
    up in this boot, or None where the machine cannot see that (SSH probes wait for it).
    """

    kind: str
    snapshots: bool
    prepared: bool
    overlay: Path
    console: Console | None
    powered_on_at: float
    accel: str
    accel_note: str

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
