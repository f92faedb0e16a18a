"""The farm summary: the latest run of every device, suite by suite, and what changed since the run before.

``render_summary(reports_root, out)`` reads ``reports_root/<device>/<run>/report.json`` and writes
one self-contained HTML page: a device-by-suite matrix of verdicts (each cell links to that
run's report.html, by a relative path) and, per device, the checks that newly fail, the ones
fixed, and a boot to SSH more than 20% slower than before.

"Before" is the device's previous run under ``reports_root``; with ``previous`` (another reports
root, e.g. last night's archived one) it is the latest run of the device there instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed.report import html as rh

BOOT_REGRESSION = 0.20
BAD = ("failed", "error")


@dataclass
class DeviceRow:
    name: str
    latest: rh.RunInfo
    baseline: rh.RunInfo | None
    runs: int
    suites: dict[str, dict[str, Any]] = field(default_factory=dict)
    changes: dict[str, Any] = field(default_factory=dict)


def _latest(device_dir: Path, runs: list[rh.RunInfo]) -> rh.RunInfo | None:
    link = device_dir / "latest"
    if link.is_symlink() or link.is_dir():
        try:
            target = link.resolve(strict=True)
        except OSError:
            target = None
        for r in runs:
            if target is not None and r.run_dir.resolve() == target:
                return r
    return runs[-1] if runs else None


def _device_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.is_symlink() and d.name[:1] not in "._"),
        key=lambda d: d.name,
    )


def suite_verdicts(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per suite of a run: its verdict (failed > error > passed > skipped) and its counts."""
    suites: dict[str, dict[str, Any]] = {}
    for t in report["tests"]:
        name = rh.suite_of(t["nodeid"])
        s = suites.setdefault(name, {"counts": dict.fromkeys(rh.OUTCOMES, 0)})
        outcome = t["outcome"] if t["outcome"] in rh.OUTCOMES else "skipped"
        s["counts"][outcome] += 1
    for s in suites.values():
        c = s["counts"]
        s["verdict"] = "failed" if c["failed"] else "error" if c["error"] else "passed" if c["passed"] else "skipped"
        total = sum(c.values())
        s["text"] = {
            "passed": f"{c['passed']}/{total - c['skipped']} passed",
            "failed": f"{c['failed']} failed",
            "error": f"{c['error']} lab error{'s' if c['error'] != 1 else ''}",
            "skipped": "skipped",
        }[s["verdict"]]
        s["label"] = {"passed": "PASS", "failed": "FAIL", "error": "LAB ERROR", "skipped": "SKIP"}[s["verdict"]]
    return suites


def changes(latest: rh.RunInfo, baseline: rh.RunInfo | None) -> dict[str, Any]:
    """New failures, fixed checks, a boot time regression and an image change between two runs."""
    out: dict[str, Any] = {"new": [], "fixed": [], "boot": None, "image": None, "same_run": False}
    if baseline is None:
        return out
    if baseline.run_dir.resolve() == latest.run_dir.resolve() or baseline.run_id == latest.run_id:
        out["same_run"] = True
        return out
    before = {t["nodeid"]: t["outcome"] for t in baseline.report["tests"]}
    for t in latest.report["tests"]:
        was, now = before.get(t["nodeid"]), t["outcome"]
        name = rh.human_name(t["nodeid"])
        if now in BAD and was != now:
            out["new"].append(
                {
                    "name": name,
                    "nodeid": t["nodeid"],
                    "now": now,
                    "was": was or "not run",
                    "id": "check-" + rh.slug(t["nodeid"]),
                }
            )
        elif now == "passed" and was in BAD:
            out["fixed"].append({"name": name, "nodeid": t["nodeid"], "was": was})
    if latest.boot_s is not None and baseline.boot_s:
        ratio = latest.boot_s / baseline.boot_s - 1
        out["boot"] = {
            "before": rh.fmt_seconds(baseline.boot_s), "now": rh.fmt_seconds(latest.boot_s),
            "pct": f"{ratio * 100:+.0f}%", "regression": ratio > BOOT_REGRESSION, "faster": ratio < -BOOT_REGRESSION,
        }  # fmt: skip
    if latest.image_sha and baseline.image_sha and latest.image_sha != baseline.image_sha:
        out["image"] = {
            "before": baseline.os_version or baseline.image_name,
            "now": latest.os_version or latest.image_name,
        }
    return out


def _href(target: Path, out_dir: Path) -> str:
    """A relative link; "./" in front so that no folder name can read as a URL scheme."""
    rel = Path(os.path.relpath(os.path.abspath(target), os.path.abspath(out_dir))).as_posix()
    return rel if rel.startswith("../") else "./" + rel


def summary_context(
    reports_root: Path, out: Path, previous: Path | None = None, render_missing: bool = True
) -> dict[str, Any]:
    reports_root = Path(reports_root)
    out_dir = Path(out).parent
    rows: list[DeviceRow] = []
    problems: list[str] = []
    suite_order: list[str] = []
    for device_dir in _device_dirs(reports_root):
        all_runs = rh.device_runs(device_dir)
        problems += [r.problem for r in all_runs if r.problem]
        runs = [r for r in all_runs if not r.problem]
        latest = _latest(device_dir, runs)
        if latest is None:
            continue
        if previous is not None:
            prev_runs = [r for r in rh.device_runs(Path(previous) / device_dir.name) if not r.problem]
            baseline = _latest(Path(previous) / device_dir.name, prev_runs)
        else:
            idx = runs.index(latest)
            baseline = runs[idx - 1] if idx > 0 else None
        if render_missing and not (latest.run_dir / "report.html").exists():
            try:
                rh.render_html(latest.run_dir)
            except (rh.ReportError, OSError) as exc:
                problems.append(f"{latest.run_dir}: report.html not written: {exc}")
        row = DeviceRow(name=device_dir.name, latest=latest, baseline=baseline, runs=len(runs))
        report_href = _href(latest.run_dir / "report.html", out_dir)
        for name, s in suite_verdicts(latest.report).items():
            s["href"] = f"{report_href}#suite-{rh.slug(name)}"
            row.suites[name] = s
            if name not in suite_order:
                suite_order.append(name)
        row.changes = changes(latest, baseline)
        rows.append(row)

    devices = []
    tally = {"certified": 0, "not-certified": 0, "incomplete": 0, "unknown": 0}
    for row in rows:
        r = row.latest
        verdict = rh.verdict_of(r.result, r.counts)
        tally[verdict["key"]] = tally.get(verdict["key"], 0) + 1
        report_href = _href(r.run_dir / "report.html", out_dir)
        ch = row.changes
        for item in ch["new"]:
            item["href"] = f"{report_href}#{item['id']}"
        devices.append({
            "name": row.name, "run_id": r.run_id, "started": r.started.strftime("%Y-%m-%d %H:%M") if r.started else "—",
            "verdict": verdict, "counts": r.counts, "href": report_href, "boot": rh.fmt_seconds(r.boot_s),
            "os": r.os_version, "runs": row.runs, "cells": [row.suites.get(name) for name in suite_order],
            "changes": ch, "baseline": row.baseline.run_id if row.baseline else "",
            "baseline_href": _href(row.baseline.run_dir / "report.html", out_dir)
            if row.baseline and (row.baseline.run_dir / "report.html").exists() else "",
        })  # fmt: skip
    return {
        "root": str(reports_root),
        "previous": str(previous) if previous else "",
        "devices": devices,
        "suites": suite_order,
        "suite_titles": {s: s.replace("_", " ").replace("-", " ").capitalize() for s in suite_order},
        "tally": tally,
        "problems": problems,
        "generated": rh.fmt_time(datetime.now(UTC).replace(microsecond=0)),
        "regression_pct": int(BOOT_REGRESSION * 100),
    }


def render_summary(reports_root: Path, out: Path, previous: Path | None = None, render_missing: bool = True) -> Path:
    """Write the farm summary to ``out`` and return it.

    ``render_missing`` writes report.html for each device's latest run that lacks one, so that
    every link in the matrix leads somewhere.
    """
    reports_root = Path(reports_root)
    if not reports_root.is_dir():
        raise rh.ReportError(f"{reports_root}: no such reports directory")
    if previous is not None and not Path(previous).is_dir():
        raise rh.ReportError(f"{previous}: no such reports directory (for --previous)")
    out = Path(out)
    context = summary_context(reports_root, out, previous, render_missing)
    html = rh.environment().get_template("summary.html.j2").render(**context)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out
