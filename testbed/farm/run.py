"""A farm night: ``python -m testbed farm run FARM.yaml``.

FARM.yaml names a job matrix: images x devices x modes (x suites), e.g.::

    coordinator: 127.0.0.1:20408        # default: LG_COORDINATOR
    report_dir: reports/farm            # each job's report, and summary.html
    retries: 1                          # a lab fault is retried this many times
    health: {every_hours: 24}           # places checked longer ago are checked first
    jobs:
      - name: reference
        images: [reference]             # "reference": the built-in reference image
        devices:
          - qemu-x86_64                 # a profile: a QEMU device on this host
          - {profile: virtual-board, place: "tags:board=virtual"}   # a place of the farm
        modes: [development, production]
        suites: [smoke]

Each (image, device, mode, suites) is one job: one pytest run with its normal report
(``report_dir/<job>/attempt-<n>/...``). Jobs run side by side up to the CPU budget for
QEMU devices on this host and the free places for boards (a board job queues for its
place through the lease: ``--lock-wait``). A job that ended in a lab fault (exit 75: QEMU
died, the console was lost, the PDU was silent, the place was lost) is retried, on
another place where the device is given by tags and the farm has one; a device failure
(exit 1) is never retried. Before a place gets work, a place whose last health check is
older than ``health.every_hours`` is checked (``testbed.farm.health``); a bad place is
skipped by requests by tags.

The exit code covers every job: 4 if any job had bad input, else 1 if any device failed,
else 75 if lab faults remained after the retries, else 0.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from testbed.budget import cpu_budget
from testbed.errors import ConfigError
from testbed.report import EXIT_FAILED, EXIT_INFRA, EXIT_PASSED, EXIT_USAGE

SUITES = Path(__file__).resolve().parent.parent.parent / "suites"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceSpec(_Strict):
    profile: str
    place: str | None = None


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    images: list[str] = ["reference"]
    devices: list[str | DeviceSpec]
    modes: list[str] = ["development"]
    suites: list[str] = ["smoke"]
    lock_wait: float = Field(1800.0, ge=0)


class HealthSpec(_Strict):
    every_hours: float | None = Field(None, gt=0, description="default: each profile's health.every_hours")
    device: str | None = None


class FarmSpec(_Strict):
    coordinator: str | None = None
    report_dir: str = "reports/farm"
    retries: int = Field(1, ge=0, le=5)
    qemu_parallel: int | None = Field(None, ge=1)
    health: HealthSpec = HealthSpec()
    jobs: list[JobSpec] = Field(min_length=1)


def load_farm(path: Path) -> FarmSpec:
    """FARM.yaml, checked: ConfigError naming the file, the field and the fix."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"farm file not found: {path} (python -m testbed farm run FARM.yaml)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    try:
        spec = FarmSpec.model_validate(data or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{path}: bad value for '{where}': {err['msg']}; fix it in the farm file") from None
    for job in spec.jobs:
        for mode in job.modes:
            if mode not in ("development", "production"):
                raise ConfigError(f"{path}: job {job.name}: mode '{mode}' is not development or production")
        for suite in job.suites:
            if not (SUITES / suite).is_dir():
                known = ", ".join(sorted(p.name for p in SUITES.iterdir() if p.is_dir() and not p.name.startswith("_")))
                raise ConfigError(f"{path}: job {job.name}: unknown suite '{suite}' (suites: {known})")
    return spec


@dataclass
class Attempt:
    number: int
    exit_code: int
    verdict: str
    seconds: float
    report: str
    place: str | None
    reason: str = ""
    retried_because: str = ""


@dataclass
class Job:
    name: str
    image: str
    profile: str
    place: str | None
    mode: str
    suites: list[str]
    lock_wait: float
    attempts: list[Attempt] = field(default_factory=list)
    avoid: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        where = f"@{self.place}" if self.place else ""
        image = "" if self.image == "reference" else f" {Path(self.image).name}"
        return f"{self.name}: {self.profile}{where} {self.mode}{image} [{','.join(self.suites)}]"

    @property
    def slug(self) -> str:
        raw = f"{self.name}-{self.profile}-{self.mode}-{'+'.join(self.suites)}"
        if self.image != "reference":
            raw += f"-{Path(self.image).stem}"
        return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in raw)

    @property
    def is_board(self) -> bool:
        return self.place is not None


def expand(spec: FarmSpec) -> list[Job]:
    jobs: list[Job] = []
    for js in spec.jobs:
        for image in js.images:
            for device in js.devices:
                d = DeviceSpec(profile=device) if isinstance(device, str) else device
                for mode in js.modes:
                    jobs.append(Job(js.name, image, d.profile, d.place, mode, list(js.suites), js.lock_wait))
    return jobs


def _first_problem(report: dict[str, Any]) -> str:
    for test in report.get("tests", []):
        if test.get("outcome") in ("failed", "error"):
            lines = (test.get("message") or "").strip().splitlines()
            return f"{test['nodeid'].split('::')[-1]}: {lines[0] if lines else test['outcome']}"[:300]
    return ""


class FarmRun:
    def __init__(self, spec: FarmSpec, source: Path, coordinator: str | None, say: Any = print) -> None:
        self.spec = spec
        self.source = source
        self.coordinator = coordinator
        self.report_dir = Path(spec.report_dir)
        self.say = say
        self.jobs = expand(spec)
        self.qemu_slots = threading.Semaphore(spec.qemu_parallel or cpu_budget())
        self.budget = spec.qemu_parallel or cpu_budget()
        self.started = time.time()
        self.health_checks: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    # -- health before work ---------------------------------------------------------------
    def check_health(self) -> None:
        if self.coordinator is None or not any(j.is_board for j in self.jobs):
            return
        from testbed.farm.coordinator import Coordinator
        from testbed.farm.health import check_place, stale
        from testbed.farm.keeper import candidates, parse_tags

        with Coordinator(self.coordinator) as coord:
            places = coord.places()
        wanted: dict[str, str] = {}
        for job in self.jobs:
            if job.place is None:
                continue
            if job.place.startswith("tags:"):
                try:
                    chosen = candidates(places, None, parse_tags(job.place[5:]), self.coordinator)
                except Exception:  # noqa: BLE001 - the job itself reports it
                    continue
            else:
                chosen = [places[job.place]] if job.place in places else []
            for place in chosen:
                wanted.setdefault(place.name, self.spec.health.device or job.profile)
        from testbed.profile import load_profile

        for name, device in sorted(wanted.items()):
            place = places[name]
            health = load_profile(device).health
            every = self.spec.health.every_hours or health.every_hours
            if place.tags.get("testbed_health") == "bad" or not stale(place, every):
                continue
            self.say(f"farm: health check of place {name} (last: {place.tags.get('testbed_health_at') or 'never'})")
            result = check_place(
                self.coordinator, place, device=device, image=health.image, report_dir=self.report_dir / "health"
            )
            self.health_checks.append(result.__dict__)
            self.say(f"farm: place {name} is {result.verdict}" + (f": {result.reason}" if result.reason else ""))

    # -- jobs -----------------------------------------------------------------------------
    def argv(self, job: Job, report_dir: Path) -> list[str]:
        argv = [sys.executable, "-m", "pytest", *[str(SUITES / s) for s in job.suites], "-p", "no:cacheprovider", "-q"]
        argv += ["--device", job.profile, "--mode", job.mode, "--report-dir", str(report_dir)]
        if job.image != "reference":
            argv += ["--image", job.image]
        if job.place is not None:
            argv += ["--place", job.place, "--lock-wait", str(job.lock_wait)]
            if self.coordinator:
                argv += ["--coordinator", self.coordinator]
            if job.avoid:
                argv += ["--avoid-place", ",".join(job.avoid)]
        return argv

    def run_attempt(self, job: Job) -> Attempt:
        number = len(job.attempts) + 1
        report_dir = self.report_dir / job.slug / f"attempt-{number}"
        report_dir.mkdir(parents=True, exist_ok=True)
        argv = self.argv(job, report_dir)
        t0 = time.monotonic()
        slot = None if job.is_board else self.qemu_slots
        if slot is not None:
            slot.acquire()
        try:
            with open(report_dir / "pytest.log", "wb") as log:
                code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)
        finally:
            if slot is not None:
                slot.release()
        seconds = time.monotonic() - t0
        reports = sorted(report_dir.glob("*/*/report.json"), key=lambda p: p.stat().st_mtime)
        report: dict[str, Any] = json.loads(reports[-1].read_text()) if reports else {}
        facts = report.get("facts", report.get("device_facts", {})) or {}
        verdict = {EXIT_PASSED: "passed", EXIT_FAILED: "failed", EXIT_INFRA: "lab fault", EXIT_USAGE: "bad input"}.get(
            code, f"exit {code}"
        )
        reason = _first_problem(report) if report else ""
        if not reason and code != EXIT_PASSED:
            tail = (report_dir / "pytest.log").read_text(errors="replace").strip().splitlines()
            reason = next(
                (line for line in reversed(tail) if "testbed:" in line or "Error" in line), tail[-1] if tail else ""
            )[:300]
        return Attempt(
            number=number,
            exit_code=code,
            verdict=verdict,
            seconds=round(seconds, 1),
            report=str(reports[-1].parent / "report.html") if reports else str(report_dir / "pytest.log"),
            place=facts.get("place"),
            reason=reason,
        )

    def run_job(self, job: Job) -> None:
        while True:
            attempt = self.run_attempt(job)
            with self._lock:
                job.attempts.append(attempt)
            where = f" on {attempt.place}" if attempt.place else ""
            self.say(f"farm: {job.label}: attempt {attempt.number}{where}: {attempt.verdict} ({attempt.seconds:.0f}s)")
            if attempt.exit_code != EXIT_INFRA or len(job.attempts) > self.spec.retries:
                return
            attempt.retried_because = f"lab fault{where}: {attempt.reason}" if attempt.reason else f"lab fault{where}"
            if attempt.place and job.place and job.place.startswith("tags:"):
                job.avoid.append(attempt.place)  # the retry goes to another place where there is one
            self.say(f"farm: {job.label}: retrying ({attempt.retried_because})")

    def run(self) -> int:
        self.check_health()
        self.say(
            f"farm: {len(self.jobs)} jobs; QEMU devices {self.budget} at a time (CPU budget), boards as places free up"
        )
        threads = [threading.Thread(target=self.run_job, args=(job,), name=job.slug) for job in self.jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        summary = self.write_summary()
        self.say(f"farm: summary {summary}")
        return self.exit_code()

    def exit_code(self) -> int:
        finals = [job.attempts[-1].exit_code for job in self.jobs if job.attempts]
        if EXIT_USAGE in finals:
            return EXIT_USAGE
        if any(c not in (EXIT_PASSED, EXIT_INFRA) for c in finals):
            return EXIT_FAILED
        return EXIT_INFRA if EXIT_INFRA in finals else EXIT_PASSED

    def summary_data(self) -> dict[str, Any]:
        return {
            "farm": str(self.source),
            "coordinator": self.coordinator,
            "started": self.started,
            "seconds": round(time.time() - self.started, 1),
            "qemu_budget": self.budget,
            "host_cores": os.cpu_count(),
            "retries": self.spec.retries,
            "exit_code": self.exit_code(),
            "health_checks": self.health_checks,
            "jobs": [
                {
                    "label": job.label,
                    "name": job.name,
                    "image": job.image,
                    "device": job.profile,
                    "place": job.place,
                    "mode": job.mode,
                    "suites": job.suites,
                    "verdict": job.attempts[-1].verdict if job.attempts else "not run",
                    "attempts": [a.__dict__ for a in job.attempts],
                }
                for job in self.jobs
            ],
        }

    def write_summary(self) -> Path:
        from testbed.report.farm import render_farm_summary

        self.report_dir.mkdir(parents=True, exist_ok=True)
        data = self.summary_data()
        (self.report_dir / "summary.json").write_text(json.dumps(data, indent=2))
        out = self.report_dir / "summary.html"
        render_farm_summary(data, out)
        return out


def main(path: Path, coordinator: str | None, say: Any = print, *, dry_run: bool = False) -> int:
    spec = load_farm(path)
    address = coordinator or spec.coordinator or os.environ.get("LG_COORDINATOR") or None
    if (
        address is None
        and not dry_run
        and any(isinstance(d, DeviceSpec) and d.place for j in spec.jobs for d in j.devices)
    ):
        raise ConfigError(
            f"{path}: jobs name labgrid places but no coordinator is given: set coordinator: in the farm file, "
            "LG_COORDINATOR, or --coordinator"
        )
    run = FarmRun(spec, path, address, say)
    if dry_run:
        for job in run.jobs:
            say(f"# {job.label}")
            say(shlex.join(run.argv(job, run.report_dir / job.slug / "attempt-1")[1:]))
        return EXIT_PASSED
    return run.run()
