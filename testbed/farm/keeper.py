"""The lease keeper: holds one labgrid place for one run, and lets go of it however the run ends.

labgrid's locks have no lease: a client killed with ``kill -9`` keeps its place locked
forever (labgrid issue #1739). testbed puts a lease on top, with two halves:

* **The keeper lets go when its run dies.** Each run that uses a place starts this keeper
  as a child with PR_SET_PDEATHSIG=SIGTERM: however the run dies (``kill -9``, a crash,
  Ctrl-C, the end of its stdin pipe), the kernel sends the keeper SIGTERM and the keeper
  releases the place at once (seconds, not minutes).
* **A lease that stops beating expires.** While it holds the place the keeper writes the
  lease into the place's tags every ``ttl/6`` seconds: ``testbed_holder`` (the coordinator's
  holder name) and ``testbed_lease`` (the Unix time it expires, ``ttl`` from now). If the
  keeper dies too (the whole process group killed, the host lost power), its heartbeat
  stops, and the next testbed acquire that finds the place held by a holder whose lease
  has expired releases it (``ReleasePlace`` with ``fromuser``: only if that holder still
  holds it, so a place taken by someone else meanwhile is left alone) and takes it.
  ``python -m testbed farm reap`` does the same for every place, for a cron job.
  A place held by a labgrid user without a testbed lease is never broken, nor one whose
  lease is still beating: a live holder keeps its place.

The lease times come from the holder's clock: farm hosts keep time with NTP.

Protocol with the run (``testbed.farm.lease``): one JSON object a line. stdout:
``{"event": "waiting", ...}``, ``{"event": "acquired", "place": {...}}``, ``{"event":
"broke", ...}``, ``{"event": "tagged"}``, ``{"event": "lost", "reason": ...}``,
``{"event": "released"}``, ``{"event": "error", "kind": "config"|"infra", "message": ...}``.
stdin: ``{"op": "tags", "tags": {...}}``, ``{"op": "release"}``; end of file is a release.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from testbed.errors import ConfigError, InfraError
from testbed.farm.coordinator import Coordinator, PlaceHeld, PlaceInfo

DEFAULT_TTL_S = 30.0
HOLDER_TAG = "testbed_holder"
LEASE_TAG = "testbed_lease"
HEALTH_TAG = "testbed_health"
POLL_S = 0.5


def parse_tags(text: str) -> dict[str, str]:
    """``k=v,k=v`` -> dict; ConfigError for a pair without ``=``."""
    tags: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"place tags {text!r}: write KEY=VALUE[,KEY=VALUE...], e.g. tags:board=rpi4,farm=night")
        tags[key] = value
    return tags


TESTBED_HOLDER = "-testbed-"


def lease_expired(place: PlaceInfo, now: float, ttl: float = DEFAULT_TTL_S) -> bool:
    """A testbed lease on ``place`` whose heartbeat stopped: the holder the coordinator records
    is the one the lease names, and the lease's end has passed. Also a testbed holder whose lease
    tags are missing or name another holder (its keeper died between acquiring and its first
    heartbeat, or while letting go) once the place has not changed for ``ttl``: no keeper of
    testbed's holds a place that long without writing its lease."""
    if not place.acquired:
        return False
    if place.tags.get(HOLDER_TAG) == place.acquired:
        try:
            return float(place.tags.get(LEASE_TAG, "")) < now
        except ValueError:
            pass
    if TESTBED_HOLDER not in place.acquired.split("/", 1)[-1]:
        return False  # a labgrid user's lock: never broken
    return place.changed > 0 and now - place.changed > ttl


def break_expired(coord: Coordinator, place: PlaceInfo, emit: Any = None) -> bool:
    """Release ``place`` if its lease expired (only from the holder that let it expire; if
    another run broke it first, or took the place meanwhile, nothing is done or reported)."""
    if not lease_expired(place, time.time()):
        return False
    holder = place.acquired
    assert holder is not None
    coord.release(place.name, fromuser=holder)
    after = coord.place(place.name)
    if after.acquired is not None:
        return False  # someone else's now: their lease, their tags
    if after.tags.get(HOLDER_TAG) == holder:
        coord.set_tags(place.name, {HOLDER_TAG: "", LEASE_TAG: ""})
    if emit is not None:
        emit({"event": "broke", "place": place.name, "holder": holder, "lease": place.tags.get(LEASE_TAG)})
    return True


def candidates(
    places: dict[str, PlaceInfo], name: str | None, tags: dict[str, str], address: str, avoid: tuple[str, ...] = ()
) -> list[PlaceInfo]:
    """The places a request may take, free ones first. ConfigError when none could ever match;
    InfraError when all that match are out of service. ``avoid``: places a retry should not
    land on again (a lab fault happened there), used only if the farm has no other."""
    if name is not None:
        if name not in places:
            known = ", ".join(sorted(places)) or "none"
            raise ConfigError(
                f"labgrid place '{name}' does not exist on coordinator {address} (places: {known}); "
                f"check --place / board.place, or create it with labgrid-client -p {name} create"
            )
        # A place named outright is taken even if out of service: a health check, a person
        # looking at a sick board. Only requests by tags skip bad places.
        return [places[name]]
    else:
        chosen = [p for p in places.values() if all(p.tags.get(k) == v for k, v in tags.items())]
        if not chosen:
            shown = ", ".join(
                f"{p.name} [{','.join(f'{k}={v}' for k, v in sorted(p.tags.items()))}]" for p in places.values()
            )
            want = ",".join(f"{k}={v}" for k, v in tags.items())
            raise ConfigError(
                f"no labgrid place on coordinator {address} has the tags {want} (places: {shown or 'none'}); "
                "check --place tags:... / board.place, or tag a place with labgrid-client -p NAME set-tags"
            )
    usable = [p for p in chosen if p.tags.get(HEALTH_TAG) != "bad"]
    if not usable:
        bad = ", ".join(f"{p.name} ({p.tags.get('testbed_health_reason', 'no reason recorded')})" for p in chosen)
        raise InfraError(
            f"every matching labgrid place is out of service (testbed_health=bad): {bad}; "
            "fix the board, then python -m testbed farm health --reset PLACE"
        )
    others = [p for p in usable if p.name not in avoid]
    return sorted(others or usable, key=lambda p: (p.acquired is not None, p.name))


class Keeper:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ttl: float = args.ttl
        self.stop = threading.Event()
        # A signal's handler writes here, so that a select() in progress wakes at once.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.place: str | None = None
        self.coord: Coordinator | None = None
        self._out_lock = threading.Lock()

    def emit(self, obj: dict[str, Any]) -> None:
        with self._out_lock:
            try:
                sys.stdout.write(json.dumps(obj) + "\n")
                sys.stdout.flush()
            except (BrokenPipeError, ValueError):
                pass

    def run(self) -> int:
        try:
            self.coord = Coordinator(self.args.coordinator, user=self.args.user)
        except (ConfigError, InfraError) as exc:
            self.emit({"event": "error", "kind": _kind(exc), "message": str(exc)})
            return 2
        try:
            try:
                self._acquire()
            except (ConfigError, InfraError) as exc:
                self.emit({"event": "error", "kind": _kind(exc), "message": str(exc)})
                return 2
            if self.place is None:  # stopped while waiting
                return 0
            return self._hold()
        finally:
            self._release()
            self.coord.close()

    def _acquire(self) -> None:
        assert self.coord is not None
        coord = self.coord
        tags = parse_tags(self.args.tags) if self.args.tags else {}
        deadline = time.monotonic() + self.args.wait
        told = ""
        while not self.stop.is_set():
            places = coord.places()
            holders: list[str] = []
            avoid = tuple(filter(None, (self.args.avoid or "").split(",")))
            chosen = candidates(places, self.args.place, tags, coord.address, avoid)
            # Every expired lease among them is broken on the way, not only when no place is
            # free: a dead run's place goes back to the farm at the next request that sees it.
            freed = {p.name for p in chosen if p.acquired and break_expired(coord, p, self.emit)}
            for place in chosen:
                if place.acquired and place.name not in freed:
                    holders.append(f"{place.name} by {place.acquired}")
                    continue
                try:
                    coord.acquire(place.name)
                except PlaceHeld as held:
                    holders.append(f"{held.place} by {held.holder}")
                    continue
                self.place = place.name
                self._beat()
                info = coord.place(place.name)
                self.emit({"event": "acquired", "place": asdict(info), "holder": coord.name, "ttl": self.ttl})
                return
            what = "; ".join(holders)
            if time.monotonic() >= deadline:
                wanted = f"place {self.args.place}" if self.args.place else f"a place with tags {self.args.tags}"
                raise InfraError(
                    f"labgrid: {wanted} is held ({what}); waited {self.args.wait:g}s "
                    "(--lock-wait SECONDS to queue for it)"
                )
            if what != told:
                self.emit({"event": "waiting", "held": holders})
                told = what
            self.stop.wait(POLL_S)

    def _beat(self) -> None:
        assert self.coord is not None and self.place is not None
        self.coord.set_tags(self.place, {HOLDER_TAG: self.coord.name, LEASE_TAG: f"{time.time() + self.ttl:.0f}"})

    def _hold(self) -> int:
        assert self.coord is not None and self.place is not None
        place: str = self.place
        interval = max(self.ttl / 6, 0.2)
        next_beat = time.monotonic() + interval
        stdin = sys.stdin.buffer
        buffered = b""
        while not self.stop.is_set():
            timeout = max(0.0, next_beat - time.monotonic())
            ready, _, _ = select.select([stdin, self.wake_r], [], [], timeout)
            if self.wake_r in ready:
                return 0
            if stdin in ready:
                chunk = os.read(stdin.fileno(), 65536)
                if not chunk:
                    return 0  # the run closed the pipe (or died): release
                buffered += chunk
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    if not line.strip():
                        continue
                    command = json.loads(line)
                    if command.get("op") == "release":
                        return 0
                    if command.get("op") == "tags":
                        self.coord.set_tags(place, {str(k): str(v) for k, v in command["tags"].items()})
                        self.emit({"event": "tagged"})
            if time.monotonic() >= next_beat:
                try:
                    holder = self.coord.place(place).acquired
                    if holder != self.coord.name:
                        self.emit(
                            {"event": "lost", "reason": f"place {self.place} is now held by {holder or 'nobody'}"}
                        )
                        self.place = None
                        return 3
                    self._beat()
                except (ConfigError, InfraError) as exc:
                    # The coordinator is away for a moment: the lease's ttl covers a few missed beats.
                    self.emit({"event": "warning", "message": str(exc)})
                next_beat = time.monotonic() + interval
        return 0

    def _release(self) -> None:
        if self.coord is None or self.place is None:
            return
        place, self.place = self.place, None
        try:
            # Released first: a keeper killed right after leaves a free place, never one held
            # without its lease. The tags are then cleared only while they still name this
            # holder on a free place (stale ones would do no harm: they are checked against
            # the holder).
            self.coord.release(place, fromuser=self.coord.name)
            after = self.coord.place(place)
            if after.acquired is None and after.tags.get(HOLDER_TAG) == self.coord.name:
                self.coord.set_tags(place, {HOLDER_TAG: "", LEASE_TAG: ""})
            self.emit({"event": "released", "place": place})
        except (ConfigError, InfraError) as exc:
            self.emit({"event": "error", "kind": "infra", "message": f"releasing {place}: {exc}"})


def _kind(exc: BaseException) -> str:
    return "config" if isinstance(exc, ConfigError) else "infra"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.farm.keeper", description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--place", default=None, help="the place's name")
    parser.add_argument("--tags", default=None, help="KEY=VALUE,...: any place with these tags")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to queue for a held place")
    parser.add_argument("--ttl", type=float, default=DEFAULT_TTL_S, help="seconds a lease lasts without a heartbeat")
    parser.add_argument("--user", default=None, help="the user half of the holder name")
    parser.add_argument("--avoid", default=None, help="NAME,...: places to take only if no other matches")
    args = parser.parse_args(argv)
    keeper = Keeper(args)

    def stop(signum: int, frame: Any) -> None:
        keeper.stop.set()
        try:
            os.write(keeper.wake_w, b"x")
        except OSError:
            pass

    # SIGTERM: the run died (PR_SET_PDEATHSIG) or is being stopped. Ctrl-C goes to the run,
    # which powers the board off and then closes the pipe: the keeper must outlive that.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main())
