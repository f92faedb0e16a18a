"""The event stream: steps, notes and commands land on the collector of the context they run in."""

from __future__ import annotations

import contextvars
import threading

import pytest

from testbed import events as ev
from testbed.capabilities import require
from testbed.machines import provides
from testbed.profile import load_profile


def test_a_step_records_its_outcome_also_when_it_raises() -> None:
    collector = ev.Collector("test")
    with ev.collecting(collector):
        with ev.step("power cut", device="d1") as step:
            step.stdout = "off"
        with pytest.raises(RuntimeError), ev.step("restore snapshot ready", device="d1"):
            raise RuntimeError("loadvm failed")
        ev.note("GET /_ping", "OK", device="d1")
    first, second, third = collector.snapshot()
    assert (first.kind, first.what, first.ok, first.stdout) == ("step", "power cut", True, "off")
    assert (second.ok, second.stderr) == (False, "RuntimeError: loadvm failed")
    assert third.as_dict() == {
        "kind": "note", "transport": "farm", "command": "GET /_ping", "exit_code": 0, "stdout": "OK", "stderr": "",
        "started": third.started, "duration_s": 0.0, "device": "d1",
    }  # fmt: skip


def test_events_outside_a_collector_are_dropped_and_collectors_nest() -> None:
    # This test itself runs inside the plugin's collector: start from an empty context.
    def body() -> None:
        assert ev.current() is None
        ev.note("nobody listens", "")
        outer, inner = ev.Collector("outer"), ev.Collector("inner")
        with ev.collecting(outer):
            with ev.collecting(inner):
                ev.note("inner", "")
            ev.note("outer", "")
        assert [e.what for e in inner.snapshot()] == ["inner"]
        assert [e.what for e in outer.snapshot()] == ["outer"]
        assert ev.current() is None

    contextvars.Context().run(body)


def test_a_thread_collects_its_own_events_and_hands_them_over() -> None:
    """As the hup suite's power-cut trials do: a thread has no collector of the test that started it."""
    test, job = ev.Collector("test"), ev.Collector("job")

    def work() -> None:
        ev.note("not collected", "")  # a new thread starts with an empty context
        with ev.collecting(job):
            ev.note("trial 1", "came back on resin-rootB")

    with ev.collecting(test):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        assert test.snapshot() == []
        ev.current().extend(job.snapshot())  # type: ignore[union-attr]
    assert [e.what for e in test.snapshot()] == ["trial 1"]


class _Machine:
    kind = "board"


class _Device:
    name = "rpi-desk"
    machine = _Machine()


def test_a_missing_capability_skips_naming_it_and_the_device() -> None:
    with pytest.raises(pytest.skip.Exception, match=r"rpi-desk \(board machine\) has no link control capability"):
        require(None, "link control", _Device())
    link = object()
    assert require(link, "link control", _Device()) is link


def test_capabilities_are_known_from_the_profile() -> None:
    assert {"snapshots", "link", "media", "several"} <= provides(load_profile("qemu-x86_64"))
    assert provides(load_profile("raspberrypi4-64")) == {"reflash"}
    assert "several" in provides(load_profile("virtual-board"))
