"""A certification plan: what each mode's run does itself and what it takes from another.

Checks marked ``mode_independent`` (the offline layout, the update suite, the fingerprint, the
filesystem checks, os-release: nothing a mode changes) run in a certification's first mode only.
Each later mode's run is given the first run's report.json (``--inherit REPORT``): its own report
lists those checks with the first run's outcome and message, marked as inherited with a link to
the report that holds their evidence, so that every mode's report stays complete on its own.
A check the first run did not run (deselected there) runs here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import ConfigError

MARKER = "mode_independent"
MARKER_HELP = f"{MARKER}: the check's verdict is the same in every mode; a certification runs it once (testbed.plan)"


@dataclass(frozen=True)
class Inherited:
    """A check's verdict taken from another run of the same certification."""

    nodeid: str
    outcome: str
    message: str
    kind: str
    duration_s: float
    mode: str  # the mode of the run it comes from
    source: str  # that run's report.json
    run_id: str

    def as_dict(self, report: str) -> dict[str, str]:
        """For this run's report.json: ``report`` is the source as this run's report reaches it."""
        return {"mode": self.mode, "report": report, "run_id": self.run_id}


def load_source(path: Path) -> dict[str, Any]:
    """The report a run inherits from; a ConfigError naming the option when it cannot be used."""
    fix = "give the report.json of the certification's first mode"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--inherit {path}: not a readable report.json ({exc}): {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tests"), list) or "run_id" not in data:
        raise ConfigError(f"--inherit {path}: not a testbed report.json (no tests or run_id): {fix}")
    data["_path"] = str(Path(path).resolve())
    return data


def split(items: list[pytest.Item], source: dict[str, Any]) -> tuple[list[pytest.Item], list[Inherited]]:
    """The items this run runs itself, and the verdicts it takes from ``source`` (same order).

    Taken: a check marked ``mode_independent`` that ``source`` ran itself and that ended with a
    verdict of the image (passed or failed, or skipped); a lab fault or a broken check there
    (an error) is run again here, where the lab may be well.
    """
    by_id = {t.get("nodeid"): t for t in source["tests"] if isinstance(t, dict)}
    mode = str(source.get("facts", {}).get("mode") or "first")
    keep: list[pytest.Item] = []
    taken: list[Inherited] = []
    for item in items:
        other = by_id.get(item.nodeid)
        usable = (
            other is not None and not other.get("inherited") and other.get("outcome") in ("passed", "failed", "skipped")
        )
        if item.get_closest_marker(MARKER) is None or not usable:
            keep.append(item)
            continue
        assert other is not None
        taken.append(
            Inherited(
                nodeid=item.nodeid, outcome=str(other["outcome"]), message=str(other.get("message", "")),
                kind=str(other.get("kind", "")), duration_s=float(other.get("duration_s", 0.0)), mode=mode,
                source=str(source["_path"]), run_id=str(source.get("run_id", "")),
            )
        )  # fmt: skip
    return keep, taken
