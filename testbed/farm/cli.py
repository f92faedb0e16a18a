"""``python -m testbed farm ...``: a labgrid farm's places, their health, a farm night.

* ``farm places``: every place with its holder, lease and health;
* ``farm health PLACE... | --all [--device P] [--image I]``: the smoke suite on a known-good
  image on each place; the verdict goes into the place's tags (``testbed.farm.health``);
  ``--reset PLACE...`` puts places back in service;
* ``farm reap``: release every place whose testbed lease expired (its holder and keeper are
  gone); the next acquire does the same for the place it wants, so this is for a cron job;
* ``farm run FARM.yaml``: a job matrix with retries and a summary (``testbed.farm.run``);
* ``farm lab [--places N]``: a virtual farm on this machine (a real coordinator and exporter
  on loopback, boards on QEMU) for trying all of the above; runs until Ctrl-C.

The coordinator: ``--coordinator``, else ``LG_COORDINATOR``. Exit codes as elsewhere: 0
good, 1 a place (or job) failed, 75 the lab (the coordinator unreachable), 4 bad input.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

from testbed.errors import ConfigError
from testbed.report import EXIT_FAILED, EXIT_PASSED


def add_parser(sub: argparse._SubParsersAction) -> None:
    farm = sub.add_parser(
        "farm",
        help="a labgrid farm: places, health checks, a farm night",
        description="A labgrid farm's places, their health checks, and a farm night (a job matrix with retries).",
    )
    farm.add_argument("--coordinator", default=None, help="HOST:PORT (default LG_COORDINATOR)")
    fsub = farm.add_subparsers(dest="farm_command", required=True)
    fsub.add_parser("places", help="every place with its holder, lease and health")
    h = fsub.add_parser("health", help="health-check places (smoke suite on a known-good image)")
    h.add_argument("places", nargs="*", help="place names")
    h.add_argument("--all", action="store_true", help="every place of the coordinator")
    h.add_argument("--reset", action="store_true", help="put the places back in service (no check)")
    h.add_argument("--device", default=None, help="the profile that drives the places (default: tag testbed_device)")
    h.add_argument("--image", default=None, help="the known-good image (default: the reference image)")
    h.add_argument("--report-dir", default="reports/health")
    h.add_argument("--dry-run", action="store_true", help="print the smoke command of each named place, run nothing")
    fsub.add_parser("reap", help="release places whose testbed lease expired")
    r = fsub.add_parser("run", help="run a farm file's job matrix, with retries and a summary")
    r.add_argument("farm_file", type=Path)
    r.add_argument("--dry-run", action="store_true", help="print each job's pytest command, run nothing")
    lab = fsub.add_parser("lab", help="a virtual farm on this machine, until Ctrl-C")
    lab.add_argument("--places", type=int, default=2)
    lab.add_argument("--device", default="virtual-board", help="the virtual boards' profile")


def _ago(tag: str | None) -> str:
    try:
        at = float(tag or "")
    except ValueError:
        return ""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


def places(address: str) -> int:
    from testbed.farm.coordinator import Coordinator
    from testbed.farm.keeper import lease_expired

    with Coordinator(address) as coord:
        found = coord.places()
    now = time.time()
    for place in sorted(found.values(), key=lambda p: p.name):
        held = place.acquired or "free"
        if lease_expired(place, now):
            held += " (lease expired)"
        health = place.tags.get("testbed_health", "unknown")
        if place.tags.get("testbed_health_at"):
            health += f" at {_ago(place.tags.get('testbed_health_at'))}"
        if place.tags.get("testbed_health_reason"):
            health += f": {place.tags['testbed_health_reason']}"
        tags = ",".join(f"{k}={v}" for k, v in sorted(place.tags.items()) if not k.startswith("testbed_"))
        print(f"{place.name:20} {held:40} health {health}  [{tags}]")
    return EXIT_PASSED


def health(args: argparse.Namespace, address: str) -> int:
    from testbed.farm import health as fh
    from testbed.farm.coordinator import Coordinator

    if not args.places and not args.all:
        raise ConfigError("farm health: name places, or --all for every place of the coordinator")
    if args.dry_run:
        if args.all or not args.device:
            raise ConfigError("farm health --dry-run: name the places and --device (it does not ask the coordinator)")
        for name in args.places:
            argv = fh.smoke_argv(address or None, name, args.device, args.image, Path(args.report_dir))
            print(shlex.join(argv[1:]))
        return EXIT_PASSED
    with Coordinator(address) as coord:
        found = coord.places()
        names = sorted(found) if args.all else args.places
        for name in names:
            coord.place(name)  # a wrong name: one line, exit 4
    if args.reset:
        fh.reset(address, names)
        for name in names:
            print(f"place {name}: back in service (health unknown until its next check)")
        return EXIT_PASSED
    bad = 0
    for name in names:
        result = fh.check_place(
            address, found[name], device=args.device, image=args.image, report_dir=Path(args.report_dir)
        )
        line = f"place {name}: {result.verdict} in {result.seconds:.0f}s"
        if result.reason:
            line += f": {result.reason}"
        print(line + (f"  ({result.report})" if result.report else ""))
        bad += result.verdict != "good"
    return EXIT_FAILED if bad else EXIT_PASSED


def reap(address: str) -> int:
    from testbed.farm.coordinator import Coordinator
    from testbed.farm.keeper import break_expired

    broken = 0
    with Coordinator(address) as coord:
        for place in coord.places().values():
            if break_expired(coord, place):
                print(f"place {place.name}: released (the lease of {place.acquired} expired)")
                broken += 1
    print(f"{broken} expired lease{'s' if broken != 1 else ''} released")
    return EXIT_PASSED


def lab(args: argparse.Namespace) -> int:
    from testbed.farm.virtual import VirtualFarm
    from testbed.profile import load_profile

    profile = load_profile(args.device)
    with VirtualFarm(profile, args.places, tags={"testbed_device": args.device}) as farm:
        print(f"virtual farm: {args.places} places ({', '.join(p.name for p in farm.places)}), tags board=virtual")
        print(f"export LG_COORDINATOR={farm.address}")
        print(f"then: python -m testbed smoke --device {args.device} --place {farm.places[0].name}")
        print("Ctrl-C ends the farm (every process it started goes with it)", flush=True)
        # Blocked only now: the farm's processes were started with the signals deliverable.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return EXIT_PASSED


def main(args: argparse.Namespace) -> int:
    from testbed.farm.coordinator import coordinator_address

    if args.farm_command == "lab":
        return lab(args)
    if args.farm_command == "run":
        from testbed.farm.run import main as run_main

        return run_main(args.farm_file, args.coordinator, dry_run=args.dry_run)
    if args.farm_command == "health" and args.dry_run:
        address = args.coordinator or os.environ.get("LG_COORDINATOR") or ""
    else:
        address = coordinator_address(args.coordinator)
    if args.farm_command == "places":
        return places(address)
    if args.farm_command == "health":
        return health(args, address)
    return reap(address)
