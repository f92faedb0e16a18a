"""The boots of a run as report.json records them, in the shape the boot timeline draws.

testbed's boot model detects each boot's stages once, live, while the device runs, and the
plugin writes them into report.json's ``timings.boots`` (schema 2). This module reads only that
list and never looks at console.log, so the timeline shows exactly what the run recorded. (The
console excerpts of failed checks in html.py still read console.log: they show lines, not stages.)

A boot in schema 2::

    {"device": "qemu-x86_64", "kind": "cold", "started": "2026-12-02T13:40:01.123+00:00",
     "accelerator": "tcg", "ended_by": "ssh ready", "end_s": 22.5,
     "stages": [{"stage": "firmware", "at_s": 2.8, "detail": "BdsDxe: loading Boot0001 ..."}, ...]}

Times are seconds since the boot started (power on, the reset of a reboot, a snapshot restore).
The drawn stages are firmware, bootloader, kernel, userspace, login, ssh and restore. Each one
starts a segment of the boot's bar that runs until the next stage starts. Other stage names
(reset, flash, flashed) are kept for the table but not drawn. A boot without an ssh stage never
got there: its bar runs to ``end_s``.

Older reports (schema 1) have boots without ``stages``, only ``ssh_ready_s`` and
``login_prompt_s``. ``upgrade_boot`` turns such a boot into the new shape, with a ``boot`` stage
at 0 that stands for "power on, stages not recorded", so the drawing code has a single path.

Odd values do not stop the page. Entries that are not objects, stages without a name or a
finite time, and repeated stages are left out. Negative times count as 0, and stages are put in
order of time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STAGES = ("firmware", "bootloader", "kernel", "userspace", "login", "ssh")  # the table's columns
# The stages a bar can start with; a bar that starts with none of them starts with the firmware,
# which runs from power on until the next stage (before the firmware's first output, too).
ORIGINS = ("restore", "boot", "firmware")
DRAWN = (*STAGES, "restore", "boot")
STAGE_LABELS = {
    "firmware": "firmware",
    "bootloader": "bootloader",
    "kernel": "kernel",
    "userspace": "userspace",
    "login": "login prompt",
    "ssh": "SSH ready",
    "restore": "snapshot restore",
    "boot": "power on",
    "reset": "reset",
    "flash": "flashing",
    "flashed": "flashed",
}
DETAIL_MAX = 160  # the plugin writes 80 characters; this only stops a runaway value


@dataclass(frozen=True)
class Stage:
    """A stage a boot reached: seconds since the boot started, and what showed it."""

    name: str
    at_s: float
    detail: str = ""


@dataclass
class Boot:
    """One boot of one device, from report.json."""

    device: str
    index: int  # 1-based, among this device's boots in the order report.json lists them
    kind: str  # cold | reboot | power-cycle | restore | reflash | wait, or "" if not recorded
    started: datetime | None = None  # UTC wall time of the boot's start
    accelerator: str = ""
    ended_by: str = ""
    end_s: float = 0.0  # the last moment the boot was seen; never before its last stage
    stages: list[Stage] = field(default_factory=list)  # in order of time, each name at most once
    schema: int = 2  # 1: upgraded from an older report that recorded only login and SSH

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def at(self, name: str) -> float | None:
        """Seconds since the start at which the boot reached ``name``; None if it did not."""
        found = self.stage(name)
        return found.at_s if found else None

    @property
    def reached_ssh(self) -> bool:
        return self.stage("ssh") is not None

    @property
    def is_restore(self) -> bool:
        return self.kind == "restore" or self.stage("restore") is not None

    @property
    def total_s(self) -> float:
        """The bar's length: SSH ready, or for a boot that never got there the last moment it was seen."""
        ssh = self.at("ssh")
        return ssh if ssh is not None else self.end_s

    @property
    def other_stages(self) -> list[Stage]:
        """The stages that are not drawn (reset, flash, flashed, names this version does not know)."""
        return [s for s in self.stages if s.name not in DRAWN]

    def segments(self) -> list[tuple[str, float, float]]:
        """The phases of the bar as (name, start_s, end_s): each drawn stage until the next one starts.

        The bar starts at 0 with its origin (restore, boot, or the firmware) and ends at SSH ready.
        A boot that never got there ends with the phase it was stuck in, at ``end_s``.
        """
        drawn = [s for s in self.stages if s.name in DRAWN]
        origin = drawn[0].name if drawn and drawn[0].name in ORIGINS else "firmware"
        points: list[tuple[str, float]] = [(origin, 0.0)]
        for s in drawn:
            if s.name in ORIGINS:
                continue
            points.append((s.name, s.at_s))
            if s.name == "ssh":  # what came after SSH is in the table, not in the bar
                break
        segments = [(points[i][0], points[i][1], points[i + 1][1]) for i in range(len(points) - 1)]
        if not self.reached_ssh and self.end_s > points[-1][1]:
            segments.append((points[-1][0], points[-1][1], self.end_s))
        return segments


def boots_from_report(report: Mapping[str, Any]) -> list[Boot]:
    """Every boot in ``report["timings"]["boots"]``: the main device's first, then each other device's.

    The main device is ``report["device"]`` (the profile name, which is its DUT's name); a boot
    without a device belongs to it. Within a device the boots keep report.json's order.
    """
    timings = report.get("timings")
    raw = timings.get("boots") if isinstance(timings, Mapping) else None
    main = _text(report.get("device"))
    counts: dict[str, int] = {}
    boots: list[Boot] = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, Mapping):
            continue
        device = _text(item.get("device")) or main
        counts[device] = counts.get(device, 0) + 1
        boots.append(boot_from_dict(item, counts[device], device))
    order = {name: i for i, name in enumerate(dict.fromkeys([main, *(b.device for b in boots)]))}
    return sorted(boots, key=lambda b: order[b.device])  # a stable sort: each device's boots keep their order


def boot_from_dict(data: Mapping[str, Any], index: int, device: str) -> Boot:
    """One boot of report.json, of either schema, as a Boot (``index`` and ``device`` as the caller counted)."""
    schema = 2
    if not isinstance(data.get("stages"), list):
        data, schema = upgrade_boot(data), 1
    stages = _stages(data["stages"])
    end_s = max([_seconds(data.get("end_s")) or 0.0, *(s.at_s for s in stages)])
    return Boot(
        device=device, index=index, kind=_text(data.get("kind")), started=parse_time(data.get("started")),
        accelerator=_text(data.get("accelerator")), ended_by=_text(data.get("ended_by")), end_s=end_s,
        stages=stages, schema=schema,
    )  # fmt: skip


def upgrade_boot(old: Mapping[str, Any]) -> dict[str, Any]:
    """A schema-1 boot (``kind``, ``ssh_ready_s``, ``login_prompt_s``) in the schema-2 shape.

    Schema 1 did not record the stages before the login prompt, so the boot starts with a
    ``boot`` stage at 0 ("power on, stages not recorded"), or ``restore`` for a snapshot restore.
    It is drawn as the old report.json path drew it: power on to login prompt, then to SSH.
    """
    ssh, login = _seconds(old.get("ssh_ready_s")), _seconds(old.get("login_prompt_s"))
    first = "restore" if old.get("kind") == "restore" else "boot"
    stages: list[dict[str, Any]] = [{"stage": first, "at_s": 0.0, "detail": "stages not recorded (report schema 1)"}]
    if login is not None:
        stages.append({"stage": "login", "at_s": login, "detail": ""})
    if ssh is not None:
        stages.append({"stage": "ssh", "at_s": ssh, "detail": ""})
    end_s = ssh if ssh is not None else login if login is not None else 0.0
    return {**old, "stages": stages, "end_s": end_s}


def parse_time(text: Any) -> datetime | None:
    """An ISO 8601 time as an aware UTC datetime; None if there is none or it does not parse."""
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _stages(raw: list[Any]) -> list[Stage]:
    """The valid stages of a boot, in order of time; a repeated name keeps its first entry."""
    stages: dict[str, Stage] = {}
    for item in raw:
        if not isinstance(item, Mapping):
            continue
        name, at_s = _text(item.get("stage")), _seconds(item.get("at_s"))
        if not name or at_s is None or name in stages:
            continue
        detail = _text(item.get("detail"))
        if len(detail) > DETAIL_MAX:
            detail = detail[: DETAIL_MAX - 1] + "…"
        stages[name] = Stage(name=name, at_s=at_s, detail=detail)
    return sorted(stages.values(), key=lambda s: s.at_s)  # stable: equal times keep their order


def _seconds(value: Any) -> float | None:
    """A finite number of seconds, at least 0; None for anything else (bools, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return max(float(value), 0.0)


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
