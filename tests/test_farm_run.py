"""A farm night's plan and verdicts: the job matrix, the retry rule, the exit code, the summary page,
and when a place needs a health check. (The farm on a real coordinator: tests/test_farm.py.)"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from testbed.budget import cpu_budget
from testbed.farm.coordinator import PlaceInfo
from testbed.farm.health import stale
from testbed.farm.keeper import candidates, lease_expired
from testbed.farm.run import Attempt, FarmRun, load_farm
from testbed.report import EXIT_FAILED, EXIT_INFRA, EXIT_PASSED, EXIT_USAGE

REPO = Path(__file__).resolve().parent.parent


def _farm(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "farm.yaml"
    path.write_text(text)
    return path


def test_the_matrix_is_images_by_devices_by_modes(tmp_path: Path) -> None:
    spec = load_farm(REPO / "examples" / "farm.yaml")
    run = FarmRun(spec, REPO / "examples" / "farm.yaml", "127.0.0.1:1", say=lambda *_: None)
    labels = [job.label for job in run.jobs]
    assert len(labels) == 4
    assert labels[0] == "reference: qemu-x86_64 development [smoke,layout]"
    assert "reference: virtual-board@tags:board=virtual production [smoke,layout]" in labels
    board = next(j for j in run.jobs if j.is_board)
    argv = run.argv(board, tmp_path)
    assert argv[argv.index("--place") + 1] == "tags:board=virtual"
    assert argv[argv.index("--coordinator") + 1] == "127.0.0.1:1"
    board.avoid.append("virtual-1")
    assert run.argv(board, tmp_path)[-2:] == ["--avoid-place", "virtual-1"]


def test_the_dry_run_prints_each_jobs_pytest_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "testbed", "farm", "run", str(REPO / "examples" / "farm.yaml"), "--dry-run"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    commands = [line for line in out.splitlines() if line.startswith("-m pytest ")]
    assert len(commands) == 4 and all("--mode" in c for c in commands)


def test_the_exit_code_covers_every_jobs_last_attempt(tmp_path: Path) -> None:
    spec = load_farm(_farm(tmp_path, "jobs:\n  - {name: a, devices: [qemu-x86_64, qemu-x86_64]}\n"))
    run = FarmRun(spec, tmp_path / "farm.yaml", None, say=lambda *_: None)
    first, second = run.jobs

    def attempt(code: int) -> Attempt:
        return Attempt(1, code, "x", 1.0, "", None)

    for a, b, expected in (
        (EXIT_PASSED, EXIT_PASSED, EXIT_PASSED),
        (EXIT_PASSED, EXIT_INFRA, EXIT_INFRA),
        (EXIT_INFRA, EXIT_FAILED, EXIT_FAILED),
        (EXIT_FAILED, EXIT_USAGE, EXIT_USAGE),
    ):
        first.attempts, second.attempts = [attempt(a)], [attempt(b)]
        assert run.exit_code() == expected
    # A lab fault that passed on its retry counts as passed.
    first.attempts, second.attempts = [attempt(EXIT_INFRA), attempt(EXIT_PASSED)], [attempt(EXIT_PASSED)]
    assert run.exit_code() == EXIT_PASSED


def test_a_device_failure_is_never_retried_and_a_lab_fault_once(tmp_path: Path, monkeypatch) -> None:
    spec = load_farm(
        _farm(
            tmp_path,
            "retries: 1\njobs:\n  - {name: a, devices: [{profile: virtual-board, place: 'tags:board=virtual'}]}\n",
        )
    )
    run = FarmRun(spec, tmp_path / "farm.yaml", "127.0.0.1:1", say=lambda *_: None)
    (job,) = run.jobs
    codes = iter([EXIT_INFRA, EXIT_INFRA, EXIT_INFRA])
    places = iter(["virtual-1", "virtual-2", "virtual-1"])
    monkeypatch.setattr(
        run,
        "run_attempt",
        lambda j: Attempt(len(j.attempts) + 1, next(codes), "lab fault", 1.0, "", next(places), "console lost"),
    )
    run.run_job(job)
    assert [a.exit_code for a in job.attempts] == [EXIT_INFRA, EXIT_INFRA]
    assert job.attempts[0].retried_because == "lab fault on virtual-1: console lost"
    assert job.avoid == ["virtual-1"]
    job.attempts, job.avoid = [], []
    monkeypatch.setattr(run, "run_attempt", lambda j: Attempt(1, EXIT_FAILED, "failed", 1.0, "", "virtual-1"))
    run.run_job(job)
    assert len(job.attempts) == 1 and not job.attempts[0].retried_because


def test_the_summary_page_shows_every_attempt_and_why_it_was_retried(tmp_path: Path) -> None:
    spec = load_farm(
        _farm(tmp_path, f"report_dir: {tmp_path / 'night'}\njobs:\n  - {{name: a, devices: [qemu-x86_64]}}\n")
    )
    run = FarmRun(spec, tmp_path / "farm.yaml", None, say=lambda *_: None)
    (job,) = run.jobs
    job.attempts = [
        Attempt(
            1,
            EXIT_INFRA,
            "lab fault",
            12.0,
            "",
            "virtual-1",
            "serial console lost",
            "lab fault on virtual-1: serial console lost",
        ),
        Attempt(2, EXIT_PASSED, "passed", 40.0, "", "virtual-2"),
    ]
    html = run.write_summary().read_text()
    assert "retried:</b> lab fault on virtual-1: serial console lost" in html
    assert "virtual-2" in html and "CPU budget" in html
    assert (tmp_path / "night" / "summary.json").exists()


def test_the_cpu_budget_is_one_tcg_guest_per_core() -> None:
    assert cpu_budget(2) == 2 and cpu_budget(1) == 1
    assert cpu_budget(8, kvm=True, guest_cpus=2) == 4


def _place(name: str, **tags: str) -> PlaceInfo:
    return PlaceInfo(name=name, tags=dict(tags), acquired=None, matches=[])


def test_requests_by_tags_skip_bad_places_and_avoid_a_retrys_place() -> None:
    places = {
        p.name: p
        for p in (_place("a", board="x", testbed_health="bad"), _place("b", board="x"), _place("c", board="x"))
    }
    assert [p.name for p in candidates(places, None, {"board": "x"}, "c")] == ["b", "c"]
    assert [p.name for p in candidates(places, None, {"board": "x"}, "c", avoid=("b",))] == ["c"]
    assert [p.name for p in candidates(places, None, {"board": "x"}, "c", avoid=("b", "c"))] == ["b", "c"]
    # Named outright, a bad place is taken (a health check of it, a person at a sick board).
    assert [p.name for p in candidates(places, "a", {}, "c")] == ["a"]


def test_a_lease_expires_only_for_the_holder_it_names() -> None:
    now = time.time()
    place = _place("a", testbed_holder="h/u-testbed-1", testbed_lease=f"{now - 1:.0f}")
    place.acquired = "h/u-testbed-1"
    assert lease_expired(place, now)
    place.acquired = "h/someone"  # a labgrid user holds it now: never broken
    assert not lease_expired(place, now)
    place.acquired, place.tags["testbed_lease"] = "h/u-testbed-1", f"{now + 30:.0f}"
    assert not lease_expired(place, now)


def test_a_place_needs_a_health_check_when_never_checked_or_long_ago() -> None:
    now = time.time()
    assert stale(_place("a"), 24, now)
    assert not stale(_place("a", testbed_health_at=f"{now - 3600:.0f}"), 24, now)
    assert stale(_place("a", testbed_health_at=f"{now - 25 * 3600:.0f}"), 24, now)


def test_a_testbed_holder_without_its_lease_expires_once_the_place_is_quiet_for_a_lease() -> None:
    """Its keeper died between acquiring and the first heartbeat (or while letting go): the tags
    name no one or another holder. A labgrid user's lock (no testbed holder name) never expires."""
    now = time.time()
    place = _place("a", testbed_holder="h/u-testbed-1", testbed_lease=f"{now + 300:.0f}")
    place.acquired = "h/u-testbed-2"
    place.changed = now - 5
    assert not lease_expired(place, now)
    place.changed = now - 100
    assert lease_expired(place, now)
    place.acquired = "h/alice"
    assert not lease_expired(place, now)
