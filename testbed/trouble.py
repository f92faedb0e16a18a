"""Kernel and service trouble a device prints while a check runs: BUG, WARNING, Oops, call traces,
segfaults, OOM kills, failed systemd units.

A :class:`TroubleLog` watches a device's console lines (``Console.watchers``, from the console's
reader thread) and keeps every line that shows trouble, with its time. At the end of each check
the plugin takes (``take``) what the devices the check used printed since they were last looked
at, attaches it to the check's evidence (kind "trouble") and, for the kinds the profile's
``trouble.fail`` lists (default: panic, oops, bug), fails the check. Trouble a check provokes on
purpose (a wait with ``tolerate_panics``: a root meant not to boot) is attached, never fatal.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from testbed.console import utcnow

# The kernel's own wording (and systemd's, for units); the first kind that matches a line wins.
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("panic", re.compile(r"Kernel panic - not syncing")),
    # A vCPU that did not run for seconds: on an emulated CPU (TCG) a busy host starves its guests,
    # and the kernel reports it as a "BUG"; flagged, a failure only where the profile says so.
    ("stall", re.compile(r"soft lockup - CPU#|rcu_\w+ (self-)?detected stall|blocked for more than \d+ seconds")),
    ("oops", re.compile(r"\bOops(: | - )|\bOops\b.*SMP")),
    ("bug", re.compile(r"\bBUG: ")),
    ("warning", re.compile(r"\bWARNING: (CPU: \d+ PID: \d+|.* at .*:\d+)")),
    ("oom", re.compile(r"Out of memory: Killed process|invoked oom-killer")),
    ("segfault", re.compile(r"\bsegfault at [0-9a-f]+ ")),
    ("unit", re.compile(r"\[FAILED\] Failed to start |\bFailed to start .*\.service")),
    ("trace", re.compile(r"\bCall Trace:")),  # a hung task's report, or the trace after a warning
)


@dataclass(frozen=True)
class Trouble:
    kind: str
    line: str
    at: float  # time.monotonic() when the line was read
    device: str
    wall: str  # the same moment, ISO 8601 UTC
    expected: bool = False  # seen while the device was meant to fail (tolerated panics)


class TroubleLog:
    """The trouble lines of one device's console (thread-safe)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._seen: list[Trouble] = []
        self._taken = 0  # how many of _seen were handed to a check already
        self._failed: set[str] = set()  # the failed units of the last listing
        self._lock = threading.Lock()
        self.expecting = False  # set while a wait tolerates kernel panics (see BootControl.wait)

    def on_line(self, line: str, replay: bool = False) -> None:
        if replay:
            return
        text = line.strip()
        for kind, pattern in PATTERNS:
            if pattern.search(text):
                with self._lock:
                    self._seen.append(
                        Trouble(kind, text[:300], time.monotonic(), self.device, utcnow(), self.expecting)
                    )
                return

    def since(self, started: float) -> list[Trouble]:
        """The trouble seen from ``started`` (time.monotonic()) on."""
        with self._lock:
            return [t for t in self._seen if t.at >= started]

    def failed_units(self, listing: str) -> None:
        """``systemctl --failed --no-legend --plain`` as the device printed it: every unit that
        failed since the last listing is trouble of kind "unit" (a service can fail without a
        word on the console)."""
        now = {line.split()[0] for line in listing.splitlines() if line.strip()}
        with self._lock:
            new = sorted(now - self._failed)
            self._failed = now
            for unit in new:
                line = next(row.strip() for row in listing.splitlines() if row.strip().startswith(unit))
                self._seen.append(
                    Trouble("unit", f"systemctl --failed: {line}"[:300], time.monotonic(), self.device, utcnow())
                )

    def take(self) -> list[Trouble]:
        """The trouble not handed out yet (each line goes to one check)."""
        with self._lock:
            fresh, self._taken = self._seen[self._taken :], len(self._seen)
            return fresh
