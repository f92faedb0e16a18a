"""Starting a device and waiting for it: power on, reboot, restore's wait, with named timeouts.

:class:`BootControl` drives the machine and tells the device's :class:`~testbed.boot.BootModel`
what it did; the model records the stages the console shows. Every wait ends at a timeout
from the profile, and its error carries the last console lines.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from testbed import budget
from testbed.boot import BootModel, BootRecord
from testbed.console import Console
from testbed.errors import DutError, InfraError

if TYPE_CHECKING:
    from testbed.dut import DUT

# How long after a power on or reboot SSH probes wait at most for the device's NIC to come up
# (see BootControl._network_gate): a guest that brings it up without telling the machine is
# then probed anyway.
NETWORK_HINT_LIMIT = 90.0
# The reboot request: the delay lets the command return before sshd stops. A timer's default
# accuracy is a minute, and systemd spreads timers within it by a per-machine offset: without
# AccuracySec some devices waited most of a minute before rebooting.
REBOOT_COMMAND = "systemd-run --on-active=300ms --timer-property=AccuracySec=10ms --no-block systemctl reboot"


class BootControl:
    """The boots of one device (``dut.power_on``, ``dut.reboot``, ``dut.wait_ready`` delegate here)."""

    def __init__(self, dut: DUT, model: BootModel) -> None:
        self.dut = dut
        self.model = model
        c = dut.profile.console
        self._restart_expect = f"{c.restart_pattern}|{c.firmware_pattern}|{c.kernel_pattern}"
        self._slot: budget.Slot | None = None
        model.watchers.append(self._on_boot_event)

    # -- the host's boot slots (testbed.budget) ----------------------------------------------
    def _take_slot(self, why: str) -> None:
        """Hold one of the host's boot slots for the boot about to start (a guest of this host);
        wait, saying so, while every slot is held by another booting guest."""
        machine = self.dut.machine
        if self._slot is not None or not machine.boots_on_this_host:
            return
        settings = getattr(machine, "settings", None)
        slots = budget.boot_slots(machine.accel, getattr(settings, "cpus", 2))
        who = f"{self.dut.name} ({why})"
        try:
            slot = budget.acquire(who, slots, 0)
        except InfraError:
            t = self.dut.profile.timeouts
            with self.dut.step(f"waiting for a boot slot: the host's {slots} are all booting guests"):
                slot = budget.acquire(who, slots, t.boot_to_login + t.boot_to_ssh)
        if slot is None:
            return
        self._slot = slot
        threading.Thread(target=self._release_when_ssh_answers, args=(slot,), name=f"slot {who}", daemon=True).start()

    def release_slot(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()

    def _on_boot_event(self, event: str) -> None:
        # The boot's heavy part is over at the login prompt or SSH; a restore or power off ends it.
        if event in ("login", "ssh ready", "restore", "off"):
            self.release_slot()

    def _release_when_ssh_answers(self, slot: budget.Slot) -> None:
        """Give the slot back once sshd greets (a boot nobody waits for yet, or one without a
        serial getty, as in production mode, must not keep its slot), at the latest after
        ``timeouts.boot_to_ssh``."""
        deadline = time.monotonic() + self.dut.profile.timeouts.boot_to_ssh
        wake = threading.Event()
        while slot.fd is not None and time.monotonic() < deadline:
            try:
                host, port = self.dut.endpoint("ssh")
                with socket.create_connection((host, port), timeout=2) as sock:
                    sock.settimeout(2)
                    if sock.recv(4).startswith(b"SSH-"):
                        break
            except Exception:  # noqa: BLE001 - not up yet, or no endpoint yet: the deadline holds
                pass
            wake.wait(0.5)
        if self._slot is slot:
            self.release_slot()
        else:
            slot.release()

    # -- faults ------------------------------------------------------------------------
    def abort_if_dead(self) -> None:
        """Raise what stops a wait at once: the machine died, a kernel panic, a stalled boot."""
        machine = self.dut.machine
        machine.check_alive()
        if machine.console is not None:
            machine.console.check_fault()
        self._check_stage_deadlines()

    def _check_stage_deadlines(self) -> None:
        """A boot that stalls before SSH fails at its named timeout, with the console tail.

        Only where the console is evidence (``Machine.console_is_evidence``: a board) and only
        after a power on (after a reboot the shutdown's own time counts). No kernel by
        ``timeouts.boot_to_login``: the lab's fault (no power, serial wiring, an unwritten card:
        InfraError). A kernel but no login prompt by then, where a serial getty is promised
        (development mode): the device's fault (DutError).
        """
        record = self.model.current
        if not self.dut.machine.console_is_evidence or record is None:
            return
        if record.kind not in ("cold", "power-cycle", "reflash"):
            return
        limit = self.dut.profile.timeouts.boot_to_login
        if time.monotonic() - record.started < limit:
            return
        console = self.dut.machine.console
        tail = console.tail() if console is not None else ""
        if record.kernel_s is None:
            seen = (
                f"the firmware started after {record.firmware_s:.1f}s but no kernel followed"
                if record.firmware_s is not None
                else "neither firmware nor kernel showed on the console"
            )
            raise InfraError(
                f"{self.dut.name} did not start a kernel within {limit:g}s of power on (timeouts.boot_to_login): "
                f"{seen}. Check the boot medium was written, the power and the serial wiring and baud rate; "
                f"last console lines:\n{tail or '(nothing)'}"
            )
        if self.dut.development_mode and record.login_prompt_s is None:
            raise DutError(
                f"{self.dut.name} started its kernel after {record.kernel_s:.1f}s but showed no login prompt within "
                f"{limit:g}s of power on (timeouts.boot_to_login); last console lines:\n{tail}"
            )

    # -- starting ----------------------------------------------------------------------
    def power_on(
        self,
        kind: str = "cold",
        *,
        wait: bool = True,
        timeout: float | None = None,
        max_boots: int | None = None,
        tolerate_panics: bool = False,
    ) -> BootRecord | None:
        """Power on; with ``wait``, until SSH answers (the other options as for ``wait``)."""
        self.dut.provision()
        machine = self.dut.machine
        self._take_slot(f"power on, {kind}")
        with self.dut.step(f"power on ({kind})"):
            console = machine.power_on()
        record = self.model.powered_on(kind, machine.powered_on_at, machine.accel)
        self._watch(console)
        # What the console showed before the watcher was attached (a board's firmware speaks
        # at once); a line seen twice changes nothing.
        for line in console.lines():
            self.model.on_console_line(line, replay=True)
        if not wait:
            return None
        return self.wait(record, timeout, max_boots, tolerate_panics)

    def attach_console(self) -> None:
        """Power the machine on for a restore (its state comes from the snapshot, not a boot)."""
        if not self.dut.machine.is_on():
            self._watch(self.dut.machine.power_on())

    def _watch(self, console: Console) -> None:
        """The console's lines go to the boot model and to the device's trouble log."""
        console.watchers += [self.model.on_console_line, self.dut.trouble.on_line]

    def finish_power_on(self, timeout: float | None = None) -> BootRecord:
        """Wait for SSH after ``power_on(wait=False)``; its times count from the power on."""
        record = self.model.current
        if record is None:
            raise RuntimeError(f"{self.dut.name} was never powered on")
        if record.ssh_ready_s is not None:
            return record
        return self.wait(record, timeout)

    def start_reboot(self) -> float:
        """Ask the OS to reboot and return once the old boot is over (not waiting for the new one)."""
        console = self.dut.machine.console
        if console is None:
            raise InfraError(f"{self.dut.name} is off: it cannot be rebooted")
        console.drain()
        self._take_slot("reboot")
        with self.dut.step("reboot (asked of the OS)"):
            self.dut.ssh.run(REBOOT_COMMAND, 30)
            self.dut.ssh.close()
            record = self.model.rebooting()
            # The firmware (or a kernel) starting again is the sign the old boot is over.
            console.expect(self._restart_expect, self.dut.profile.timeouts.shutdown, "the device to restart")
        return record.started

    def reboot(
        self, timeout: float | None = None, max_boots: int | None = None, tolerate_panics: bool = False
    ) -> BootRecord:
        """Reboot through the OS and wait until SSH answers on the new boot."""
        before = self.dut.boot_id()
        self.start_reboot()
        record = self.model.current
        assert record is not None  # start_reboot made it
        record = self.wait(record, timeout, max_boots, tolerate_panics)
        after = self.dut.boot_id()
        if after == before:
            raise DutError(f"{self.dut.name} did not reboot: boot_id is still {after}")
        return record

    # -- waiting -----------------------------------------------------------------------
    def wait(
        self,
        record: BootRecord,
        timeout: float | None = None,
        max_boots: int | None = None,
        tolerate_panics: bool = False,
    ) -> BootRecord:
        """Wait until SSH answers; ``record`` is the boot waited for (its times count from its start).

        ``timeout`` defaults to the profile's boot_to_ssh; ``max_boots`` fails the wait early
        once the kernel started more often than that (a boot loop); ``tolerate_panics`` lets
        kernel panics on the way pass (a root that is meant to fail).
        """
        dut = self.dut
        timeout = timeout or dut.profile.timeouts.boot_to_ssh
        first_start = self.model.kernel_starts

        def abort() -> None:
            if tolerate_panics and dut.machine.console is not None:
                dut.machine.console.clear_fault()
            self.abort_if_dead()
            starts = self.model.kernel_starts - first_start
            if max_boots is not None and starts > max_boots:
                raise DutError(
                    f"the kernel started {starts} times without SSH coming up (at most {max_boots} "
                    "boots expected: the device keeps booting a root that does not come up)"
                )

        gate = None if record.kind == "restore" else self._network_gate(record.started)
        dut.trouble.expecting = tolerate_panics
        try:
            dut.ssh.wait_ready(timeout, abort=abort, reachable=gate)
        except DutError as exc:
            tail = dut.machine.console.tail() if dut.machine.console else ""
            raise DutError(
                f"{dut.name} did not become ready over SSH on port {dut.profile.ssh.port} "
                f"(forwarded to {dut.ssh.host}:{dut.ssh.port}): {exc}\nlast console lines:\n{tail}"
            ) from None
        finally:
            dut.trouble.expecting = False
        record = self.model.ssh_ready(record, f"{dut.ssh.host}:{dut.ssh.port}")
        dut.console_log.mark(f"ssh ready after {record.ssh_ready_s:.1f}s ({record.kind})")
        return record

    def wait_ready(
        self, timeout: float | None = None, max_boots: int | None = None, tolerate_panics: bool = False
    ) -> BootRecord:
        """Wait for SSH after the device was started or rebooted some other way."""
        return self.wait(self.model.waiting(), timeout, max_boots, tolerate_panics)

    def _network_gate(self, started: float) -> Callable[[], str] | None:
        """For the SSH wait of a boot: why the device cannot answer yet ("" once it can).

        Where the machine shows when the guest brings its NIC up (QEMU with a virtio NIC),
        SSH probes wait for that, so that no early probe costs the booting guest an sshd
        process; after ``NETWORK_HINT_LIMIT`` seconds they go anyway.
        """
        machine = self.dut.machine
        if machine.network_up() is None:
            return None

        def why() -> str:
            if machine.network_up() or time.monotonic() - started > NETWORK_HINT_LIMIT:
                return ""
            return "the device has not brought its NIC up yet"

        return why
