"""The summary of a farm night (``reports/summary.html``): every job, every attempt and why it was retried."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed.report import html as rh

_KEYS = {"passed": "certified", "failed": "not-certified", "lab fault": "incomplete", "bad input": "incomplete"}


def _href(target: str, out_dir: Path) -> str:
    return os.path.relpath(Path(target).resolve(), out_dir.resolve()) if target else ""


def render_farm_summary(data: dict[str, Any], out: Path) -> Path:
    out_dir = out.parent
    tally = dict.fromkeys(("passed", "failed", "lab fault", "bad input"), 0)
    jobs = []
    for job in data["jobs"]:
        if job["verdict"] in tally:
            tally[job["verdict"]] += 1
        attempts = [{**a, "href": _href(a["report"], out_dir)} for a in job["attempts"]]
        jobs.append({**job, "attempts": attempts, "key": _KEYS.get(job["verdict"], "incomplete")})
    health = [{**h, "href": _href(h.get("report", ""), out_dir)} for h in data.get("health_checks", [])]
    context = {
        **data,
        "jobs": jobs,
        "health": health,
        "tally": tally,
        "retried": sum(1 for j in jobs if len(j["attempts"]) > 1),
        "started": rh.fmt_time(datetime.fromtimestamp(data["started"], UTC).replace(microsecond=0)),
        "seconds": rh.fmt_seconds(data["seconds"]),
        "generated": rh.fmt_time(datetime.now(UTC).replace(microsecond=0)),
        "coordinator": data.get("coordinator") or "none (QEMU only)",
    }
    html = rh.environment().get_template("farm.html.j2").render(**context)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out
