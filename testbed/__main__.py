"""``python -m testbed certify|smoke|console|inspect|farm``: certify an image on a device, smoke-test a board
on the desk, get a shell on a device, see what an image holds without booting it, or drive a labgrid
farm (``testbed.farm.cli``).

``certify`` runs the suites with pytest once per mode (development, then production),
each in its own process and report directory, then prints one verdict line per mode. The
checks that do not depend on the mode (marked ``mode_independent``: layout, the update suite,
os-release, the fingerprint and the filesystem checks) run in the first mode only; the later
modes' reports inherit their verdicts with a link to the evidence (``--inherit``, testbed.plan).
``--full`` runs everything in every mode.
Exit code: 0 when every mode passed, 1 when the device failed a check in any mode, 75
when only lab faults stood in the way, 4 for bad input.

``smoke`` runs ``suites/smoke`` on one device, with a board's ports given on the command
line (``--serial``, ``--relay``, ``--flash-to``, ``--ssh-host``) instead of edited into
the profile, prints the boot stages as they happen and ends with a short verdict. Same
exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from testbed import desk, inspect
from testbed.errors import ConfigError, InfraError
from testbed.farm import cli as farm_cli
from testbed.report import EXIT_FAILED, EXIT_INFRA, EXIT_PASSED, EXIT_USAGE

SUITES = Path(__file__).resolve().parent.parent / "suites"


def _latest_report(report_dir: Path, before: set[Path]) -> Path | None:
    runs = [p for p in report_dir.glob("*/*/report.json") if p not in before and p.parent.name != "latest"]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _pytest_options(extra: list[str]) -> list[str]:
    """What goes to pytest: the options testbed did not take, a leading ``--`` dropped."""
    return extra[1:] if extra and extra[0] == "--" else extra


def certify(args: argparse.Namespace, extra: list[str]) -> int:
    report_dir = Path(args.report_dir)
    codes = []
    lines = []
    extra = _pytest_options(extra)
    first: Path | None = None  # the first mode's report: the later modes inherit its mode-independent checks
    for mode in args.modes.split(","):
        before = set(report_dir.glob("*/*/report.json"))
        argv = [sys.executable, "-m", "pytest", str(SUITES), "-p", "no:cacheprovider", "--mode", mode]
        argv += ["--device", args.device, "--report-dir", str(report_dir)]
        if args.image:
            argv += ["--image", args.image]
        if not args.cold:
            argv += ["--warm"]
        if "-q" not in extra and "--quiet" not in extra:
            argv += ["--progress", "--boot-stages"]  # -q: pytest's own dots only
        if args.dry_run:
            print(shlex.join(argv[1:] + extra))
            if mode != args.modes.split(",")[0] and not args.full:
                print(
                    f"# and --inherit <the first mode's report.json>: {mode} takes the mode-independent checks from it"
                )
            continue
        if first is not None and not args.full:
            argv += ["--inherit", str(first)]
        print(f"==> certify {args.device} in {mode} mode: {' '.join(argv[3:])}", flush=True)
        code = subprocess.call(argv + extra)
        codes.append(code)
        report = _latest_report(report_dir, before)
        if report is not None:
            data = json.loads(report.read_text())
            c = data["counts"]
            inherited = sum(1 for t in data["tests"] if t.get("inherited"))
            lines.append(
                f"{mode:12} {data['result'].upper():7} {c['passed']} passed, {c['failed']} failed, "
                f"{c['error']} infra errors"
                + (f" ({inherited} inherited)" if inherited else "")
                + f"  {report.parent / 'report.html'}"
            )
            if first is None and code != EXIT_USAGE:
                first = report
        else:
            lines.append(f"{mode:12} no report (exit {code})")
        if code == EXIT_USAGE:
            break
    if args.dry_run:
        return EXIT_PASSED
    print("\n".join(["", f"certification of {args.device}:", *lines]))
    if EXIT_USAGE in codes:
        return EXIT_USAGE
    if any(c not in (EXIT_PASSED, EXIT_INFRA) for c in codes):
        return EXIT_FAILED
    return EXIT_INFRA if EXIT_INFRA in codes else EXIT_PASSED


def smoke(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the smoke suite on one device, boot stages live, then a one-paragraph verdict."""
    report_dir = Path(args.report_dir)
    before = set(report_dir.glob("*/*/report.json"))
    # -s: pytest's output capture would hold the boot stages back until a test ends.
    argv = [sys.executable, "-m", "pytest", str(SUITES / "smoke"), "-p", "no:cacheprovider", "-q", "-s"]
    argv += ["--boot-stages"]
    argv += ["--device", args.device, "--report-dir", str(report_dir)]
    for option in ("image", "mode", "serial", "relay", "flash_to", "ssh_host", "lock_wait", "place", "coordinator"):
        value = getattr(args, option)
        if value is not None:
            argv += [f"--{option.replace('_', '-')}", str(value)]
    extra = _pytest_options(extra)
    if args.dry_run:
        print(shlex.join(argv[1:] + extra))
        return EXIT_PASSED
    print(f"==> smoke {args.device}: {' '.join(argv[3:] + extra)}", flush=True)
    # Unbuffered, so the boot stages show as they happen even through a pipe.
    code = subprocess.call(argv + extra, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    report = _latest_report(report_dir, before)
    if report is None:
        print(f"\nsmoke {args.device}: no report (pytest exit {code})")
        return code if code else EXIT_INFRA
    data = json.loads(report.read_text())
    c = data["counts"]
    boots = [b for b in data.get("timings", {}).get("boots", []) if b.get("device", data["device"]) == data["device"]]
    cold = next((b for b in boots if b.get("kind") == "cold"), boots[0] if boots else {})
    stages = ", ".join(
        f"{name} {cold[key]:.1f}s"
        for name, key in (
            ("firmware", "firmware_s"),
            ("kernel", "kernel_s"),
            ("login", "login_prompt_s"),
            ("SSH", "ssh_ready_s"),
        )
        if cold.get(key) is not None
    )
    print(f"\nsmoke {args.device}: {data['result'].upper()}")
    print(f"  boot: {stages or 'did not boot'}")
    print(f"  checks: {c['passed']} passed, {c['failed']} failed, {c['error']} infra errors, {c['skipped']} skipped")
    problems: dict[str, list[str]] = {}
    for test in data["tests"]:
        if test["outcome"] in ("failed", "error"):
            first = (test.get("message") or "").strip().splitlines()[:1]
            key = f"{test['outcome'].upper()}: {first[0] if first else '(no message)'}"
            problems.setdefault(key, []).append(test["nodeid"].split("::")[-1])
    for message, names in problems.items():
        print(f"  {message}\n    in {', '.join(names)}")
    print(f"  report: {report.parent / 'report.html'}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("certify", help="run the suites in each mode and write one report per mode")
    c.add_argument("--device", default="qemu-x86_64")
    c.add_argument("--image", default=None, help="default: the reference image, built on demand")
    c.add_argument("--modes", default="development,production")
    c.add_argument("--report-dir", default="reports")
    c.add_argument("--dry-run", action="store_true", help="print the pytest command of each mode, run nothing")
    c.add_argument(
        "--cold",
        action="store_true",
        help="boot every device cold (default: the session's device is restored from a warm device of an "
        "earlier run of the same image, profile, mode and testbed, and one is kept after a cold boot)",
    )
    c.add_argument(
        "--full",
        action="store_true",
        help="run every check in every mode (default: the checks that do not depend on the mode run in the "
        "first mode only, and the later modes' reports inherit their verdicts)",
    )
    sm = sub.add_parser(
        "smoke",
        help="run the smoke suite on one device (a board on the desk), boot stages live",
        description="Run suites/smoke on one device. Board ports given here override the profile for this run; "
        "options after -- go to pytest.",
    )
    sm.add_argument("--device", default="qemu-x86_64", help="profile name or YAML path (e.g. raspberrypi4-64)")
    sm.add_argument("--image", default=None, help="default: the reference image, built on demand")
    sm.add_argument("--mode", choices=["development", "production"], default=None)
    sm.add_argument("--serial", default=None, help="serial console: /dev/ttyUSB0[@115200], rfc2217://host:port, ...")
    sm.add_argument("--relay", default=None, help="power: serial-relay:/dev/ttyUSB1:1, hid-relay:1, manual, ...")
    sm.add_argument("--flash-to", default=None, help="block device to write the image to, usbsdmux:/dev/sgN, or none")
    sm.add_argument("--ssh-host", default=None, help="the board's address HOST[:PORT] (default <hostname>.local)")
    sm.add_argument("--lock-wait", type=float, default=None, help="seconds to wait if another run holds the board")
    sm.add_argument("--place", default=None, help="a labgrid place: NAME or tags:KEY=VALUE,...")
    sm.add_argument("--coordinator", default=None, help="the labgrid coordinator HOST:PORT (default LG_COORDINATOR)")
    sm.add_argument("--report-dir", default="reports")
    sm.add_argument("--dry-run", action="store_true", help="print the pytest command, run nothing")
    desk.add_console_parser(sub)
    farm_cli.add_parser(sub)
    ins = sub.add_parser(
        "inspect",
        help="show what an OS image holds, offline (no boot); exit 1 if it has problems",
        description=inspect.DESCRIPTION,
        epilog=inspect.EPILOG,
    )
    inspect.add_arguments(ins)
    args, extra = parser.parse_known_args(argv)
    if args.command == "inspect":
        return inspect.main(args, extra)
    if args.command == "console":
        if extra:
            parser.error(f"console: unrecognized arguments: {' '.join(extra)}")
        return desk.console_main(args)
    if args.command == "smoke":
        return smoke(args, extra)
    if args.command == "farm":
        if extra:
            parser.error(f"farm: unrecognized arguments: {' '.join(extra)}")
        try:
            return farm_cli.main(args)
        except ConfigError as exc:
            print(f"testbed: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except InfraError as exc:
            print(f"testbed: lab fault: {exc}", file=sys.stderr)
            return EXIT_INFRA
    return certify(args, extra)


if __name__ == "__main__":
    sys.exit(main())
