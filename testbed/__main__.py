"""``python -m testbed certify``: certify an image on a device in each mode, one report per mode.

Runs the suites with pytest once per mode (development, then production), each in its own
process and report directory, then prints one verdict line per mode. Exit code: 0 when
every mode passed, 1 when the device failed a check in any mode, 75 when only lab faults
stood in the way, 4 for bad input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from testbed.report import EXIT_FAILED, EXIT_INFRA, EXIT_PASSED, EXIT_USAGE

SUITES = Path(__file__).resolve().parent.parent / "suites"


def _latest_report(report_dir: Path, before: set[Path]) -> Path | None:
    runs = [p for p in report_dir.glob("*/*/report.json") if p not in before and p.parent.name != "latest"]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def certify(args: argparse.Namespace, extra: list[str]) -> int:
    report_dir = Path(args.report_dir)
    codes = []
    lines = []
    for mode in args.modes.split(","):
        before = set(report_dir.glob("*/*/report.json"))
        argv = [sys.executable, "-m", "pytest", str(SUITES), "-p", "no:cacheprovider", "--mode", mode]
        argv += ["--device", args.device, "--report-dir", str(report_dir)]
        if args.image:
            argv += ["--image", args.image]
        print(f"==> certify {args.device} in {mode} mode: {' '.join(argv[3:])}", flush=True)
        code = subprocess.call(argv + extra)
        codes.append(code)
        report = _latest_report(report_dir, before)
        if report is not None:
            data = json.loads(report.read_text())
            c = data["counts"]
            lines.append(
                f"{mode:12} {data['result'].upper():7} {c['passed']} passed, {c['failed']} failed, "
                f"{c['error']} infra errors  {report.parent / 'report.html'}"
            )
        else:
            lines.append(f"{mode:12} no report (exit {code})")
        if code == EXIT_USAGE:
            break
    print("\n".join(["", f"certification of {args.device}:", *lines]))
    if EXIT_USAGE in codes:
        return EXIT_USAGE
    if any(c not in (EXIT_PASSED, EXIT_INFRA) for c in codes):
        return EXIT_FAILED
    return EXIT_INFRA if EXIT_INFRA in codes else EXIT_PASSED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("certify", help="run the suites in each mode and write one report per mode")
    c.add_argument("--device", default="qemu-x86_64")
    c.add_argument("--image", default=None, help="default: the reference image, built on demand")
    c.add_argument("--modes", default="development,production")
    c.add_argument("--report-dir", default="reports")
    args, extra = parser.parse_known_args(argv)
    return certify(args, extra)


if __name__ == "__main__":
    sys.exit(main())
