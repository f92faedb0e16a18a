"""Health checks of a farm's places (LAVA's idea, on labgrid's places).

A health check boots a known-good image on a place (the reference image for the place's
device profile, or ``--image``) and runs the smoke suite on it through the remote path.
The verdict goes into the place's tags in the coordinator, where every client sees it:

* ``testbed_health``: ``good`` or ``bad`` (absent: never checked, or put back with ``--reset``);
* ``testbed_health_at``: the Unix time of the check;
* ``testbed_health_reason``: why it is bad (the first line of the failure);
* ``testbed_health_report``: the report of the check.

testbed's requests by tags skip ``bad`` places (``testbed.farm.keeper``); a farm night
checks a place whose last check is older than ``health.every_hours`` before giving it work
(``testbed.farm.run``). A failed health check is the board's (or the lab's) fault, never
the fault of an image under test: it is reported as a place taken out of service.

Which profile drives a place: ``--device``, else the place's ``testbed_device`` tag.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ConfigError
from testbed.farm.coordinator import Coordinator, PlaceInfo
from testbed.report import EXIT_PASSED, EXIT_USAGE

HEALTH = "testbed_health"
AT = "testbed_health_at"
REASON = "testbed_health_reason"
REPORT = "testbed_health_report"
DEVICE_TAG = "testbed_device"


@dataclass
class HealthResult:
    place: str
    verdict: str  # good, bad, or "not checked" (bad input: nothing marked)
    reason: str
    report: str
    exit_code: int
    seconds: float


def _reason(report_json: Path | None, code: int, output: str) -> str:
    if report_json is not None and report_json.exists():
        data = json.loads(report_json.read_text())
        for test in data.get("tests", []):
            if test.get("outcome") in ("failed", "error"):
                first = (test.get("message") or "").strip().splitlines()
                return f"{test['nodeid'].split('::')[-1]}: {first[0] if first else test['outcome']}"[:300]
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else f"smoke exited {code}")[:300]


def device_for(place: PlaceInfo, device: str | None) -> str:
    chosen = device or place.tags.get(DEVICE_TAG)
    if not chosen:
        raise ConfigError(
            f"labgrid place {place.name}: no device profile for its health check: pass --device PROFILE, or tag "
            f"the place: labgrid-client -p {place.name} set-tags {DEVICE_TAG}=PROFILE"
        )
    return chosen


def smoke_argv(
    coordinator: str | None, place: str, profile: str, image: str | None, report_dir: Path, lock_wait: float = 600.0
) -> list[str]:
    """The smoke run that checks ``place``: it waits for the place if a run holds it."""
    argv = [sys.executable, "-m", "testbed", "smoke", "--device", profile, "--place", place]
    if coordinator:
        argv += ["--coordinator", coordinator]
    argv += ["--lock-wait", str(lock_wait), "--report-dir", str(report_dir)]
    if image:
        argv += ["--image", image]
    return argv


def check_place(
    coordinator: str,
    place: PlaceInfo,
    *,
    device: str | None,
    image: str | None,
    report_dir: Path,
    lock_wait: float = 600.0,
    say: object = print,
) -> HealthResult:
    """Run the smoke suite on ``place`` and record the verdict in its tags."""
    profile = device_for(place, device)
    before = set(report_dir.glob("*/*/report.json"))
    argv = smoke_argv(coordinator, place.name, profile, image, report_dir, lock_wait)
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - t0
    runs = [p for p in report_dir.glob("*/*/report.json") if p not in before and p.parent.name != "latest"]
    report_json = max(runs, key=lambda p: p.stat().st_mtime) if runs else None
    report = str(report_json.parent / "report.html") if report_json else ""
    if proc.returncode == EXIT_USAGE:
        # Bad input (a wrong profile or image): the place is not to blame; nothing is marked.
        return HealthResult(
            place.name,
            "not checked",
            _reason(None, proc.returncode, proc.stdout + proc.stderr),
            report,
            proc.returncode,
            seconds,
        )
    good = proc.returncode == EXIT_PASSED
    reason = "" if good else _reason(report_json, proc.returncode, proc.stdout + proc.stderr)
    tags = {HEALTH: "good" if good else "bad", AT: f"{time.time():.0f}", REASON: reason, REPORT: report}
    with Coordinator(coordinator) as coord:
        coord.set_tags(place.name, tags)
    return HealthResult(place.name, tags[HEALTH], reason, report, proc.returncode, seconds)


def reset(coordinator: str, names: list[str]) -> None:
    """Put places back in service: their health is unknown until the next check."""
    with Coordinator(coordinator) as coord:
        for name in names:
            coord.place(name)
            coord.set_tags(name, {HEALTH: "", REASON: "", AT: "", REPORT: ""})


def stale(place: PlaceInfo, every_hours: float, now: float | None = None) -> bool:
    """Whether ``place`` needs a health check before work: never checked, or longer ago than
    ``every_hours`` (a bad place stays out of service until it is reset or checked again)."""
    try:
        at = float(place.tags.get(AT, ""))
    except ValueError:
        return True
    return ((now or time.time()) - at) > every_hours * 3600
