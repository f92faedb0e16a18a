"""One boot model: the device's boot state, its boots, and the stages each boot reached.

:class:`BootModel` owns the state (an Enum, changed only through :meth:`BootModel._enter`,
which checks the transition) and the list of :class:`BootRecord`. The DUT tells it what it
does (power on, reboot, restore, SSH ready, power off); :class:`BootDetector` turns the
console's lines and the machine's events ("reset", "flash", "flashed") into typed
:class:`BootStage` records with the patterns of the device profile. report.json's
``timings.boots[].stages`` are these records; the report draws only them.

Stages, in the order a boot goes through them: firmware, bootloader, kernel, userspace, login,
ssh. A restore has "restore" then "ssh". A boot that restarts by itself (a reset after the
kernel ran: a rollback, a reboot asked on the device) ends its record and starts a new one of
kind "reboot".
"""

from __future__ import annotations

import enum
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from testbed.profile import ConsoleSettings

STAGE_ORDER = ("firmware", "bootloader", "kernel", "userspace", "login", "ssh")


class BootState(enum.Enum):
    OFF = "off"
    POWERING_ON = "powering on"
    FIRMWARE = "firmware"
    BOOTLOADER = "bootloader"
    KERNEL = "kernel"
    USERSPACE = "userspace"
    LOGIN = "login"
    SSH_READY = "ssh ready"
    REBOOTING = "rebooting"
    RESTORING = "restoring"


# The states a boot passes through on the console, in order.
_STAGE_STATES = (
    BootState.FIRMWARE,
    BootState.BOOTLOADER,
    BootState.KERNEL,
    BootState.USERSPACE,
    BootState.LOGIN,
)
_ON = {BootState.POWERING_ON, *_STAGE_STATES, BootState.SSH_READY, BootState.REBOOTING, BootState.RESTORING}
# Where each state may go. From any powered state: off, a restore, a reboot, SSH ready, and
# any console stage (a device may reset itself at any time, and a new boot starts).
TRANSITIONS: dict[BootState, frozenset[BootState]] = {
    BootState.OFF: frozenset({BootState.POWERING_ON, BootState.RESTORING, BootState.OFF}),
    **{state: frozenset(_ON | {BootState.OFF}) for state in _ON},
}

Listener = Callable[[str, float | None, str], None]


class BootTransitionError(RuntimeError):
    """testbed asked the boot model for a transition its table does not allow (a testbed bug)."""


@dataclass
class BootStage:
    """A stage a boot reached, ``at_s`` seconds after the boot started."""

    stage: str
    at_s: float
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "at_s": self.at_s, "detail": self.detail}


@dataclass
class BootRecord:
    """One boot of the device: how it started, the stages it reached, how it ended."""

    kind: str  # cold | reboot | power-cycle | restore | reflash | wait
    started: float  # time.monotonic() at the start
    device: str = ""
    accelerator: str = ""
    started_wall: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))
    stages: list[BootStage] = field(default_factory=list)
    ended_by: str = ""
    end_s: float = 0.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def at(self, stage: str) -> float | None:
        return next((s.at_s for s in self.stages if s.stage == stage), None)

    @property
    def ssh_ready_s(self) -> float | None:
        return self.at("ssh")

    @property
    def login_prompt_s(self) -> float | None:
        return self.at("login")

    @property
    def firmware_s(self) -> float | None:
        return self.at("firmware")

    @property
    def kernel_s(self) -> float | None:
        return self.at("kernel")

    def reached(self, stage: str) -> bool:
        return self.at(stage) is not None

    def since_start(self) -> float:
        return round(self.clock() - self.started, 3)

    def add(self, stage: str, detail: str = "", at_s: float | None = None) -> BootStage | None:
        """Record ``stage`` once; a stage seen again in the same boot changes nothing."""
        if self.reached(stage):
            return None
        entry = BootStage(stage, self.since_start() if at_s is None else at_s, detail)
        self.stages.append(entry)
        self.end_s = max(self.end_s, entry.at_s)
        return entry

    def end(self, why: str) -> None:
        if not self.ended_by:
            self.ended_by = why
            self.end_s = self.ssh_ready_s if self.ssh_ready_s is not None else self.since_start()

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "kind": self.kind,
            "started": self.started_wall,
            "accelerator": self.accelerator,
            "ended_by": self.ended_by,
            "end_s": self.end_s if self.ended_by else self.since_start(),
            "stages": [s.as_dict() for s in self.stages],
            "ssh_ready_s": self.ssh_ready_s,
            "login_prompt_s": self.login_prompt_s,
            "firmware_s": self.firmware_s,
            "kernel_s": self.kernel_s,
        }


class BootDetector:
    """The profile's console patterns, compiled: which stage (if any) a console line shows."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.firmware = re.compile(settings.firmware_pattern)
        self.bootloader = re.compile(settings.bootloader_pattern)
        self.kernel = re.compile(settings.kernel_pattern)
        self.userspace = re.compile(settings.userspace_pattern)
        self.login = re.compile(settings.login_prompt)
        self.restart = re.compile(settings.restart_pattern)

    def stage_of(self, line: str, after: int) -> str | None:
        """The first stage later than index ``after`` of ``STAGE_ORDER`` that ``line`` shows.

        The kernel's pattern is tried before the bootloader's (an ARM kernel prints "Booting
        Linux"); the firmware's only for a boot that has shown nothing yet.
        """
        if after < 0 and self.firmware.search(line):
            return "firmware"
        for name, pattern in (
            ("kernel", self.kernel),
            ("bootloader", self.bootloader),
            ("userspace", self.userspace),
            ("login", self.login),
        ):
            index = STAGE_ORDER.index(name)
            if index > after and pattern.search(line):
                if name == "bootloader" and after >= STAGE_ORDER.index("kernel"):
                    return None
                return name
        return None

    def restarted(self, line: str) -> bool:
        """The line shows a boot ending (the kernel's last words) or a new one starting."""
        return bool(self.restart.search(line))


class BootModel:
    """The boot state and boots of one device (thread-safe: console lines come from a reader thread).

    ``listener(stage, seconds, detail)`` hears every stage as it happens (live boot stages);
    ``clock`` is where "now" comes from (``time.monotonic``; a replay of a console log has its own).
    """

    def __init__(
        self,
        device: str,
        settings: ConsoleSettings,
        listener: Listener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.clock = clock
        self.detector = BootDetector(settings)
        self.listener = listener
        # Hear every event, "off" and "restore" included (the boot slot: testbed.bootcontrol).
        self.watchers: list[Callable[[str], None]] = []
        self.state = BootState.OFF
        self.boots: list[BootRecord] = []
        self.kernel_starts = 0  # boots that reached their kernel, over all boots
        self.accelerator = ""
        self._lock = threading.RLock()

    # -- what the DUT does ----------------------------------------------------------------
    def _enter(self, state: BootState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise BootTransitionError(f"{self.device}: boot state {self.state.value} cannot go to {state.value}")
        self.state = state

    def _start(self, kind: str, state: BootState, started: float | None = None) -> BootRecord:
        with self._lock:
            self._enter(state)
            previous = self.current
            if previous is not None and previous.kind == "wait" and not previous.stages:
                self.boots.pop()  # a wait that a boot the console showed replaced: nothing to keep
            elif previous is not None:
                previous.end(kind if kind in ("reboot", "restore") else "power on")
            record = BootRecord(
                kind=kind, started=self.clock() if started is None else started,
                device=self.device, accelerator=self.accelerator, clock=self.clock,
            )  # fmt: skip
            self.boots.append(record)
            return record

    def powered_on(self, kind: str, started: float, accelerator: str) -> BootRecord:
        """The machine was switched on at ``started`` (monotonic): a new boot of ``kind``."""
        self.accelerator = accelerator
        record = self._start(kind, BootState.POWERING_ON, started)
        self._tell("power on", 0.0, accelerator)
        return record

    def rebooting(self) -> BootRecord:
        """The OS was asked to reboot: the new boot's record starts now."""
        return self._start("reboot", BootState.REBOOTING)

    def restoring(self) -> BootRecord:
        """A snapshot is being loaded: a boot of kind "restore"."""
        record = self._start("restore", BootState.RESTORING)
        record.add("restore", at_s=0.0)
        self._notify("restore")
        return record

    def waiting(self) -> BootRecord:
        """The device was started or rebooted some other way and is waited for (kind "wait")."""
        with self._lock:
            current = self.boots[-1] if self.boots else None
            if current is not None and not current.reached("ssh") and not current.ended_by:
                return current  # the boot already being recorded (a reset the console showed)
        return self._start("wait", BootState.POWERING_ON if self.state == BootState.OFF else self.state)

    def ssh_ready(self, record: BootRecord, detail: str) -> BootRecord:
        """SSH answers: the end of ``record``, or of the boot that replaced it meanwhile (the
        device restarted while it was waited for)."""
        with self._lock:
            replaced = record.ended_by or record not in self.boots
            if replaced and self.current is not None and not self.current.ended_by:
                record = self.current
            self._enter(BootState.SSH_READY)
            entry = record.add("ssh", detail)
            record.end("ssh ready")
        self._tell("ssh ready", entry.at_s if entry is not None else record.ssh_ready_s, detail)
        return record

    def off(self, why: str) -> None:
        with self._lock:
            self._enter(BootState.OFF)
            if self.boots:
                self.boots[-1].end(why)
        self._notify("off")

    @property
    def current(self) -> BootRecord | None:
        return self.boots[-1] if self.boots else None

    # -- what the device shows --------------------------------------------------------------
    def on_console_line(self, line: str, replay: bool = False) -> None:
        """A complete console line (from the reader thread, or replayed after a power on)."""
        with self._lock:
            record = self.current
            # A restore's guest runs its firmware for a moment before the snapshot is loaded: that
            # is not a boot of its own.
            if record is None or self.state in (BootState.OFF, BootState.RESTORING):
                return
            text = line.strip()[:80]
            if self.state == BootState.REBOOTING:
                # The old boot is shutting down: only the firmware or a kernel starts the new one.
                stage = self.detector.stage_of(line, -1)
                if stage in ("firmware", "bootloader", "kernel"):
                    self._stage(record, stage, text)
                return
            level = self._level(record)
            # A kernel's first line ends the boot only once that boot is past its kernel: the EFI
            # stub of an arm64 kernel says "Booting Linux Kernel..." before the kernel's banner.
            kernel = STAGE_ORDER.index("kernel")
            threshold = kernel + 1 if self.detector.stage_of(line, -1) == "kernel" else kernel
            if self.detector.restarted(line) and (self.state == BootState.SSH_READY or level >= threshold):
                record = self._start("reboot", BootState.FIRMWARE)
                level = -1
            stage = self.detector.stage_of(line, level)
            if stage is not None:
                self._stage(record, stage, text)

    def on_machine_event(self, name: str, detail: str) -> None:
        """An event of the machine: "reset" (QEMU restarted after a guest reset), "flash", "flashed"."""
        with self._lock:
            if name == "reset" and self.state not in (BootState.OFF, BootState.REBOOTING):
                record = self.current
                if record is not None and (record.reached("kernel") or record.reached("ssh")):
                    self._start("reboot", BootState.FIRMWARE)
            record = self.current
            if name == "reset" and record is not None:
                record.add("reset", detail)
        self._tell(name, None, detail)

    def _level(self, record: BootRecord) -> int:
        return max((STAGE_ORDER.index(s.stage) for s in record.stages if s.stage in STAGE_ORDER), default=-1)

    def _stage(self, record: BootRecord, stage: str, detail: str) -> None:
        entry = record.add(stage, detail)
        if entry is None:
            return
        if stage == "kernel":
            self.kernel_starts += 1  # once per boot, however many lines the kernel's banner has
        if self.state != BootState.SSH_READY:
            self._enter(BootState(stage))
        self._tell(stage, entry.at_s, detail)

    def _tell(self, stage: str, seconds: float | None, detail: str) -> None:
        if self.listener is not None:
            self.listener(stage, seconds, detail)
        self._notify(stage)

    def _notify(self, event: str) -> None:
        for watcher in list(self.watchers):
            watcher(event)
