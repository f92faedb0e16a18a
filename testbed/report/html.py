"""report.html: the certification report a person reads, prints and signs.

``render_html(run_dir)`` reads ``report.json`` and ``console.log`` of one run (and the
report.json of the device's earlier runs, for the history) and writes ``run_dir/report.html``:
one self-contained file with inline CSS and SVG, no script and no fetches, so it can be
mailed, archived and printed as it is.

The boot timeline draws only what report.json's ``timings.boots`` holds: the stages the boot
model detected live (see timeline.py). console.log is read for one thing, the console lines
around a failed check, which are matched to the check by their timestamps.

Everything the device printed is untrusted: the templates escape every value (autoescape),
control characters are shown as symbols, and the page's Content-Security-Policy forbids scripts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2

from testbed.report import timeline as tl
from testbed.report.timeline import parse_time

TEMPLATES = Path(__file__).with_name("templates")

OUTCOMES = ("passed", "failed", "error", "skipped")
OUTCOME_LABELS = {"passed": "PASS", "failed": "FAIL", "error": "LAB ERROR", "skipped": "SKIPPED"}
KIND_LABELS = {
    "dut": "device fault",
    "assertion": "the check's expectation was not met",
    "infra": "the emulator, console or host failed, not the device",
    "config": "the profile, image or options are wrong",
    "test": "a bug in the check or in testbed: not the device's fault, not the lab's",
    "other": "unexpected exception in the test",
}
STAGE_COLOURS = {
    "firmware": "#64748b",
    "bootloader": "#7c3aed",
    "kernel": "#2563eb",
    "userspace": "#0891b2",
    "login": "#059669",
    "restore": "#94a3b8",
    "ssh": "#059669",
    "boot": "#475569",
}
# What each drawn segment is: a stage runs until the next one starts; "login" is the wait for SSH.
SEGMENT_LABELS = {
    "boot": "power on → login prompt or SSH (stages not recorded)",
    "firmware": "firmware",
    "bootloader": "bootloader",
    "kernel": "kernel",
    "userspace": "userspace",
    "login": "login prompt → SSH",
    "restore": "snapshot restore",
}

CONSOLE_MARGIN_S = 2.0
CONSOLE_MAX_LINES = 80
CONSOLE_FALLBACK_LINES = 30
OUTPUT_HEAD = 2_000
OUTPUT_TAIL = 14_000
HISTORY_ROWS = 20
SPARK_POINTS = 30


class ReportError(Exception):
    """A report.json that cannot be read; the message names the file."""


# -- report.json -------------------------------------------------------------------------------
def load_report(path: Path) -> dict[str, Any]:
    """Read a report.json and fill in what an older or partial report lacks.

    Unknown fields are kept and ignored; missing optional ones get defaults. A file that is
    not JSON, not an object, or has fields of the wrong type raises ReportError naming it.
    Long on purpose: one line per field of the schema, in the schema's order.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(data).__name__}")

    def need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str = "") -> Any:
        value = obj.get(key)
        if value is None:
            obj[key] = default
            return default
        if not isinstance(value, kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ReportError(f"{path}: {where}{key!r} should be {_article(names)}, found {type(value).__name__}")
        return value

    tests = need(data, "tests", list, [])
    for i, t in enumerate(tests):
        if not isinstance(t, dict):
            raise ReportError(f"{path}: tests[{i}] should be an object, found {type(t).__name__}")
        where = f"tests[{i}]."
        nodeid = need(t, "nodeid", str, "", where)
        if not nodeid:
            raise ReportError(f"{path}: tests[{i}] has no nodeid")
        need(t, "outcome", str, "passed", where)
        need(t, "duration_s", (int, float), 0.0, where)
        need(t, "message", str, "", where)
        need(t, "kind", str, "", where)
        evidence = need(t, "evidence", list, [], where)
        for j, e in enumerate(evidence):
            if not isinstance(e, dict):
                raise ReportError(f"{path}: {where}evidence[{j}] should be an object, found {type(e).__name__}")
    need(data, "device", str, data.get("facts", {}).get("device", "") if isinstance(data.get("facts"), dict) else "")
    need(data, "run_id", str, path.parent.name)
    need(data, "facts", dict, {})
    image = need(data, "image", dict, {})
    for key in ("path", "sha256", "format"):
        need(image, key, str, "", "image.")
    timings = need(data, "timings", dict, {})
    need(timings, "boots", list, [], "timings.")
    need(data, "testbed", dict, {})
    for key in ("started", "finished"):
        need(data, key, str, "")
    computed = {o: 0 for o in OUTCOMES}
    for t in tests:
        computed[t["outcome"]] = computed.get(t["outcome"], 0) + 1
    counts = need(data, "counts", dict, computed)
    for o in OUTCOMES:
        counts.setdefault(o, computed.get(o, 0))
        if not isinstance(counts[o], int) or isinstance(counts[o], bool):
            raise ReportError(f"{path}: counts.{o} should be a whole number, found {counts[o]!r}")
    if not data.get("result"):
        data["result"] = "failed" if computed["failed"] else "error" if computed["error"] else "passed"
    need(data, "result", str, "")
    return data


def _article(names: str) -> str:
    return ("an " if names[:1] in "aeiou" else "a ") + names


# -- small formatting helpers -----------------------------------------------------------------
def fmt_seconds(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or math.isnan(seconds):
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_time(when: datetime | None, with_date: bool = True) -> str:
    if when is None:
        return "—"
    return when.strftime("%Y-%m-%d %H:%M:%S UTC" if with_date else "%H:%M:%S")


def fmt_size(size: Any) -> str:
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        return "—" if size in (None, "") else str(size)
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value >= 100 or value == int(value) else f"{value:.1f} {unit}"
    return f"{size:.0f} B"


def fmt_value(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def human_name(nodeid: str) -> str:
    """``suites/smoke/test_smoke.py::test_ssh_answers_on_22222`` -> ``SSH answers on 22222``."""
    parts = nodeid.split("::")[1:] or [nodeid.rsplit("/", 1)[-1]]
    words = []
    for part in parts:
        name, bracket, params = part.partition("[")
        name = re.sub(r"^(test_?|Test)", "", name).replace("_", " ").strip() or part
        name = _ACRONYMS.sub(lambda m: m.group(0).upper(), name)
        words.append(name + (f" [{params}" if bracket else ""))
    text = " › ".join(words)
    return text[:1].upper() + text[1:]


_ACRONYMS = re.compile(r"\b(ssh|os|gpt|mbr|uefi|efi|usb|dns|dhcp|ntp|tls|api|vpn|cpu|ram|ota|id|ab)\b")


def suite_of(nodeid: str) -> str:
    """The suite a test belongs to: ``suites/<suite>/...`` or the first folder of its path, else its module."""
    path = nodeid.split("::", 1)[0]
    parts = [p for p in path.split("/") if p and p != "."]
    if parts and parts[0] == "suites":
        parts = parts[1:]
    if len(parts) >= 2:
        return parts[0]
    if parts:
        return re.sub(r"^test_|\.py$", "", parts[0]).removesuffix(".py") or parts[0]
    return "tests"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


_CONTROL = {c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A)}
_CONTROL[0x7F] = 0x2421
# Bidirectional overrides could make device output read differently from what it is.
_CONTROL.update({c: 0xFFFD for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def visible(value: Any) -> Any:
    """Text from the device with control characters shown as symbols (escaping is the template's)."""
    if isinstance(value, str):
        return value.translate(_CONTROL)
    return value


def clip(text: str) -> tuple[str, int]:
    """Long output cut in the middle: (text, characters left out)."""
    if len(text) <= OUTPUT_HEAD + OUTPUT_TAIL:
        return text, 0
    cut = len(text) - OUTPUT_HEAD - OUTPUT_TAIL
    note = f"\n… {cut} characters cut here; the full output is in report.json …\n"
    return text[:OUTPUT_HEAD] + note + text[-OUTPUT_TAIL:], cut


# -- the runs of a device --------------------------------------------------------------------
@dataclass
class RunInfo:
    """One run of a device, as the history and the farm summary see it."""

    run_dir: Path
    run_id: str
    started: datetime | None
    result: str
    counts: dict[str, int]
    boot_s: float | None
    image_name: str
    image_sha: str
    os_version: str
    report: dict[str, Any] = field(repr=False, default_factory=dict)
    problem: str = ""  # why report.json could not be read

    @property
    def sort_key(self) -> tuple[str, str]:
        return (self.started.isoformat() if self.started else "", self.run_id)


def read_run(run_dir: Path) -> RunInfo:
    try:
        report = load_report(run_dir / "report.json")
    except ReportError as exc:
        return RunInfo(run_dir, run_dir.name, None, "unreadable", {}, None, "", "", "", {}, problem=str(exc))
    boot = report["timings"].get("boot_to_ssh_s")
    return RunInfo(
        run_dir=run_dir,
        run_id=report["run_id"] or run_dir.name,
        started=parse_time(report["started"]),
        result=report["result"],
        counts={o: int(report["counts"].get(o) or 0) for o in OUTCOMES},
        boot_s=float(boot) if isinstance(boot, (int, float)) and not isinstance(boot, bool) else None,
        image_name=os.path.basename(report["image"]["path"]),
        image_sha=report["image"]["sha256"],
        os_version=fmt_value(report["facts"].get("pretty_name") or report["facts"].get("version_id")),
        report=report,
    )


def device_runs(device_dir: Path) -> list[RunInfo]:
    """Every run under ``reports/<device>/`` (not following ``latest``), oldest first."""
    runs = []
    if device_dir.is_dir():
        for child in device_dir.iterdir():
            if child.is_symlink() or not child.is_dir() or child.name.startswith("."):
                continue
            if (child / "report.json").exists():
                runs.append(read_run(child))
    return sorted(runs, key=lambda r: r.sort_key)


def verdict_of(result: str, counts: dict[str, int]) -> dict[str, str]:
    """The headline for a result: key (a CSS class), title and a short explanation."""
    if result == "passed" and counts.get("passed", 0) == 0:
        return {"key": "incomplete", "title": "INCOMPLETE: nothing checked", "short": "no checks ran"}
    if result == "passed":
        return {"key": "certified", "title": "CERTIFIED", "short": "certified"}
    if result == "failed":
        return {"key": "not-certified", "title": "NOT CERTIFIED", "short": "not certified"}
    if result == "error":
        return {"key": "incomplete", "title": "INCOMPLETE: lab fault", "short": "lab fault"}
    return {"key": "unknown", "title": f"UNKNOWN RESULT: {result or 'none'}", "short": result or "unknown"}


# -- the boot timeline --------------------------------------------------------------------
CHART_W = 960
CHART_LABEL_W = 190
CHART_LABEL_MAX_W = 380
CHART_CHAR_W = 6.6  # the average width of a 12 px label character: sizes the label column
CHART_RIGHT_W = 70
CHART_ROW_H = 34
CHART_BAR_H = 20
CHART_AXIS_H = 26


def _nice_step(span: float) -> float:
    for step in (0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600):
        if span / step <= 8:
            return step
    return 1200


def _label_width(labels: list[str]) -> float:
    """The label column: 190 px, wider for the longer labels of a run with several devices."""
    longest = max((len(label) for label in labels), default=0)
    return min(max(CHART_LABEL_W, round(longest * CHART_CHAR_W + 14)), CHART_LABEL_MAX_W)


def _fit(label: str, width: float) -> str:
    """The label cut in the middle to fit ``width`` (both the device and the boot's kind stay readable)."""
    room = int((width - 14) / CHART_CHAR_W)
    if len(label) <= room:
        return label
    head = (room - 1) // 2
    return label[:head] + "…" + label[len(label) - (room - 1 - head) :]


def boot_chart(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Geometry of the SVG bar chart: one row per boot, a coloured segment per stage."""
    if not rows:
        return None
    span = max([r["total"] for r in rows] + [1.0])
    step = _nice_step(span)
    axis_max = math.ceil(span / step) * step
    label_w = _label_width([r["label"] for r in rows])
    scale = (CHART_W - label_w - CHART_RIGHT_W) / axis_max
    height = len(rows) * CHART_ROW_H + CHART_AXIS_H + 8
    ticks = []
    t = 0.0
    while t <= axis_max + 1e-9:
        ticks.append({"x": round(label_w + t * scale, 1), "label": f"{t:g} s"})
        t += step
    bars = []
    for i, row in enumerate(rows):
        y = 4 + i * CHART_ROW_H
        segs = []
        for name, start, end in row["segments"]:
            w = max((end - start) * scale, 1.0)
            segs.append({
                "x": round(label_w + start * scale, 1), "w": round(w, 1), "name": name,
                "label": SEGMENT_LABELS.get(name, name), "colour": STAGE_COLOURS.get(name, "#94a3b8"),
                "text": fmt_seconds(end - start) if w >= 44 else "", "tip": f"{SEGMENT_LABELS.get(name, name)}: {start:.2f}–{end:.2f} s",
            })  # fmt: skip
        label = _fit(row["label"], label_w)
        bars.append({
            "y": y, "bar_y": y + (CHART_ROW_H - CHART_BAR_H) / 2, "text_y": y + CHART_ROW_H / 2 + 4,
            "label": label, "title": row["label"] if label != row["label"] else "", "segments": segs,
            "complete": row["complete"], "end_x": round(label_w + row["total"] * scale + 6, 1), "total": row["total_text"],
        })  # fmt: skip
    return {
        "width": CHART_W, "height": height, "bar_h": CHART_BAR_H, "bars": bars, "ticks": ticks,
        "axis_y": len(rows) * CHART_ROW_H + 6, "plot_top": 2, "left": label_w,
    }  # fmt: skip


def timeline_context(report: dict[str, Any]) -> dict[str, Any]:
    """The page's boot timeline, from report.json's ``timings.boots`` and nothing else.

    Full boots are drawn (a chart row each) and tabled; snapshot restores are summed up in one
    line. When the boots are of several devices, each row names its device, and the rows of
    the main device (``report["device"]``) come first. Keys: ``rows``, ``chart`` (None without
    a full boot), ``restores`` ("" without one), ``stages`` and ``stage_labels`` (the table's
    columns), ``legend``, ``devices``, ``several_devices``, ``detailed`` (a row's stages were
    recorded live) and ``legacy`` (a row comes from a schema-1 report: only login and SSH known).
    """
    boots = tl.boots_from_report(report)
    devices = list(dict.fromkeys(b.device for b in boots))
    several = len(devices) > 1
    rows = [boot_row(b, several) for b in boots if not b.is_restore]
    return {
        "rows": rows, "chart": boot_chart(rows), "restores": restore_summary([b for b in boots if b.is_restore], several),
        "stages": list(tl.STAGES), "stage_labels": tl.STAGE_LABELS, "legend": _legend(rows),
        "devices": devices, "several_devices": several,
        "detailed": any(r["schema"] >= 2 for r in rows), "legacy": any(r["schema"] == 1 for r in rows),
    }  # fmt: skip


def boot_row(boot: tl.Boot, several_devices: bool) -> dict[str, Any]:
    """One full boot as a chart row and a table row (stage times, what showed them, undrawn stages)."""
    kind = f" · {boot.kind}" if boot.kind else ""
    label = f"{boot.device} · boot {boot.index}{kind}" if several_devices else f"Boot {boot.index}{kind}"
    total = boot.total_s
    other = [
        {"label": f"{tl.STAGE_LABELS.get(s.name, s.name)} at {fmt_seconds(s.at_s)}", "detail": s.detail}
        for s in boot.other_stages
    ]
    return {
        "index": boot.index, "device": boot.device, "kind": boot.kind, "accelerator": boot.accelerator,
        "start": _clock(boot.started), "stages": {name: boot.at(name) for name in tl.STAGES},
        "details": {s.name: s.detail for s in boot.stages if s.detail}, "other": other,
        "segments": boot.segments(), "total": total, "complete": boot.reached_ssh, "ended_by": boot.ended_by,
        "label": label, "total_text": fmt_seconds(total) if boot.reached_ssh else f"{fmt_seconds(total)} ✗",
        "schema": boot.schema,
    }  # fmt: skip


def restore_summary(restores: list[tl.Boot], several_devices: bool) -> str:
    """The one line for the snapshot restores: how many (per device, if several), and how soon SSH was back."""
    if not restores:
        return ""
    text = f"{len(restores)} snapshot restore{'s' if len(restores) != 1 else ''}"
    if several_devices:
        text += " (" + ", ".join(f"{d}: {n}" for d, n in Counter(b.device for b in restores).items()) + ")"
    ssh = [s for b in restores if (s := b.at("ssh")) is not None]
    if ssh:
        lo, hi, med = min(ssh), max(ssh), statistics.median(ssh)
        if lo == hi:
            text += f": SSH ready {fmt_seconds(lo)}"
        else:
            text += f": SSH ready after {fmt_seconds(lo)} to {fmt_seconds(hi)} (median {fmt_seconds(med)})"
    if len(ssh) < len(restores):
        text += f"; {len(restores) - len(ssh)} never got SSH back"
    return text


def _clock(when: datetime | None) -> str:
    """``21:50:03.512``: a boot's start as the console log writes its wall clock (UTC)."""
    return f"{when:%H:%M:%S}.{when.microsecond // 1000:03d}" if when else ""


def _legend(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    used = {name for row in rows for name, _, _ in row["segments"]}
    return [(SEGMENT_LABELS[n], STAGE_COLOURS[n]) for n in SEGMENT_LABELS if n in used]


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# -- console excerpts ---------------------------------------------------------------------
# Lines look like ``[21:50:01.123 +   3.456] text``: the UTC wall clock, then the seconds since
# the last power on. testbed writes marker lines of its own (``==== testbed: power cut ====``).
# Only the excerpts of failed checks read the console; the boot timeline does not.
_LINE = re.compile(r"^\[(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))? \+\s*(-?\d+(?:\.\d+)?)\] ?(.*)$")
_MARKER = re.compile(r"^==== testbed: (.*?) ====$")
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


@dataclass
class Excerpt:
    caption: str
    lines: list[dict[str, Any]]
    omitted: int = 0


_BAD = re.compile(r"\[FAILED\]|\b(error|fail(ed|ure)?|panic|oops|BUG|segfault|call trace|timed out)\b", re.IGNORECASE)


def _console_line(line: ConsoleLine) -> dict[str, Any]:
    cls = "mk" if line.marker is not None else "bad" if _BAD.search(line.text) else ""
    return {"no": line.no, "wall": line.wall, "text": line.text, "cls": cls}


def _spans(test: dict[str, Any]) -> list[tuple[datetime, datetime]]:
    out = []
    for e in test["evidence"]:
        start = parse_time(e.get("started"))
        if start is not None:
            out.append((start, start + timedelta(seconds=_num(e.get("duration_s")) or 0.0)))
    return out


def console_excerpt(index: int, tests: list[dict[str, Any]], console: list[ConsoleLine] | None) -> Excerpt:
    """The console around test ``index``.

    If the test's commands carry start times, the console lines from 2 s before its first
    command to 2 s after its end (its last command's end, or first command plus the test's
    duration, whichever is later). Otherwise the last 30 lines between the previous check's
    last command and the next check's first command, stopping at a power cut.
    """
    if console is None:
        return Excerpt("This run has no console.log, so there is no console excerpt.", [])
    test = tests[index]
    stamped = [ln for ln in console if ln.when is not None]
    when = {id(ln): ln.when for ln in stamped if ln.when is not None}  # every stamped line's time, typed
    spans = _spans(test)
    if spans and stamped:
        first = min(s for s, _ in spans)
        end = max(max(e for _, e in spans), first + timedelta(seconds=test["duration_s"]))
        lo, hi = first - timedelta(seconds=CONSOLE_MARGIN_S), end + timedelta(seconds=CONSOLE_MARGIN_S)
        picked = [ln for ln in stamped if lo <= when[id(ln)] <= hi]
        window = f"{fmt_time(lo, False)} to {fmt_time(hi, False)} UTC"
        if not picked:
            log_lo, log_hi = when[id(stamped[0])], when[id(stamped[-1])]
            if hi < log_lo or lo > log_hi:
                return Excerpt(
                    f"This check's commands ran {window}, outside the time the console log covers "
                    f"({fmt_time(log_lo, False)} to {fmt_time(log_hi, False)} UTC): no console excerpt.",
                    [],
                )
            return Excerpt(f"The console printed nothing from {window}, while this check's commands ran.", [])
        omitted = max(0, len(picked) - CONSOLE_MAX_LINES)
        caption = (
            f"Console lines from {window}: the time of this check's {len(spans)} "
            f"command{'s' if len(spans) != 1 else ''} (from the first command to the end of the check, ±2 s)."
        )
        if omitted:
            caption += f" The first {omitted} lines of that window are left out."
        return Excerpt(caption, [_console_line(ln) for ln in picked[omitted:]], omitted)

    lower = max((e for t in tests[:index] for _, e in _spans(t)), default=None)
    upper = min((s for t in tests[index + 1 :] for s, _ in _spans(t)), default=None)
    if stamped:
        pool = [
            ln for ln in stamped if (lower is None or when[id(ln)] > lower) and (upper is None or when[id(ln)] < upper)
        ]
    else:
        pool = list(console)
    end_what = "the next check's first command" if upper is not None else "the end of the log"
    for i, ln in enumerate(pool):
        if ln.marker is not None and ln.marker.startswith("power cut"):
            pool = pool[: i + 1]
            end_what = f"the power cut at {ln.wall}"
            break
    from_what = f"the previous check's last command ({fmt_time(lower, False)} UTC)" if lower else "the start of the log"
    why = "This check ran no command with a timestamp, so the console cannot be matched to it by time"
    if not pool:
        return Excerpt(f"{why}, and the console printed nothing between {from_what} and {end_what}.", [])
    picked = pool[-CONSOLE_FALLBACK_LINES:]
    return Excerpt(
        f"{why}. Shown instead: the last {len(picked)} console lines between {from_what} and {end_what}.",
        [_console_line(ln) for ln in picked],
        len(pool) - len(picked),
    )


def _anchor_console(console: list[ConsoleLine], report: dict[str, Any]) -> None:
    """Put the console's wall clock on the run's date, to compare it with the commands' start times."""
    started = parse_time(report["started"])
    if started is None:  # an older or partial report: the first command's time will do
        started = min((s for t in report["tests"] for s, _ in _spans(t)), default=None)
    first = next((ln.seconds_of_day for ln in console if ln.seconds_of_day is not None), None)
    if started is None or first is None:
        return
    day = started.date()
    started_sod = started.hour * 3600 + started.minute * 60 + started.second
    if first + 6 * 3600 < started_sod:  # the console started after midnight
        day += timedelta(days=1)
    anchor(console, day)


# -- the checks ---------------------------------------------------------------------------
def checks_context(report: dict[str, Any], console: list[ConsoleLine] | None) -> list[dict[str, Any]]:
    tests = report["tests"]
    suites: dict[str, dict[str, Any]] = {}
    used_ids: set[str] = set()
    for i, t in enumerate(tests):
        name = suite_of(t["nodeid"])
        suite = suites.setdefault(
            name, {"name": name, "id": "suite-" + slug(name), "checks": [], "counts": dict.fromkeys(OUTCOMES, 0)}
        )
        # An outcome this version does not know is shown as it is, in the neutral colour of a skip.
        outcome = t["outcome"] if t["outcome"] in OUTCOMES else "skipped"
        suite["counts"][outcome] += 1
        check_id = "check-" + slug(t["nodeid"])
        while check_id in used_ids:
            check_id += "-"
        used_ids.add(check_id)
        evidence = []
        for e in t["evidence"]:
            stdout, cut_out = clip(fmt_value(e.get("stdout")) if e.get("stdout") else "")
            stderr, cut_err = clip(fmt_value(e.get("stderr")) if e.get("stderr") else "")
            code = e.get("exit_code")
            evidence.append({
                "transport": fmt_value(e.get("transport")), "command": fmt_value(e.get("command")),
                "exit_code": "—" if code is None else str(code), "ok": code == 0,
                "started": fmt_time(parse_time(e.get("started")), False) if parse_time(e.get("started")) else "",
                "duration": fmt_seconds(_num(e.get("duration_s"))), "stdout": stdout, "stderr": stderr,
                "kind": fmt_value(e.get("kind") or "command"),
            })  # fmt: skip
        # Kernel or service trouble the device printed while the check ran (testbed/trouble.py).
        trouble = [
            {"what": fmt_value(e.get("command")), "line": fmt_value(e.get("stdout")), "fails": e.get("exit_code") != 0}
            for e in t["evidence"]
            if e.get("kind") == "trouble"
        ]
        bad = outcome in ("failed", "error")
        check = {
            "id": check_id, "nodeid": t["nodeid"], "name": human_name(t["nodeid"]), "outcome": outcome,
            "outcome_label": OUTCOME_LABELS.get(t["outcome"], t["outcome"].upper()), "duration": fmt_seconds(t["duration_s"]),
            "message": t["message"], "kind": t["kind"], "kind_label": _problem_title(outcome, t["kind"]),
            "evidence": evidence, "failed_commands": sum(1 for e in evidence if not e["ok"]),
            "excerpt": console_excerpt(i, tests, console) if bad else None, "open": bad, "trouble": trouble,
            "inherited": _inherited(t.get("inherited")),
        }  # fmt: skip
        suite["checks"].append(check)
    for suite in suites.values():
        c = suite["counts"]
        suite["verdict"] = (
            "failed" if c["failed"] else "error" if c["error"] else "passed" if c["passed"] else "skipped"
        )
        suite["title"] = suite["name"].replace("_", " ").replace("-", " ").capitalize()
    return list(suites.values())


def _inherited(value: Any) -> dict[str, str] | None:
    """Where an inherited verdict's evidence is: the other mode's report.html, by a relative link."""
    if not isinstance(value, dict) or not value.get("report"):
        return None
    report = str(value["report"])
    html = report[: -len("report.json")] + "report.html" if report.endswith("report.json") else report
    return {"mode": str(value.get("mode", "")), "run_id": str(value.get("run_id", "")), "href": html}


def _problem_title(outcome: str, kind: str) -> str:
    if outcome == "failed":
        prefix = "Failure"
    elif kind == "infra":
        prefix = "Lab fault"
    elif kind == "config":
        prefix = "Configuration error"
    elif kind == "test":
        prefix = "Broken check"
    else:
        prefix = "Error"
    detail = KIND_LABELS.get(kind, kind)
    return f"{prefix}: {detail}" if detail else prefix


# -- device facts -------------------------------------------------------------------------
_SHOWN_FACTS = {
    "device", "machine", "accelerator", "accelerator_note", "qemu_machine", "firmware", "memory_mib", "cpus",
    "pretty_name", "version_id", "kernel", "slug", "partitions", "partition_table", "name", "version",
}  # fmt: skip


def facts_context(report: dict[str, Any]) -> dict[str, Any]:
    facts = report["facts"]
    image = report["image"]
    started, finished = parse_time(report["started"]), parse_time(report["finished"])
    machine_bits = []
    if facts.get("machine"):
        machine_bits.append(str(facts["machine"]).replace("qemu", "QEMU"))
    if facts.get("qemu_machine"):
        machine_bits.append(f"machine type {facts['qemu_machine']}")
    if facts.get("cpus"):
        machine_bits.append(f"{facts['cpus']} CPU{'s' if facts['cpus'] != 1 else ''}")
    if facts.get("memory_mib"):
        machine_bits.append(f"{facts['memory_mib']} MiB RAM")
    os_name = facts.get("pretty_name") or facts.get("name") or ""
    version = facts.get("version_id") or facts.get("version") or ""
    if version and str(version) not in str(os_name):
        os_name = f"{os_name} (version {version})" if os_name else f"version {version}"
    boot_s = _num(report["timings"].get("boot_to_ssh_s"))
    tb = report["testbed"]
    rows = [
        ("Device profile", fmt_value(report["device"]), False),
        ("Operating system", fmt_value(os_name), False),
        ("OS slug", fmt_value(facts.get("slug")), True),
        ("Kernel", fmt_value(facts.get("kernel")), True),
        ("Image", fmt_value(os.path.basename(image["path"])), True),
        ("Image path", fmt_value(image["path"]), True),
        ("Image SHA-256", fmt_value(image["sha256"]), True),
        ("Image format", fmt_value(image["format"]), False),
        ("Firmware", fmt_value(facts.get("firmware")), True),
        ("Machine", ", ".join(machine_bits) or "—", False),
        ("Accelerator", fmt_value(facts.get("accelerator")) + (
            f" ({facts['accelerator_note']})" if facts.get("accelerator_note") else ""), False),
        ("Boot to SSH (first boot)", fmt_seconds(boot_s), False),
        ("Started", fmt_time(started), False),
        ("Duration", fmt_seconds((finished - started).total_seconds()) if started and finished else "—", False),
        ("testbed", f"version {fmt_value(tb.get('version'))} on host {fmt_value(tb.get('host'))}", False),
    ]  # fmt: skip
    rows = [r for r in rows if not (r[0] in ("OS slug", "Image path") and r[1] == "—")]
    partitions = []
    for p in facts.get("partitions") or []:
        if isinstance(p, dict):
            partitions.append({
                "label": fmt_value(p.get("label") or p.get("name")), "fstype": fmt_value(p.get("fstype")),
                "size": fmt_size(p.get("size", p.get("size_bytes"))),
            })  # fmt: skip
    other = [(k, fmt_value(v)) for k, v in sorted(facts.items()) if k not in _SHOWN_FACTS]
    return {
        "rows": rows, "partitions": partitions, "partition_table": fmt_value(facts.get("partition_table")),
        "other": other,
    }  # fmt: skip


# -- history ------------------------------------------------------------------------------
def history_context(run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    runs = [r for r in device_runs(run_dir.parent) if not r.problem]
    me = run_dir.resolve()
    if not any(r.run_dir.resolve() == me for r in runs):
        runs.append(read_run(run_dir))
        runs.sort(key=lambda r: r.sort_key)
    rows = []
    for r in runs[-HISTORY_ROWS:][::-1]:
        current = r.run_dir.resolve() == me
        target = "report.html" if (r.run_dir / "report.html").exists() or current else "report.json"
        rows.append({
            "run_id": r.run_id, "started": r.started.strftime("%Y-%m-%d %H:%M") if r.started else "—", "result": r.result,
            "verdict": verdict_of(r.result, r.counts), "counts": r.counts, "boot": fmt_seconds(r.boot_s),
            "image": r.image_name, "os": r.os_version, "current": current,
            "href": target if current else f"../{r.run_dir.name}/{target}",
        })  # fmt: skip
    return {"rows": rows, "total": len(runs), "spark": sparkline(runs[-SPARK_POINTS:], me)}


def sparkline(runs: list[RunInfo], current: Path | None, width: int = 360, height: int = 70) -> dict[str, Any] | None:
    if not runs:
        return None
    pad_l, pad_r, pad_t, pad_b = 10, 10, 12, 24
    values = [r.boot_s for r in runs if r.boot_s is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 1, hi + 1
    n = len(runs)
    step = (width - pad_l - pad_r) / max(n - 1, 1)
    plot_h = height - pad_t - pad_b
    points = []
    for i, r in enumerate(runs):
        x = pad_l + (i * step if n > 1 else (width - pad_l - pad_r) / 2)
        y = None if r.boot_s is None else pad_t + plot_h - (r.boot_s - lo) / (hi - lo) * plot_h
        points.append({
            "x": round(x, 1), "y": None if y is None else round(y, 1), "result": verdict_of(r.result, r.counts)["key"],
            "current": current is not None and r.run_dir.resolve() == current,
            "tip": f"{r.run_id}: {r.result}, boot to SSH {fmt_seconds(r.boot_s)}",
        })  # fmt: skip
    line = " ".join(f"{p['x']},{p['y']}" for p in points if p["y"] is not None)
    return {
        "width": width, "height": height, "points": points, "line": line, "strip_y": height - 12,
        "lo": fmt_seconds(lo) if values else "", "hi": fmt_seconds(hi) if values else "",
    }  # fmt: skip


# -- rendering ----------------------------------------------------------------------------
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        finalize=visible,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["seconds"] = fmt_seconds
    return env


def report_context(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    report = load_report(report_path)
    console_path = run_dir / "console.log"
    console: list[ConsoleLine] | None = None
    if console_path.is_file():
        console = read_console(console_path)
        _anchor_console(console, report)
    counts = {o: int(report["counts"].get(o) or 0) for o in OUTCOMES}
    suites = checks_context(report, console)
    bad = [c for s in suites for c in s["checks"] if c["outcome"] in ("failed", "error")]
    return {
        "report": report,
        "device": report["device"] or "unknown device",
        "run_id": report["run_id"],
        "verdict": verdict_of(report["result"], counts),
        "counts": counts,
        "total": sum(counts.values()),
        "failures": [c for c in bad if c["outcome"] == "failed"],
        "lab_faults": [c for c in bad if c["outcome"] == "error"],
        "facts": facts_context(report),
        "timeline": timeline_context(report),
        "suites": suites,
        "history": history_context(run_dir, report),
        "started": fmt_time(parse_time(report["started"])),
        "boot_s": fmt_seconds(_num(report["timings"].get("boot_to_ssh_s"))),
        "generated": fmt_time(datetime.now(UTC).replace(microsecond=0)),
        "report_sha256": hashlib.sha256(report_path.read_bytes()).hexdigest(),
        "has_console": console is not None,
    }


def render_html(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's report.html (or ``out``) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    context = report_context(run_dir)
    html = environment().get_template("report.html.j2").render(**context)
    out = Path(out) if out is not None else run_dir / "report.html"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out
