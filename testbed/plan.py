"""A certification plan: what each mode's run does itself and what it takes from another.

Checks marked ``mode_independent`` (the offline layout, the update suite, the fingerprint, the
filesystem checks, os-release: nothing a mode changes) run in a certification's first mode only.
Each later mode's run is given the first run's report.json (``--inherit REPORT``): its own report
lists those checks with the first run's outcome and message, marked as inherited with a link to
the report that holds their evidence, so that every mode's report stays complete on its own.
A check the first run did not run (deselected there) runs here.

``certify`` runs the modes side by side (the host's boot budget allowing): the later modes start
with the first, given ``--inherit FIRST/report.json --inherit-wait``. Such a run runs its
mode-dependent checks first, then waits for the first run to end, and only then reads its report:
the first run's report directory is locked (``flock``) by certify before the first run starts, and
that lock is held by the first run's process for its whole life, so the kernel frees it when the
process ends, however it ends. A check the first run gave no verdict for (a lab fault, no report)
runs in the later run then, as it would have in a run one after the other.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import ConfigError

MARKER = "mode_independent"
# How long a later mode's run waits at most for the first mode's run beside it to end
# (``TESTBED_INHERIT_WAIT`` seconds); past it the checks run here.
WAIT_FOR_FIRST_S = 4 * 3600.0
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
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


def new_run_id(now: datetime) -> str:
    """A run's directory name: its UTC start and 4 hex digits (``20261204T201500Z-3fa2``)."""
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def hold_run(directory: Path) -> int:
    """Certify's side: make the first run's report directory and lock it; the returned descriptor is
    handed to the first run's process (``pass_fds``), which then holds the lock until it ends."""
    directory.mkdir(parents=True, exist_ok=False)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def wait_timeout() -> float:
    given = os.environ.get("TESTBED_INHERIT_WAIT", "").strip()
    try:
        return float(given) if given else WAIT_FOR_FIRST_S
    except ValueError:
        raise ConfigError(f"TESTBED_INHERIT_WAIT={given!r}: give seconds (how long a later mode waits for the first)") from None


def wait_for_run(directory: Path, timeout: float) -> bool:
    """The later run's side: block until the first run's process has let go of ``directory``'s lock
    (it ended), at most ``timeout`` seconds. False: it did not end in time (or never locked it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    done = threading.Event()

    def take() -> None:
        fcntl.flock(fd, fcntl.LOCK_SH)  # blocks while the first run holds LOCK_EX
        done.set()

    # A thread, so that the wait has a deadline; one that times out stays blocked until this
    # process ends (it holds nothing but the descriptor).
    threading.Thread(target=take, name="inherit-wait", daemon=True).start()
    if done.wait(timeout):
        os.close(fd)
        return True
    return False
