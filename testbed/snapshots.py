"""Named points a device returns to: snapshots where the machine has them, and twins.

``dut.snapshots`` is a :class:`SnapshotStore` on a machine with the snapshots capability,
else ``None``. A twin is a second device that starts from this one's snapshots (a copy of its
disks, with the disk-copy capability), so that two devices share one set-up.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING

from testbed.boot import BootRecord, BootState
from testbed.machines.base import DiskCopy, Snapshots

if TYPE_CHECKING:
    from testbed.dut import DUT


class SnapshotStore:
    """Save and restore the whole running device by name (RAM, disks, firmware variables)."""

    def __init__(self, dut: DUT, machine: Snapshots, disk_copy: DiskCopy | None) -> None:
        self.dut = dut
        self.machine = machine
        self.disk_copy = disk_copy
        # Whether the serial console had a shell when each snapshot was taken.
        self.console_logged_in: dict[str, bool] = {}

    @property
    def names(self) -> list[str]:
        return list(self.console_logged_in)

    def save(self, name: str) -> float:
        """Snapshot the running device; return the seconds taken (SSH answering again)."""
        dut = self.dut
        t0 = time.monotonic()
        with dut.step(f"save snapshot {name}"):
            dut.ssh.close()
            self.machine.save_snapshot(name)
            console = dut.machine.console
            self.console_logged_in[name] = bool(console and console.logged_in)
            dut.ssh.wait_ready(dut.profile.timeouts.restore_to_ssh, abort=dut.boot.abort_if_dead)
        return time.monotonic() - t0

    def restore(self, name: str) -> BootRecord:
        """Return to snapshot ``name`` and wait until SSH answers again."""
        dut = self.dut
        if name not in self.console_logged_in:
            raise ValueError(f"no snapshot named {name!r} was taken on {dut.name} (taken: {self.names})")
        with dut.step(f"restore snapshot {name}"):
            dut.boot.attach_console()
            dut.ssh.close()
            record = dut.boot.model.restoring()
            self.machine.load_snapshot(name)
            console = dut.machine.console
            if console is not None:
                console.drain()
                console.logged_in = self.console_logged_in[name]
            return dut.boot.wait(record)

    def make_twin(self, other: DUT) -> None:
        """Make ``other`` a twin: its disks become a copy of this device's, with every snapshot,
        and its config.json is this one's. ``other`` must come from the same profile, image and
        media and never have been powered on; it starts with ``other.restore(name)``."""
        dut = self.dut
        if self.disk_copy is None or other.snapshots is None:
            raise ValueError(f"{dut.name}: a {dut.machine.kind} device has no disks to copy (no disk-copy capability)")
        if other.state != BootState.OFF or other.boots:
            raise ValueError(f"{other.name} was already powered on: only a new device can be a twin of {dut.name}")
        if (other.profile.name, other.image, other.media) != (dut.profile.name, dut.image, dut.media):
            raise ValueError(f"{other.name} has another profile, image or media than {dut.name}: it cannot be a twin")
        if dut.lab_nics or other.lab_nics:
            # A snapshot holds every NIC's state, and a tap on the lab network has one owner.
            raise ValueError(f"{dut.name} or {other.name} has a NIC on the lab network: a twin can have none")
        with dut.step(f"copy disks and snapshots to {other.name}"):
            self.disk_copy.copy_disks_to(other.machine)
        other.adopt_config(copy.deepcopy(dut.config))
        other.snapshots.console_logged_in = dict(self.console_logged_in)
