"""How many QEMU guests boot at once on this host: the boot slots.

Under TCG a booting guest keeps about one host core busy whatever its vCPUs; a booted guest
that waits for commands costs little. Measured here (2 cores): two guests booting side by side
took their time at rest, a third slowed every guest (a boot went from 35-44 s to 162 s). So
what is budgeted is the boot: from a power on (or a reboot asked of the OS) to the login
prompt or SSH ready, a guest holds a slot; the slot is given back when the console shows the
login prompt or SSH answers, when the guest is powered off, or when the device is closed.

Slots are ``flock`` locks on files in ``<cache>/boot-slots/``: one budget for every testbed
process of the host (certify's modes, a farm night's jobs, a developer's second terminal), and
a slot of a process that died (``kill -9`` included) is free at once, since the kernel drops its
locks. ``TESTBED_BOOT_SLOTS`` overrides the budget (``0``: no budget).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import ConfigError, InfraError
from testbed.util import cache_dir

# How often a guest that waits for a slot looks again (a lock held by another process cannot be
# waited on together with the others).
POLL_SECONDS = 0.2


def cpu_budget(host_cores: int | None = None, kvm: bool = False, guest_cpus: int = 2) -> int:
    """How many QEMU guests boot side by side without slowing each other: under TCG a booting
    guest keeps about one host core busy whatever its vCPUs (two cores carried two guests
    here; a third slowed every guest 4x), under KVM its vCPUs are the cost."""
    cores = host_cores or os.cpu_count() or 1
    if kvm:
        return max(1, cores // max(1, guest_cpus))
    return max(1, cores)


def boot_slots(accel: str, guest_cpus: int) -> int:
    """The host's budget of booting guests (``TESTBED_BOOT_SLOTS`` overrides; 0 turns it off)."""
    given = os.environ.get("TESTBED_BOOT_SLOTS", "").strip()
    if given:
        if not given.isdigit():
            raise ConfigError(f"TESTBED_BOOT_SLOTS={given!r}: give a number of guests (0: no budget)")
        return int(given)
    return cpu_budget(kvm=accel == "kvm", guest_cpus=guest_cpus)


def describe(accel: str, guest_cpus: int) -> str:
    """The budget as the report's facts say it."""
    slots = boot_slots(accel, guest_cpus)
    if slots == 0:
        return "no limit (TESTBED_BOOT_SLOTS=0)"
    why = "TESTBED_BOOT_SLOTS" if os.environ.get("TESTBED_BOOT_SLOTS", "").strip() else (
        f"{os.cpu_count() or 1} host cores, {accel or 'tcg'}" + (f", {guest_cpus} vCPUs a guest" if accel == "kvm" else "")
    )  # fmt: skip
    return f"{slots} guest{'s' if slots != 1 else ''} booting at once ({why})"


@dataclass
class Slot:
    """A held boot slot; ``release`` gives it back (twice is harmless)."""

    path: Path
    fd: int | None
    waited_s: float
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def release(self) -> None:
        with self._lock:  # from the console reader, the SSH greeter and the owner: close once
            fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def acquire(who: str, slots: int, timeout: float, directory: Path | None = None) -> Slot | None:
    """Hold one of ``slots`` boot slots for ``who``, waiting up to ``timeout`` seconds for one to
    be given back; None when there is no budget (``slots`` 0). On timeout an InfraError names
    the guests that hold them."""
    if slots <= 0:
        return None
    folder = directory or cache_dir() / "boot-slots"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    wake = threading.Event()
    while True:
        for i in range(slots):
            path = folder / f"slot-{i}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{who} (pid {os.getpid()})\n".encode(), 0)
            return Slot(path, fd, time.monotonic() - started)
        if time.monotonic() - started >= timeout:
            holders = "; ".join(_holder(folder / f"slot-{i}") for i in range(slots))
            raise InfraError(
                f"{who}: no boot slot within {timeout:g}s: the host's {slots} are held by {holders} "
                f"(a guest holds one until its login prompt or SSH; TESTBED_BOOT_SLOTS sets the budget)"
            )
        wake.wait(POLL_SECONDS)
