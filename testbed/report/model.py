"""The report model: typed records of one run, turned into report.json (schema 2).

The plugin hands over what happened (:class:`RunInfo`, a :class:`TestRecord` per check with
the events collected while it ran, the boots of every device, the device facts);
:func:`build_report` makes report.json's dict of them. JUnit XML and the HTML page are drawn
from that dict only.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import testbed
from testbed.events import Collector
from testbed.profile import Profile

SCHEMA_VERSION = 2

# Exit codes of a testbed run: CI tells a device failure from a lab fault by these.
EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_USAGE = 4
EXIT_INFRA = 75  # EX_TEMPFAIL: the lab failed, retrying may help

# What a failure or error was, by the exception that ended the check.
KINDS = ("dut", "assertion", "infra", "config", "test")


@dataclass
class TestRecord:
    """One check: its outcome, why, and the events (commands, steps, notes) it collected."""

    nodeid: str
    outcome: str = "passed"  # passed | failed | error | skipped
    duration_s: float = 0.0
    message: str = ""
    kind: str = ""  # for failures and errors: one of KINDS
    collector: Collector = field(default_factory=Collector)
    started: float = 0.0  # time.monotonic() when the check began (its setup)
    recovered: str = ""  # the check ran on a device restored after a lab fault: what was done
    # The verdict came from another mode's run of the same certification (testbed.plan): its
    # mode, report.json (relative to this run's directory) and run id; its evidence is there.
    inherited: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "outcome": self.outcome,
            "duration_s": round(self.duration_s, 3),
            "message": self.message,
            "kind": self.kind,
            "recovered": self.recovered,
            "inherited": self.inherited,
            "evidence": [event.as_dict() for event in self.collector.snapshot()],
        }


@dataclass
class RunInfo:
    """What identifies a run: the device, the run, the image."""

    device: str
    run_id: str
    started: str
    image_path: str = ""
    image_sha256: str = ""
    image_format: str = "raw"


def overall_result(tests: list[TestRecord]) -> str:
    """failed: the device failed a check (or a check is broken); error: the lab or the input
    stood in the way; passed otherwise."""
    if any(t.outcome == "failed" or (t.outcome == "error" and t.kind == "test") for t in tests):
        return "failed"
    if any(t.outcome == "error" for t in tests):
        return "error"
    return "passed"


def exit_code(tests: list[TestRecord]) -> int:
    """4 when an input was wrong (fix it, retrying will not help), else 1 when the device failed
    a check or a check is broken, else 75 when the lab failed (retry), else 0."""
    if any(t.outcome == "error" and t.kind == "config" for t in tests):
        return EXIT_USAGE
    return {"failed": EXIT_FAILED, "error": EXIT_INFRA, "passed": EXIT_PASSED}[overall_result(tests)]


def counts(tests: list[TestRecord]) -> dict[str, int]:
    out = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for t in tests:
        out[t.outcome] = out.get(t.outcome, 0) + 1
    return out


def image_facts(path: Path, profile: Profile) -> dict[str, Any]:
    """What the image under test holds, read offline (``testbed.inspect``: partitions, os-release
    and kernels of each root, the active root, fingerprints, problems), for the report's facts;
    {} where it cannot be read (the checks say why)."""
    from testbed.errors import ConfigError, InfraError
    from testbed.inspect import inspect_image

    try:
        return inspect_image(path, profile).facts()
    except (ConfigError, InfraError):
        return {}


def build_report(
    run: RunInfo, tests: list[TestRecord], boots: list[dict[str, Any]], facts: dict[str, Any]
) -> dict[str, Any]:
    """report.json's content. ``boots`` are the boot records of every device of the run
    (``BootRecord.as_dict()``); ``boot_to_ssh_s`` is the first cold boot of the run's own device."""
    cold = next(
        (b for b in boots if b.get("kind") == "cold" and b.get("device") == run.device and b.get("ssh_ready_s")), None
    )
    return {
        "schema": SCHEMA_VERSION,
        "device": run.device,
        "run_id": run.run_id,
        "image": {"path": run.image_path, "sha256": run.image_sha256, "format": run.image_format},
        "started": run.started,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "result": overall_result(tests),
        "counts": counts(tests),
        "facts": facts,
        "timings": {"boot_to_ssh_s": cold["ssh_ready_s"] if cold else None, "boots": boots},
        "tests": [t.as_dict() for t in tests],
        "testbed": {"version": testbed.__version__, "host": socket.gethostname()},
    }
