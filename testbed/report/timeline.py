"""The boots in a run's console.log, and when each reached firmware, bootloader, kernel, userspace, login and SSH.

console.log lines look like ``[21:50:01.123 +   3.456] text``: the UTC wall clock, then the
seconds since the last power on. testbed writes marker lines of its own
(``==== testbed: power on (tcg) ====``, ``==== testbed: ssh ready after 17.2s (cold) ====``,
``==== testbed: restored snapshot ready ====``, ``==== testbed: power cut ====``).

A boot starts at a power on marker, at a snapshot restore, or, inside a running machine,
when the firmware or a kernel starts again after the previous boot got as far as its kernel
(a reboot). In a boot, the stages are found in order, each at its first line:

- firmware: the first line the guest prints (OVMF: ``BdsDxe: ...``)
- bootloader: the first line with ``GRUB`` or ``Booting`` before the kernel
- kernel: ``Linux version``
- userspace: systemd's ``Welcome to`` or the first ``[  OK  ]``
- login: a ``login:`` prompt
- ssh: testbed's ``ssh ready`` marker

Times are seconds since the boot started, from the ``+`` column (it runs on across a
restore or a reboot, so differences stay right), or from the wall clock where a line has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

STAGES = ("firmware", "bootloader", "kernel", "userspace", "login", "ssh")
STAGE_LABELS = {
    "firmware": "firmware",
    "bootloader": "bootloader",
    "kernel": "kernel",
    "userspace": "userspace",
    "login": "login prompt",
    "ssh": "SSH ready",
    "restore": "snapshot restore",
}

_LINE = re.compile(r"^\[(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))? \+\s*(-?\d+(?:\.\d+)?)\] ?(.*)$")
_MARKER = re.compile(r"^==== testbed: (.*?) ====$")
_SSH_READY = re.compile(r"^ssh ready after ([0-9.]+)s(?: \(([^)]*)\))?")
_POWER_ON = re.compile(r"^power on(?: \(([^)]*)\))?")
_RESTORED = re.compile(r"^restored snapshot ?(.*)$")

# Signs of a new boot inside a running machine: firmware output, the kernel's last words, or
# a kernel starting at 0.000000 (a `cat /proc/version` in a test prints "Linux version" too).
_FIRMWARE_RESTART = re.compile(r"BdsDxe|reboot: Restarting system|^\[\s*0\.0+\] Linux version ")
_BOOTLOADER = re.compile(r"GRUB|Booting")
_KERNEL = re.compile(r"Linux version ")
_USERSPACE = re.compile(r"^\s*Welcome to |^\[  OK  \]")
_LOGIN = re.compile(r"login: ?$|login: ")

# How far the wall clock may step back before it is taken as midnight passing.
_ROLLOVER = timedelta(hours=6)


@dataclass
class ConsoleLine:
    """One line of console.log."""

    no: int  # 1-based line number in the file
    wall: str  # "HH:MM:SS.mmm" as written, "" if the line had no stamp
    rel: float | None  # seconds since the last power on
    text: str
    marker: str | None = None  # the text of a testbed marker line
    when: datetime | None = None  # absolute UTC time, once anchored to a date

    @property
    def seconds_of_day(self) -> float | None:
        if not self.wall:
            return None
        h, m, s = self.wall.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)


@dataclass
class Stage:
    name: str
    at_s: float  # seconds since the boot started
    wall: str
    line_no: int
    text: str


@dataclass
class Boot:
    """One boot seen on the console."""

    index: int  # 1-based
    source: str  # power-on | reboot | restore | log-start
    kind: str  # cold | reboot | power-cycle | restore | ... (testbed's word, from its ssh marker when there is one)
    accelerator: str = ""
    start_wall: str = ""
    start_line: int = 0
    end_line: int = 0
    end_s: float = 0.0  # the last line of the boot, seconds since its start
    ended_by: str = ""  # ssh ready | power cut | reboot | power on | restore | end of log
    reported_ssh_s: float | None = None  # what testbed's marker said
    stages: dict[str, Stage] = field(default_factory=dict)
    _origin_rel: float | None = None
    _origin_sod: float | None = None

    def at(self, name: str) -> float | None:
        stage = self.stages.get(name)
        return stage.at_s if stage else None

    @property
    def reached_ssh(self) -> bool:
        return "ssh" in self.stages

    @property
    def total_s(self) -> float:
        return self.at("ssh") if self.reached_ssh else self.end_s  # type: ignore[return-value]

    def segments(self) -> list[tuple[str, float, float]]:
        """The phases of the boot as (name, start_s, end_s): firmware until the bootloader starts, and so on.

        The last phase runs to SSH ready; a boot that never got there ends with the phase it was stuck in.
        """
        first = "restore" if self.source == "restore" else "firmware"
        points: list[tuple[str, float]] = [(first, 0.0)]
        points += [(s.name, s.at_s) for s in self.stages.values() if s.name != "firmware"]
        segments = [(points[i][0], points[i][1], points[i + 1][1]) for i in range(len(points) - 1)]
        if not self.reached_ssh and self.end_s > points[-1][1]:
            segments.append((points[-1][0], points[-1][1], self.end_s))
        return [seg for seg in segments if seg[2] >= seg[1]]


def read_console(path: Path) -> list[ConsoleLine]:
    """All lines of a console.log; lines without a stamp keep the stamp of the line before."""
    lines: list[ConsoleLine] = []
    wall, rel = "", None
    with open(path, encoding="utf-8", errors="replace") as fh:
        for no, raw in enumerate(fh, 1):
            raw = raw.rstrip("\n")
            m = _LINE.match(raw)
            if m:
                hh, mm, ss, frac, rel_s, text = m.groups()
                wall = f"{hh}:{mm}:{ss}.{(frac or '0').ljust(3, '0')[:3]}"
                rel = float(rel_s)
            else:
                text = raw
            mk = _MARKER.match(text)
            lines.append(ConsoleLine(no=no, wall=wall, rel=rel, text=text, marker=mk.group(1) if mk else None))
    return lines


def anchor(lines: list[ConsoleLine], day: date) -> None:
    """Give each line its absolute time: the wall clock on ``day``, moving to the next day when it steps back."""
    offset = 0
    last: float | None = None
    for line in lines:
        sod = line.seconds_of_day
        if sod is None:
            continue
        if last is not None and sod + _ROLLOVER.total_seconds() < last:
            offset += 1
        last = sod
        line.when = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=offset, seconds=sod)


def parse_boots(console_log_path: Path) -> list[Boot]:
    """The boots in a console.log, each with the seconds at which it reached each stage."""
    return boots_from_lines(read_console(Path(console_log_path)))


def boots_from_lines(lines: list[ConsoleLine]) -> list[Boot]:
    boots: list[Boot] = []
    current: Boot | None = None
    power_ons = 0

    def start(line: ConsoleLine, source: str, kind: str, accelerator: str = "") -> Boot:
        nonlocal current
        if current is not None and not current.ended_by:
            current.ended_by = {"power-on": "power on", "restore": "restore"}.get(source, source)
        boot = Boot(
            index=len(boots) + 1, source=source, kind=kind, accelerator=accelerator,
            start_wall=line.wall, start_line=line.no, end_line=line.no,
            _origin_rel=line.rel, _origin_sod=line.seconds_of_day,
        )  # fmt: skip
        if current is not None and not accelerator:
            boot.accelerator = current.accelerator
        boots.append(boot)
        current = boot
        return boot

    for line in lines:
        if line.marker is not None:
            text = line.marker
            if m := _POWER_ON.match(text):
                power_ons += 1
                start(line, "power-on", "cold" if power_ons == 1 else "power on", m.group(1) or "")
                continue
            if m := _RESTORED.match(text):
                start(line, "restore", "restore")
                continue
            if current is None:
                continue
            current.end_line = line.no
            current.end_s = max(current.end_s, _since(current, line))
            if m := _SSH_READY.match(text):
                if "ssh" not in current.stages:
                    _add(current, "ssh", line)
                    current.reported_ssh_s = float(m.group(1))
                    if m.group(2):
                        current.kind = m.group(2)
                    current.ended_by = "ssh ready"
            elif text.startswith("power cut") and not current.ended_by:
                current.ended_by = "power cut"
            continue

        if current is None:
            if not line.text.strip():
                continue
            start(line, "log-start", "boot")
        assert current is not None
        if current.ended_by == "power cut":
            continue  # nothing runs after the power is cut; stray bytes are not a boot
        level = _level(current)
        if level >= STAGES.index("kernel") and _FIRMWARE_RESTART.search(line.text):
            start(line, "reboot", "reboot")
            current.end_line = line.no
            if "reboot: Restarting system" in line.text:
                continue
            level = -1
        current.end_line = line.no
        current.end_s = max(current.end_s, _since(current, line))
        if current.source == "restore" or not line.text.strip():
            continue
        stage = _stage_of(line.text, level)
        if stage is not None:
            _add(current, stage, line)
    return boots


def _level(boot: Boot) -> int:
    return max((STAGES.index(name) for name in boot.stages), default=-1)


def _stage_of(text: str, level: int) -> str | None:
    """The first stage after ``level`` that this line starts, if any."""
    checks = (
        ("bootloader", _BOOTLOADER),
        ("kernel", _KERNEL),
        ("userspace", _USERSPACE),
        ("login", _LOGIN),
    )
    for name, pattern in checks:
        if STAGES.index(name) > level and pattern.search(text):
            if name == "bootloader" and level >= STAGES.index("kernel"):
                return None
            return name
    if level < 0:
        return "firmware"
    return None


def _since(boot: Boot, line: ConsoleLine) -> float:
    if boot._origin_rel is not None and line.rel is not None and line.rel >= boot._origin_rel:
        return round(line.rel - boot._origin_rel, 3)
    sod = line.seconds_of_day
    if boot._origin_sod is not None and sod is not None:
        diff = sod - boot._origin_sod
        if diff < -_ROLLOVER.total_seconds():
            diff += 86400
        return round(max(diff, 0.0), 3)
    return 0.0


def _add(boot: Boot, name: str, line: ConsoleLine) -> None:
    boot.stages[name] = Stage(name=name, at_s=_since(boot, line), wall=line.wall, line_no=line.no, text=line.text)
