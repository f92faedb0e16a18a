"""One event stream: every command run on a device and every step taken on it, as typed records.

An :class:`Event` is the one kind of evidence: a command over SSH or the serial console, an
offline read of the image, a check made from the farm's side (an HTTP request, a login
attempt), or a step on the device (power cut, restore, link change, flash). Events go to the
:class:`Collector` of the context they happen in; the plugin opens one per test
(:func:`collecting`), so whatever a test does is attached to that test with no "current test"
global. Work in another thread (the hup suite's power-cut trials) collects into its own
collector and hands the events over (:meth:`Collector.extend` into :func:`current`) to the
test that reports on it.

A step (``with step("power cut", device=name): ...``, in the spirit of labgrid's ``@step``)
records its start, duration and outcome (``ok``, or the exception that ended it), also when
it fails.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from testbed.console import utcnow

# Where an event that happens now belongs: the collector of the running test (set by the
# plugin), of a background job, or none (then the event is not kept).
_CURRENT: contextvars.ContextVar[Collector | None] = contextvars.ContextVar("testbed_collector", default=None)


@dataclass
class Event:
    """One piece of evidence: what was done, on which device, over what, and what came of it.

    ``kind`` is "command" (a shell command), "step" (an action on the device: power, restore,
    link, flash), "note" (something checked from the farm's side) or "offline" (the image file
    read without a boot). ``exit_code`` is the command's; a step or note has 0 for success and
    1 for failure, with the reason in ``stderr``.
    """

    kind: str
    what: str
    transport: str
    started: str
    duration_s: float = 0.0
    exit_code: int = 0
    stdout: str = ""
    stderr: str = ""
    device: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def as_dict(self) -> dict[str, Any]:
        """The evidence entry of report.json (``command`` is the ``what``)."""
        return {
            "kind": self.kind,
            "transport": self.transport,
            "command": self.what,
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "started": self.started,
            "duration_s": round(self.duration_s, 4),
            "device": self.device,
        }


@dataclass
class Collector:
    """The events of one test (or one background job), in the order they happened; thread-safe."""

    name: str = ""
    events: list[Event] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def extend(self, events: list[Event]) -> None:
        with self._lock:
            self.events.extend(events)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)


def current() -> Collector | None:
    """The collector of this context (the running test's, in the thread that runs it)."""
    return _CURRENT.get()


def emit(event: Event) -> Event:
    """Record ``event`` on this context's collector (dropped where nothing collects)."""
    collector = _CURRENT.get()
    if collector is not None:
        collector.add(event)
    return event


@contextmanager
def collecting(collector: Collector) -> Iterator[Collector]:
    """Events of this context go to ``collector`` until the block ends."""
    token = _CURRENT.set(collector)
    try:
        yield collector
    finally:
        _CURRENT.reset(token)


def note(what: str, output: str, *, ok: bool = True, transport: str = "farm", device: str = "") -> Event:
    """Evidence for something checked without a command on the device (an HTTP request, a login)."""
    return emit(
        Event(
            kind="offline" if transport == "offline" else "note",
            what=what,
            transport=transport,
            started=utcnow(),
            exit_code=0 if ok else 1,
            stdout=output,
            device=device,
        )
    )


@contextmanager
def step(what: str, *, device: str = "", transport: str = "testbed") -> Iterator[Event]:
    """Record an action on a device: its start, duration and outcome, also when it raises.

    The yielded event's ``stdout`` may be filled in by the block (what the step found).
    """
    event = Event(kind="step", what=what, transport=transport, started=utcnow(), device=device)
    t0 = time.monotonic()
    try:
        yield event
    except BaseException as exc:
        event.exit_code = 1
        event.stderr = f"{type(exc).__name__}: {exc}"[:2000]
        raise
    finally:
        event.duration_s = time.monotonic() - t0
        emit(event)
