"""``python -m testbed certify|smoke|console|inspect|farm``: certify an image on a device, smoke-test a board
on the desk, get a shell on a device, see what an image holds without booting it, or drive a labgrid
farm (``testbed.farm.cli``).

``certify`` runs the suites with pytest once per mode, each in its own process and report
directory, then prints one verdict line per mode. The checks that do not depend on the mode
(marked ``mode_independent``: layout, the update suite, os-release, the fingerprint and the
filesystem checks) run in the first mode only; the later modes' reports inherit their verdicts
with a link to the evidence (``--inherit``, testbed.plan). The modes run side by side when the
host's boot budget carries two guests (each output line led by its mode): a later mode runs its
own checks meanwhile and takes the first mode's verdicts once that run has ended
(``--inherit-wait``). ``--one-mode-at-a-time`` runs them one after the other; ``--full`` runs
everything in every mode.
Exit code: 0 when every mode passed, 1 when the device failed a check in any mode, 75
when only lab faults stood in the way, 4 for bad input.

``smoke`` runs ``suites/smoke`` on one device, with a board's ports given on the command
line (``--serial``, ``--relay``, ``--flash-to``, ``--ssh-host``) instead of edited into
the profile, prints the boot stages as they happen and ends with a short verdict. Same
exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from testbed import budget, desk, inputs, inspect, plan
from testbed.errors import ConfigError, InfraError
from testbed.farm import cli as farm_cli
from testbed.report import EXIT_FAILED, EXIT_INFRA, EXIT_PASSED, EXIT_USAGE
from testbed.util import die_with_parent

SUITES = Path(__file__).resolve().parent.parent / "suites"


def _latest_report(report_dir: Path, before: set[Path]) -> Path | None:
    runs = [p for p in report_dir.glob("*/*/report.json") if p not in before and p.parent.name != "latest"]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _pytest_options(extra: list[str]) -> list[str]:
    """What goes to pytest: the options testbed did not take, a leading ``--`` dropped."""
    return extra[1:] if extra and extra[0] == "--" else extra


def _mode_argv(args: argparse.Namespace, mode: str, run_id: str, extra: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "pytest", str(SUITES), "-p", "no:cacheprovider", "--mode", mode]
    argv += ["--device", args.device, "--report-dir", str(args.report_dir), "--run-id", run_id]
    if args.image:
        argv += ["--image", args.image]
    if not args.cold:
        argv += ["--warm"]
    if "-q" not in extra and "--quiet" not in extra:
        argv += ["--progress", "--boot-stages"]  # -q: pytest's own dots only
    return argv


def _side_by_side(args: argparse.Namespace, modes: list[str]) -> bool:
    """Modes run side by side when there is more than one, the later ones inherit (not ``--full``),
    they are not asked one at a time, and the host carries two booting guests."""
    if len(modes) < 2 or args.full or args.one_mode_at_a_time:
        return False
    try:
        slots = budget.boot_slots("tcg", 2)
    except ConfigError:
        return False
    return slots == 0 or slots >= 2


def _relay(proc: subprocess.Popen[bytes], prefix: str) -> threading.Thread:
    """Copy a mode's output to ours a line at a time, each line led by its mode."""

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(prefix + line.decode(errors="replace"))
            sys.stdout.flush()

    thread = threading.Thread(target=copy, name=f"relay {prefix.strip()}", daemon=True)
    thread.start()
    return thread


def _start_mode(argv: list[str], pass_fds: tuple[int, ...] = (), relay: bool = False) -> subprocess.Popen[bytes]:
    # A mode's pytest ends with certify: SIGTERM, so that it powers its devices off and writes
    # what it has (a kill -9 of certify included).
    return subprocess.Popen(
        argv,
        pass_fds=pass_fds,
        stdout=subprocess.PIPE if relay else None,
        stderr=subprocess.STDOUT if relay else None,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
    )


def _run_modes(args: argparse.Namespace, modes: list[str], extra: list[str], device: str) -> list[tuple[str, int, Path]]:
    """Each mode's pytest (side by side, or one after the other); (mode, exit code, its report.json)."""
    report_dir = Path(args.report_dir)
    now = datetime.now(UTC)
    runs = [(mode, plan.new_run_id(now)) for mode in modes]
    first_report = report_dir / device / runs[0][1] / "report.json"
    results: list[tuple[str, int, Path]] = []
    if not _side_by_side(args, modes):
        for i, (mode, run_id) in enumerate(runs):
            argv = _mode_argv(args, mode, run_id, extra)
            if i and not args.full and first_report.is_file():
                argv += ["--inherit", str(first_report)]
            print(f"==> certify {args.device} in {mode} mode: {' '.join(argv[3:])}", flush=True)
            proc = _start_mode(argv + extra)
            try:
                code = proc.wait()
            finally:
                if proc.poll() is None:  # certify interrupted: its pytest ends too
                    proc.terminate()
                    proc.wait()
            results.append((mode, code, report_dir / device / run_id / "report.json"))
            if code == EXIT_USAGE:
                break
        return results
    # Side by side: the first mode's report directory is made and locked here, and the lock goes
    # to its pytest, which holds it until it ends; the later modes run their mode-dependent
    # checks meanwhile, then wait for that lock and inherit from its report (testbed.plan).
    try:
        held = plan.hold_run(first_report.parent)
    except OSError as exc:
        raise ConfigError(
            f"--report-dir {args.report_dir}: cannot make {first_report.parent} ({exc.strerror}): "
            "give a directory you can write"
        ) from None
    procs: list[tuple[str, str, subprocess.Popen[bytes], threading.Thread]] = []
    width = max(len(m) for m in modes)
    try:
        for i, (mode, run_id) in enumerate(runs):
            argv = _mode_argv(args, mode, run_id, extra)
            if i:
                argv += ["--inherit", str(first_report), "--inherit-wait"]
            print(f"==> certify {args.device} in {mode} mode: {' '.join(argv[3:])}", flush=True)
            proc = _start_mode(argv + extra, (held,) if i == 0 else (), relay=True)
            procs.append((mode, run_id, proc, _relay(proc, f"{mode:<{width}} | ")))
            if i == 0:
                os.close(held)  # the first mode's pytest holds the lock now
                held = -1
        for mode, run_id, proc, relay in procs:
            code = proc.wait()
            relay.join()
            results.append((mode, code, report_dir / device / run_id / "report.json"))
    finally:
        if held >= 0:
            os.close(held)
        for _, _, proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        # Made here and left empty: the first mode stopped before its run began.
        with contextlib.suppress(OSError):
            first_report.parent.rmdir()
            first_report.parent.parent.rmdir()
    if results and results[0][1] == EXIT_USAGE:
        return results[:1]  # bad input: the first mode's one line says it; the others stopped on it too
    return results


def certify(args: argparse.Namespace, extra: list[str]) -> int:
    extra = _pytest_options(extra)
    modes = args.modes.split(",")
    if args.dry_run:
        for i, mode in enumerate(modes):
            print(shlex.join(_mode_argv(args, mode, "RUN_ID", extra)[1:] + extra))
            if i and not args.full:
                print(
                    f"# and --inherit <the first mode's report.json>: {mode} takes the mode-independent checks from it"
                    + (" (side by side: --inherit-wait)" if _side_by_side(args, modes) else "")
                )
        return EXIT_PASSED
    try:
        device = inputs.resolve_profile(args.device).name
    except ConfigError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    codes, lines = [], []
    try:
        ran = _run_modes(args, modes, extra, device)
    except ConfigError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for mode, code, report in ran:
        codes.append(code)
        if report.is_file():
            data = json.loads(report.read_text())
            c = data["counts"]
            inherited = sum(1 for t in data["tests"] if t.get("inherited"))
            lines.append(
                f"{mode:12} {data['result'].upper():7} {c['passed']} passed, {c['failed']} failed, "
                f"{c['error']} infra errors"
                + (f" ({inherited} inherited)" if inherited else "")
                + f"  {report.parent / 'report.html'}"
            )
        else:
            lines.append(f"{mode:12} no report (exit {code})")
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
        "--one-mode-at-a-time",
        action="store_true",
        help="run the modes one after the other (default: side by side when the host carries two booting "
        "guests; the later modes take the mode-independent verdicts from the first once it has ended)",
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
