"""A run's hold on one labgrid place: the lease keeper (``testbed.farm.keeper``) as a child.

``PlaceLease(...)`` starts the keeper and returns once it holds a place (or raises the
keeper's error: ConfigError for a wrong name or tags, InfraError for an unreachable
coordinator or a place still held after ``wait`` seconds). ``lost`` says whether the place
was taken away while the run held it (a lab fault). ``release()`` lets go; so does the
end of this process in any way (the keeper gets SIGTERM from the kernel, or reads the end
of its stdin).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from testbed.errors import ConfigError, InfraError
from testbed.farm.coordinator import PlaceInfo, default_identity
from testbed.farm.keeper import DEFAULT_TTL_S
from testbed.util import OwnedProcess

START_GRACE_S = 60.0
RELEASE_TIMEOUT_S = 15.0


class PlaceLease:
    """One place of a labgrid farm, held for this run.

    ``place``: a name; ``tags``: ``KEY=VALUE,...`` (any matching place in service).
    ``on_event(event)`` hears the keeper's events (waiting, broke, ...) as they come.
    """

    def __init__(
        self,
        coordinator: str,
        *,
        place: str | None = None,
        tags: str | None = None,
        wait: float = 0.0,
        ttl: float = DEFAULT_TTL_S,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        user: str | None = None,
        avoid: list[str] | None = None,
    ) -> None:
        if (place is None) == (tags is None):
            raise ConfigError("a labgrid place is named by its name or by tags:KEY=VALUE,..., one of the two")
        self.coordinator = coordinator
        self.wanted = place or f"tags:{tags}"
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self.lost: str | None = None
        self.released = False
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        _, base_user = default_identity()
        argv = [
            sys.executable, "-m", "testbed.farm.keeper",
            "--coordinator", coordinator,
            "--wait", str(wait),
            "--ttl", str(ttl),
            "--user", user or _run_user(base_user),
        ]  # fmt: skip
        argv += ["--place", place] if place is not None else ["--tags", str(tags)]
        if avoid:
            argv += ["--avoid", ",".join(avoid)]
        self.proc = OwnedProcess(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, death_signal=signal.SIGTERM)
        self._reader = threading.Thread(target=self._read, name=f"lease keeper {self.wanted}", daemon=True)
        self._reader.start()
        try:
            event = self._next(("acquired", "error"), wait + START_GRACE_S, "the lease keeper acquiring a place")
            if event["event"] == "error":
                cls = ConfigError if event.get("kind") == "config" else InfraError
                raise cls(event["message"])
        except BaseException:
            self.proc.kill()
            raise
        self.info = PlaceInfo(**event["place"])
        self.holder: str = event["holder"]
        self.ttl: float = event["ttl"]

    @property
    def name(self) -> str:
        return self.info.name

    def _read(self) -> None:
        stdout = self.proc.proc.stdout
        assert stdout is not None
        for raw in stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            self.events.append(event)
            if event.get("event") == "lost":
                self.lost = event.get("reason", "the place was taken away")
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception:  # noqa: BLE001 - a listener's bug must not stop the lease
                    pass
            self._queue.put(event)
        self._queue.put(None)

    def _next(self, kinds: tuple[str, ...], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InfraError(f"labgrid place {self.wanted}: timed out after {timeout:g}s waiting for {what}")
            try:
                event = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:
                code = self.proc.wait(5)
                raise InfraError(f"labgrid place {self.wanted}: the lease keeper exited (code {code}) while {what}")
            if event.get("event") in kinds:
                return event

    def _send(self, command: dict[str, Any]) -> None:
        stdin = self.proc.proc.stdin
        assert stdin is not None
        try:
            stdin.write((json.dumps(command) + "\n").encode())
            stdin.flush()
        except (BrokenPipeError, ValueError):
            raise InfraError(f"labgrid place {self.name}: the lease keeper is gone") from None

    def alive(self) -> bool:
        return self.proc.alive() and self.lost is None

    def check(self) -> None:
        """InfraError if the place was lost (taken away, or the keeper died)."""
        if self.lost is not None:
            raise InfraError(f"labgrid place {self.name} was lost: {self.lost}")
        if not self.released and not self.proc.alive():
            raise InfraError(f"labgrid place {self.name}: its lease keeper died; the place may be released")

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send({"op": "tags", "tags": tags})
        self._next(("tagged",), 30, f"setting tags {tags}")

    def release(self) -> None:
        """Let go of the place (idempotent)."""
        if self.released:
            return
        self.released = True
        try:
            if self.proc.alive():
                try:
                    self._send({"op": "release"})
                    self._next(("released", "error"), RELEASE_TIMEOUT_S, "releasing")
                except InfraError:
                    pass
        finally:
            stdin = self.proc.proc.stdin
            if stdin is not None:
                try:
                    stdin.close()
                except OSError:
                    pass
            if self.proc.wait(5) is None:
                self.proc.kill()
            self._reader.join(5)

    def facts(self) -> dict[str, Any]:
        return {
            "place": self.name,
            "coordinator": self.coordinator,
            "exporters": self.info.exporters,
            "holder": self.holder,
            "lease_ttl_s": self.ttl,
            "place_tags": {k: v for k, v in self.info.tags.items() if k not in ("testbed_lease", "testbed_holder")},
        }


_leases = iter(range(1, 1 << 30))


def _run_user(base: str) -> str:
    """A holder name of this run's own: two runs (or two leases of one run) are two holders."""
    n = next(_leases)
    return f"{base}-testbed-{os.getpid()}" + (f"-{n}" if n > 1 else "")
