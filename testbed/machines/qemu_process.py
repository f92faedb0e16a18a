"""One QEMU machine's process across its resets: start, supervision, restart after a reset, cut.

:class:`QemuProcess` starts QEMU paused on the serial line and its monitors (connected socket
pairs handed over as file descriptors), lets the guest run, and watches it from a supervisor
thread: a guest reset ends the QEMU process (``-action reboot=shutdown``) and the supervisor
starts the next one on the same disks at once, the serial line reading on. The device's
command line comes from its :class:`~testbed.machines.qemu.QemuMachine`.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from testbed.console import Console, ConsoleLog, SocketTransport
from testbed.errors import InfraError
from testbed.machines.qmp import Qmp, discard_input, events_handshake, shutdown_reason
from testbed.util import OwnedProcess

# Why QEMU exits after a reset (QMP SHUTDOWN reasons) when it should come back as a new boot.
RESTART_REASONS = {"guest-reset", "host-qmp-system-reset"}
# argv(qmp_fd, serial_fd, events_fd): the command line of one QEMU process of the machine.
Argv = Callable[[int, int, int], list[str]]


class QemuProcess:
    """The running QEMU of one machine (``None`` parts while it is off); thread-safe."""

    def __init__(
        self,
        name: str,
        console_log: ConsoleLog,
        workdir: Path,
        argv: Argv,
        extra_fds: list[int],
        on_reset: Callable[[str], None],
    ) -> None:
        self.name = name
        self.console_log = console_log
        self.workdir = workdir
        self._argv = argv
        self._extra_fds = extra_fds  # descriptors QEMU inherits besides its sockets (lab taps)
        self._on_reset = on_reset
        self.proc: OwnedProcess | None = None
        self.qmp: Qmp | None = None
        self.console: Console | None = None
        self.powered_on_at = 0.0
        self._uart: socket.socket | None = None  # QEMU's end of the serial line, kept across restarts
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self._ended: OwnedProcess | None = None  # the QEMU that stopped by itself, not to be restarted
        self._restart_error = ""
        # When the guest of the running QEMU first set a NIC's receive filter (see nic_up).
        self._nic_up_at: float | None = None

    def start(self, accel: str) -> Console:
        """Start QEMU and the guest; return the console, already being drained."""
        with self.lock:
            if self.proc is not None and self.proc.alive():
                raise InfraError("power_on: the machine is already on")
            # Off by itself (a guest power-off): let go of that power-on's QMP and console.
            self.proc = None
            self._release()
            # The serial line is a socket pair whose QEMU end testbed keeps too: when QEMU is
            # restarted after a guest reset, the console reads on, like a board's UART.
            host_end, self._uart = socket.socketpair()
            self.console = Console(SocketTransport(host_end), self.console_log, name=f"{self.name} serial console")
            try:
                proc, self.qmp, events = self._spawn()
            except BaseException:
                self._uart.close()
                self._uart = None
                self.console.close()
                self.console = None
                raise
            self.proc = proc
            self._ended = None
            self.console_log.mark(f"power on ({accel})")
            self.powered_on_at = time.monotonic()
            self.qmp.cmd("cont")
            # The thread that restarts QEMU must outlive it: the child's death signal follows
            # the thread that started it. So one thread watches every QEMU of this power-on.
            threading.Thread(
                target=self._supervise, args=(proc, events), name=f"{self.name}-qemu-supervisor", daemon=True
            ).start()
            return self.console

    def _spawn(self) -> tuple[OwnedProcess, Qmp, socket.socket]:
        """Start QEMU paused on the overlay and the serial line; return it, its QMP client and
        the socket of its second monitor, on which only events are read."""
        assert self._uart is not None
        self._nic_up_at = None
        qmp_ours, qmp_theirs = socket.socketpair()
        events_ours, events_theirs = socket.socketpair()
        fds = [qmp_theirs.fileno(), events_theirs.fileno(), self._uart.fileno(), *self._extra_fds]
        try:
            proc = OwnedProcess(
                self._argv(qmp_theirs.fileno(), self._uart.fileno(), events_theirs.fileno()),
                pass_fds=fds,
                stderr_path=self.workdir / "qemu.stderr",
            )
        except BaseException:
            qmp_ours.close()
            events_ours.close()
            raise
        finally:
            # Only QEMU holds these ends now, so its exit is an end of file here.
            qmp_theirs.close()
            events_theirs.close()
        try:
            qmp = Qmp(qmp_ours, timeout=30)
            events_handshake(events_ours)
        except Exception as exc:  # noqa: BLE001
            tail = proc.stderr_tail()
            proc.kill()
            qmp_ours.close()
            events_ours.close()
            raise InfraError(f"QEMU did not start: {tail or exc}") from None
        return proc, qmp, events_ours

    def _supervise(self, proc: OwnedProcess, events: socket.socket) -> None:
        """Watch QEMU until it exits; after a reset, start it again on the same disks.

        A reset makes QEMU exit (``-action reboot=shutdown``) and a new QEMU boots: the same
        as a reset for the guest (RAM is not kept across a reboot anyway), and the firmware's
        cold path takes a few seconds where its warm reset under TCG took 15-20 s, or hung.
        """
        while True:
            reason = shutdown_reason(events, functools.partial(self._on_event, proc))
            proc.proc.wait()
            with self.lock:
                if proc is not self.proc:  # cut or closed by testbed
                    return
                if reason not in RESTART_REASONS:
                    self._ended = proc  # off by itself (a guest power-off, or a crash)
                    self._changed.notify_all()
                    return
                t0 = time.monotonic()
                if self.qmp is not None:
                    self.qmp.close()
                    self.qmp = None
                discard_input(self._uart)
                try:
                    proc, self.qmp, events = self._spawn()
                    self.proc = proc
                    self.console_log.mark(
                        f"reset ({reason}): QEMU restarted on the same disks in {time.monotonic() - t0:.1f}s"
                    )
                    self._on_reset(reason)
                    self.qmp.cmd("cont")
                except InfraError as exc:
                    self._ended = self.proc
                    self._restart_error = f"restarting QEMU after a reset failed: {exc}"
                    self._changed.notify_all()
                    return
                self._changed.notify_all()

    def _on_event(self, proc: OwnedProcess, name: str) -> None:
        if proc is not self.proc:  # a late event of a QEMU that was cut
            return
        if name == "NIC_RX_FILTER_CHANGED" and self._nic_up_at is None:
            self._nic_up_at = time.monotonic()
        elif name == "RESET":
            self._nic_up_at = None

    def nic_up(self) -> bool:
        """Whether the guest of the running QEMU has set a NIC's receive filter since its start."""
        return self._nic_up_at is not None

    def _settled_proc(self) -> OwnedProcess | None:
        """The QEMU process, once a restart after a reset (if one is due) has happened."""
        with self.lock:
            deadline = time.monotonic() + 60
            while (
                self.proc is not None
                and not self.proc.alive()
                and self._ended is not self.proc
                and time.monotonic() < deadline
            ):
                self._changed.wait(timeout=1.0)
            return self.proc

    def check_alive(self) -> None:
        """Raise InfraError if QEMU died (used between waits)."""
        proc = self._settled_proc()
        if proc is None or not proc.alive():
            code = proc.proc.returncode if proc else None
            tail = self._restart_error or (proc.stderr_tail() if proc else "")
            raise InfraError(f"QEMU exited (code {code}): {tail}")

    def cut(self) -> None:
        """An abrupt power loss: the process is killed, nothing is flushed or shut down."""
        with self.lock:
            if self.proc is not None:
                proc, self.proc = self.proc, None
                proc.kill()
                self.console_log.mark("power cut")
            self._release()

    def _release(self) -> None:
        """Close the QMP client, the serial line and the console of the last power-on."""
        with self.lock:
            if self.qmp is not None:
                self.qmp.close()
                self.qmp = None
            if self._uart is not None:
                self._uart.close()
                self._uart = None
            if self.console is not None:
                self.console.close()
                self.console = None
            self._restart_error = ""
            self._changed.notify_all()

    def power_off(self, timeout: float) -> None:
        """An ACPI shutdown; cut the power if the guest has not stopped in time."""
        if self.qmp is not None and self.proc is not None and self.proc.alive():
            try:
                self.qmp.cmd("system_powerdown")
                self.qmp.event({"SHUTDOWN"}, timeout)
            except InfraError:
                pass
        self.cut()

    def is_on(self) -> bool:
        proc = self._settled_proc()
        return proc is not None and proc.alive()
