"""Soak: the smoke suite and the OS suites (every suite but hup) run N times in a row on one
image, modes alternating, each run a fresh pytest process; prints one line per run and the
tally. Exit 0 only if every run passed with no failure and no error.

    python benchmarks/soak.py [--runs 10] [--image PATH] [--device NAME] [--keep DIR]

A run's checks are counted from its report.json (what a CI reader would see), and the run's exit
code must agree with them. Reports of failed runs are kept under --keep (default: a directory
in the current one, named in the output) for reading afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OS_SUITES = ["suites", "--ignore", "suites/hup"]  # smoke included


def one_run(index: int, mode: str, args: argparse.Namespace, work: Path) -> tuple[int, Counter[str], float, Path]:
    reports = work / f"run{index:02d}-{mode}"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *OS_SUITES, "--mode", mode,
               "--device", args.device, "--report-dir", str(reports)]  # fmt: skip
    if args.image:
        command += ["--image", args.image]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    took = time.monotonic() - started
    tally: Counter[str] = Counter()
    latest = next(reports.glob("*/latest"), None)
    if latest is not None:
        report = json.loads((latest / "report.json").read_text())
        tally.update(t["outcome"] for t in report["tests"])
    else:
        tally["no report"] += 1
        (reports / "pytest-output.txt").parent.mkdir(parents=True, exist_ok=True)
        (reports / "pytest-output.txt").write_text(done.stdout + done.stderr)
    return done.returncode, tally, took, reports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--image", default="")
    ap.add_argument("--device", default="qemu-x86_64")
    ap.add_argument("--keep", type=Path, default=None, help="where the reports of failed runs are kept")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    keep = args.keep or Path.cwd() / f"soak-{time.strftime('%Y%m%dT%H%M%S')}"
    work = Path(tempfile.mkdtemp(prefix="testbed-soak-"))
    total: Counter[str] = Counter()
    bad_runs = 0
    started = time.monotonic()
    try:
        for i in range(args.runs):
            mode = ("development", "production")[i % 2]
            code, tally, took, reports = one_run(i, mode, args, work)
            total.update(tally)
            broken = code != 0 or any(k != "passed" for k in tally)
            if broken:
                bad_runs += 1
                shutil.copytree(reports, keep / reports.name)
            counts = ", ".join(f"{n} {k}" for k, n in sorted(tally.items()))
            print(f"run {i + 1:2d}/{args.runs} {mode:11s} exit {code}  {counts}  {took:6.1f} s"
                  + (f"  (reports kept in {keep / reports.name})" if broken else ""), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    counts = ", ".join(f"{n} {k}" for k, n in sorted(total.items()))
    print(f"soak: {args.runs} runs in {minutes:.1f} min: {counts}; runs not clean: {bad_runs}")
    return 0 if bad_runs == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
