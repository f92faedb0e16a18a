"""The pytest plugin: options, the device fixtures, and the session object that records the run.

:class:`TestbedSession` is registered as a plugin (as pytest-xdist's ``DSession`` is): it
resolves the options (profile, image), opens the run directory, gives every test a
:class:`~testbed.events.Collector` for its events, classifies outcomes, and hands the typed
records to ``testbed.report.model`` when the session ends. The order of checks is
``testbed.schedule``'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from testbed import events as ev
from testbed import inputs, plan, schedule
from testbed import report as rep
from testbed.boot import BootRecord, BootState
from testbed.dut import DUT, open_dut
from testbed.errors import ConfigError, DutError, InfraError
from testbed.lab.network import LabNetwork
from testbed.machines import provides
from testbed.profile import Profile
from testbed.report.model import RunInfo, TestRecord, build_report, image_facts
from testbed.util import check_free_space, no_space, runtime_base, sweep_runtime_dirs
from testbed.warm import WarmDevice, WarmStore
from testbed.warm import age as warm_age

DEFAULT_DEVICE = inputs.DEFAULT_DEVICE
MODES = ("development", "production")
# The plugin's fixtures that make a device: a run that uses one is checked against the host
# (emulator, firmware, ports, free space) and the image against the profile before anything boots.
DEVICE_FIXTURES = ("dut_booting", "dut_factory")
RUNTIME_MIN_FREE = 256 << 20  # a device's overlay grows with what the guest writes
REPORT_MIN_FREE = 8 << 20  # console logs, report.json, junit.xml, report.html
SESSION_KEY = pytest.StashKey["TestbedSession"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testbed", "testbed: boot and certify OS images")
    group.addoption("--device", default=None, help=f"device profile name or YAML path (default {DEFAULT_DEVICE})")
    group.addoption(
        "--image",
        default=None,
        help="disk image to test (.img or .qcow2); default: the reference image, built on demand",
    )
    group.addoption(
        "--mode",
        default=None,
        help="development or production: set developmentMode in the booted copy's config.json "
        "(default: as the image has it)",
    )
    group.addoption(
        "--report-dir", default="reports", help="where runs write reports/<device>/<run-id>/ (default: reports)"
    )
    group.addoption(
        "--inherit",
        default=None,
        metavar="REPORT",
        help="a certification's later mode: take the verdicts of the checks marked mode_independent from "
        "this report.json of its first mode instead of running them again",
    )
    group.addoption(
        "--inherit-wait",
        action="store_true",
        help="with --inherit: that report is still being written by the first mode's run beside this one "
        "(certify runs modes side by side); run the mode-dependent checks first, then wait for that run to end",
    )
    group.addoption(
        "--run-id",
        default=None,
        help="the run's directory name under --report-dir/<device>/ (default: the UTC time and 4 hex digits; "
        "an existing directory must be empty)",
    )
    group.addoption(
        "--warm",
        action="store_true",
        help="restore the session's device from a warm device of an earlier run of the same image, profile, "
        "config and testbed (~/.cache/testbed/warm), and keep one after a cold boot (TESTBED_COLD=1: never)",
    )
    group.addoption(
        "--progress",
        action="store_true",
        help="one line per check as it ends (outcome, time since the run began, duration); quiet with -q",
    )
    group.addoption("--boot-stages", action="store_true", help="print boot stages (power on, firmware, kernel, ...)")
    group.addoption(
        "--keep-on-failure",
        action="store_true",
        help="when a check fails, keep the devices running after the session and say how to reach them "
        "(waits for Enter; refused under CI=true)",
    )
    hup = parser.getgroup("testbed-hup", "testbed: the hup suite (A/B host OS updates)")
    hup.addoption(
        "--hup-bundle",
        default=None,
        help="host OS update bundle for the hup suite (default: the reference recipe built as a newer version)",
    )
    # Parsed in pytest_configure (one line for a bad value, not argparse's usage and error).
    hup.addoption(
        "--hup-power-cuts", default="5", help="power-cut trials of the hup suite, 0 or more (default %(default)s)"
    )
    hup.addoption(
        "--hup-seed", type=int, default=None, help="seed of the power-cut moments (default: random, reported)"
    )
    board = parser.getgroup("testbed-board", "testbed: real boards (override the profile's ports for this run)")
    board.addoption("--serial", default=None, help="the board's serial console: PORT[@BAUD], rfc2217:// or socket://")
    board.addoption(
        "--relay", default=None, help="power switch: serial-relay:PORT:CHANNEL, hid-relay:[SERIAL:]CHANNEL, manual, ..."
    )
    board.addoption("--flash-to", default=None, help="block device to flash, usbsdmux:/dev/sgN, or none")
    board.addoption("--ssh-host", default=None, help="the board's address: HOST[:PORT] (default <hostname>.local)")
    board.addoption(
        "--lock-wait", type=float, default=None, help="seconds to wait for a board another run holds (default 0)"
    )
    board.addoption(
        "--place",
        default=None,
        help="a labgrid place instead of local ports: NAME, or tags:KEY=VALUE,... (any such place in service)",
    )
    board.addoption("--coordinator", default=None, help="the labgrid coordinator HOST:PORT (default LG_COORDINATOR)")
    board.addoption(
        "--avoid-place", default=None, help="NAME,...: with --place tags:..., places to take only if no other matches"
    )


def classify(exc: BaseException | None) -> str:
    """Whose fault an exception says it is (``testbed.report.model.KINDS``)."""
    if exc is None:
        return "assertion"  # a failure without an exception (a strict xfail that passed)
    if isinstance(exc, InfraError):
        return "infra"
    if isinstance(exc, ConfigError):
        return "config"
    if isinstance(exc, DutError):
        return "dut"
    if isinstance(exc, (AssertionError, pytest.fail.Exception)):
        return "assertion"  # an expectation not met, by an assert or by pytest.fail()
    return "test"  # a plain exception: a bug in the check or in testbed, never a lab fault


class TestbedSession:
    """One pytest session's testbed state: inputs, run directory, devices, records; its hooks."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.device_name: str = config.getoption("--device") or DEFAULT_DEVICE
        self.image_option: str | None = config.getoption("--image")
        self.profile: Profile | None = None
        self.image_input: inputs.ImageInput | None = None
        self.run: RunInfo | None = None
        self.run_dir: Path | None = None
        self.devices: list[DUT] = []  # every device of the run, for the report's boots
        self.facts: dict[str, Any] = {}
        self.tests: dict[str, TestRecord] = {}
        self.failed = False  # a check failed (the device's fault, not the lab's)
        self.session_device: DUT | None = None  # the ``dut`` fixture's, once snapshotted "ready"
        inherit = config.getoption("--inherit")
        self.inherit_from: Path | None = Path(inherit) if inherit else None
        self.inherited: list[plan.Inherited] = []
        # --inherit-wait: the mode-independent checks, run last, unless the first run gives their verdicts
        self.pending: dict[str, pytest.Item] = {}
        self.pending_taken: set[str] | None = None
        self.began = time.monotonic()
        self.warm_from: WarmDevice | None = None  # the warm device the session's device came from
        self._held = False

    # -- inputs (errors here are the user's to fix) ---------------------------------------
    def resolve_profile(self) -> Profile:
        if self.profile is None:
            opt = self.config.getoption
            self.profile = inputs.resolve_profile(
                self.device_name,
                serial=opt("--serial"),
                relay=opt("--relay"),
                flash_to=opt("--flash-to"),
                ssh_host=opt("--ssh-host"),
                lock_wait=opt("--lock-wait"),
                place=opt("--place"),
                coordinator=opt("--coordinator"),
                avoid_place=opt("--avoid-place"),
            )
        return self.profile

    def resolve_image(self) -> Path:
        """The image to boot (a compressed ``--image`` unpacked into the cache)."""
        if self.image_input is None:
            self.image_input = inputs.resolve_image(self.image_option, self.resolve_profile(), self.say)
        return self.image_input.path

    @property
    def image_format(self) -> str:
        self.resolve_image()
        assert self.image_input is not None
        return self.image_input.format

    def say(self, text: str) -> None:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"testbed: {text}")

    def say_stage(self, stage: str, seconds: float | None, detail: str) -> None:
        """One boot stage as it happens (``--boot-stages``): ``testbed: [  5.3s] kernel  Linux version ...``."""
        when = f"{seconds:6.1f}s" if seconds is not None else "       "
        self.say(f"[{when}] {stage:9} {detail}".rstrip())
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.flush()

    # -- the run ------------------------------------------------------------------------
    def open_run(self) -> Path:
        if self.run_dir is None:
            profile = self.resolve_profile()
            now = datetime.now(UTC)
            run_id = self.config.getoption("--run-id") or plan.new_run_id(now)
            self.run = RunInfo(device=profile.name, run_id=run_id, started=now.isoformat(timespec="seconds"))
            run_dir = Path(self.config.getoption("--report-dir")) / profile.name / run_id
            try:
                # A named run's directory may have been made (and locked) by certify already.
                run_dir.mkdir(parents=True, exist_ok=bool(self.config.getoption("--run-id")))
                if any(run_dir.iterdir()):
                    raise ConfigError(f"--run-id {run_id}: {run_dir} already holds a run; give another id")
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise InfraError(no_space(run_dir, exc)) from None
                raise
            self.run_dir = run_dir
        return self.run_dir

    def new_device(self, name: str = "", **options: Any) -> DUT:
        """A device of this run (not powered on), its console log in the run directory."""
        profile, image = self.resolve_profile(), self.resolve_image()
        run_dir = self.open_run()
        mode = self.config.getoption("--mode")
        overrides = {"developmentMode": mode == "development"} if mode else {}
        overrides.update(options.pop("config_overrides", None) or {})
        device = open_dut(
            profile, image, self.image_format, run_dir / (f"console-{name}.log" if name else "console.log"),
            name=f"{profile.name}-{name}" if name else "", config_overrides=overrides,
            listener=self.say_stage if self.config.getoption("--boot-stages") and not name else None, **options,
        )  # fmt: skip
        self.devices.append(device)
        return device

    # -- warm devices -----------------------------------------------------------------------
    def warm_store(self) -> WarmStore | None:
        if not self.config.getoption("--warm") or os.environ.get("TESTBED_COLD") == "1":
            return None
        return WarmStore()

    def image_sha256(self) -> str:
        from testbed import image as img

        self.resolve_image()
        assert self.image_input is not None
        return img.sha256_file(self.image_input.path)

    def start_warm(self, device: DUT) -> bool:
        """The session's device restored from a warm device (``--warm``), if there is one."""
        store = self.warm_store()
        if store is None:
            return False
        entry = device.start_warm(store, self.image_sha256())
        if entry is None:
            return False
        self.warm_from = entry
        self.say(f"{device.name}: restored from a warm device of {warm_age(entry)} (--warm; TESTBED_COLD=1 boots cold)")
        return True

    def keep_warm(self, device: DUT, boot: BootRecord) -> None:
        store = self.warm_store()
        if store is not None:
            device.keep_warm(store, self.image_sha256(), boot.as_dict())

    def note_facts(self, device: DUT, replace: bool = False) -> None:
        """The report's device facts: the session's device, else the first device that booted."""
        if replace or not self.facts:
            self.facts = device.facts()

    def write_report(self) -> int:
        """Write report.json, junit.xml, report.html and the ``latest`` link; return the exit code."""
        assert self.run is not None and self.run_dir is not None
        from testbed import image as img

        given = self.image_input
        if given is not None and not self.run.image_sha256:
            # The file the user gave (compressed or not), and what was booted of it.
            self.run.image_path, self.run.image_format = str(given.given), given.format
            self.run.image_sha256 = img.sha256_file(given.given)
            if given.given != given.path:
                self.facts.setdefault("image_unpacked", str(given.path))
            assert self.profile is not None  # resolved before the image
            for key, value in image_facts(given.path, self.profile).items():
                self.facts.setdefault(key, value)
        mode = self.config.getoption("--mode")
        if mode is None and self.session_device is not None:
            mode = "development" if self.session_device.development_mode else "production"
        if mode:
            self.facts.setdefault("mode", mode)
        for taken in self.inherited:
            record = self.record_for(taken.nodeid)
            record.outcome, record.message, record.kind = taken.outcome, taken.message, taken.kind
            record.duration_s = taken.duration_s
            record.inherited = taken.as_dict(os.path.relpath(taken.source, self.run_dir))
        tests = list(self.tests.values())
        boots = [b.as_dict() for d in self.devices for b in d.boots]
        if self.warm_from is not None:
            # The first boot of the warm device this run's device was restored from: its timeline.
            first = dict(self.warm_from.meta.get("first_boot") or {})
            first["from_warm_device"] = self.warm_from.created
            boots.append(first)
            self.facts["warm_device"] = {"created": self.warm_from.created, "key": self.warm_from.path.name}
        boots.sort(key=lambda b: str(b.get("started", "")))
        report = build_report(self.run, tests, boots, self.facts)
        rep.write_json(self.run_dir / "report.json", report)
        rep.write_junit(self.run_dir / "junit.xml", report)
        rep.point_latest(self.run_dir)
        try:
            from testbed.report.html import render_html

            render_html(self.run_dir)
        except Exception as exc:  # noqa: BLE001 - a rendering bug must not change the verdict
            self.say(f"report.html not written: {type(exc).__name__}: {exc}")
        return rep.exit_code(tests)

    def record_for(self, nodeid: str) -> TestRecord:
        return self.tests.setdefault(nodeid, TestRecord(nodeid=nodeid))

    # -- hooks ----------------------------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
        """Everything the test (and its fixtures) does lands on its record."""
        record = self.record_for(item.nodeid)
        record.started = time.monotonic()
        with ev.collecting(record.collector):
            return (yield)

    @pytest.hookimpl(tryfirst=True, specname="pytest_runtest_protocol")
    def pytest_runtest_protocol_unless_inherited(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        """``--inherit-wait``: a mode-independent check is not run when the first run gave its verdict."""
        if item.nodeid not in self.pending:
            return None
        if self.pending_taken is None:
            self.pending_taken = self.take_pending()
        return True if item.nodeid in self.pending_taken else None

    def take_pending(self) -> set[str]:
        """Wait for the first mode's run beside this one to end, then take its verdicts."""
        assert self.inherit_from is not None
        directory = self.inherit_from.parent
        timeout = plan.wait_timeout()
        self.say(
            f"waiting for the first mode's run to end ({directory}, at most {timeout:.0f}s, TESTBED_INHERIT_WAIT): "
            f"{len(self.pending)} mode-independent checks take their verdicts from it"
        )
        began = time.monotonic()
        if not plan.wait_for_run(directory, timeout):
            self.say(f"the first mode's run did not end within {timeout:.0f}s: its checks run here")
            return set()
        try:
            source = plan.load_source(self.inherit_from)
        except ConfigError as exc:
            self.say(f"{exc}: the first mode's run wrote no report, its checks run here")
            return set()
        _, self.inherited = plan.split(list(self.pending.values()), source)
        taken = {i.nodeid for i in self.inherited}
        rest = len(self.pending) - len(taken)
        self.say(
            f"the first mode's run ended ({time.monotonic() - began:.0f}s waited): {len(taken)} verdicts inherited"
            + (f", {rest} checks it gave none for run here" if rest else "")
        )
        return taken

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """After -k, -m and --deselect: the checks another mode's run already gave a verdict for
        are taken from its report (``--inherit``); the order and early starts are of the rest."""
        if self.inherit_from is not None and self.config.getoption("--inherit-wait"):
            # The first run is still running: its checks' verdicts are read once it has ended,
            # at the first of these (last here); those it gave none for run then.
            self.pending = {i.nodeid: i for i in items if i.get_closest_marker(plan.MARKER) is not None}
            keep = [i for i in items if i.nodeid not in self.pending]
            schedule.order(keep)
            items[:] = keep + list(self.pending.values())
            return
        if self.inherit_from is not None:
            keep, self.inherited = plan.split(items, plan.load_source(self.inherit_from))
            if self.inherited:
                taken = {i.nodeid for i in self.inherited}
                self.config.hook.pytest_deselected(items=[item for item in items if item.nodeid in taken])
                items[:] = keep
        schedule.order(items)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Before the first check: what the checks that run will need, checked now, so that bad
        input is one line and exit 4 (a lab fault here: exit 75) before anything boots."""
        if self.config.option.collectonly or not session.items:
            return
        used = set().union(*(_plugin_fixtures(item) for item in session.items))
        if not used:
            return  # no testbed fixture: no report, no device
        try:
            names = {name for item in session.items for name in getattr(item, "fixturenames", ())}
            self.preflight(used, hup="hup_bundle" in names)
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
        except InfraError as exc:
            pytest.exit(f"testbed: lab fault: {exc}", returncode=rep.EXIT_INFRA)

    def preflight(self, fixtures: set[str], hup: bool) -> None:
        """The report directory; for a run that boots, the profile's machine on this host, the
        image against the profile and the free space for the devices' overlays; the hup suite's
        bundle. ConfigError for the user's input, InfraError for the lab's."""
        if hup and self.image_option and not self.config.getoption("--hup-bundle"):
            raise ConfigError(
                "the hup suite needs an update bundle for --image: give one with --hup-bundle PATH "
                "(the new root filesystem, ext4), or leave suites/hup out"
            )
        boots = bool(fixtures & set(DEVICE_FIXTURES))
        if boots or fixtures & {"image_under_test", "device_profile"}:
            profile = self.resolve_profile()
            if not self.image_option:
                from testbed import reference

                reference.check_arch(profile.arch, profile.source)  # built on demand: for this arch?
            if boots:
                inputs.check_host(profile)
                if self.image_option:
                    self.resolve_image()
                    assert self.image_input is not None
                    inputs.check_image(self.image_input, profile)
        report_dir = Path(self.config.getoption("--report-dir"))
        _check_report_dir(report_dir, create=True)
        check_free_space(
            report_dir, REPORT_MIN_FREE, "the run's reports", "free space there or pass another --report-dir"
        )
        if boots:
            check_free_space(
                runtime_base(), RUNTIME_MIN_FREE, "the devices' disk overlays and sockets",
                "free space there or point TESTBED_RUNTIME_DIR at a larger filesystem",
            )  # fmt: skip

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """A check on the session's device after its machine died (QEMU killed, a lab fault that
        the check before it reported): restore the device to its "ready" snapshot first, so that
        one fault costs one check. The check's report says it ran after a recovery."""
        device = self.session_device
        if device is None or "dut" not in getattr(item, "fixturenames", ()):
            return
        if device.state == BootState.OFF or device.machine.is_on():
            return  # switched off on purpose by a check, or running
        assert device.snapshots is not None  # session_device is set once "ready" is saved
        what = f"{device.name}'s machine had died: restored to snapshot 'ready' before this check"
        device.power.cut()  # what is left of the dead machine: its sockets, the boot record
        device.restore("ready")
        self.record_for(item.nodeid).recovered = what
        ev.note("recovery after a lab fault", what, device=device.name)
        self.say(what)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        record = self.record_for(item.nodeid)
        record.duration_s += report.duration
        if report.when == "call" and self._trouble(record, report):
            return report
        if report.passed:
            return report
        if report.skipped:
            record.outcome = "skipped"
            record.message = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
            return report
        exc = call.excinfo.value if call.excinfo is not None else None
        kind = classify(exc)
        text = _message(exc, report)
        if kind == "config" and report.when == "setup":
            # The user's to fix, and every later check would say it again: said once, the session
            # stops (exit 4). What was set up is torn down as at any end of a session.
            record.outcome, record.kind, record.message = "error", kind, text
            raise pytest.UsageError(str(exc))
        # The device's fault is a failure wherever it shows; the lab's, the user's and a bug in
        # a check are errors.
        if record.outcome != "failed":  # a failure stays the check's verdict over a later error
            record.outcome = "failed" if kind in ("dut", "assertion") else "error"
            record.kind = kind
        self.failed = self.failed or record.outcome == "failed"
        record.message = (record.message + "\n" + text).strip() if record.message else text
        if kind == "infra" and report.when == "call":
            report.user_properties.append(("testbed_kind", "infra"))
        if record.outcome == "error" and report.when == "call":
            report.user_properties.append(("testbed_outcome", "error"))
        return report

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """``--progress``: the check's outcome as it ends, with the run's elapsed seconds."""
        if not self.config.getoption("--progress") or self.config.option.verbose < 0:
            return
        if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
            return
        record = self.tests.get(report.nodeid)
        outcome = record.outcome if record is not None else report.outcome
        self.say(
            f"[{time.monotonic() - self.began:7.1f}s] {outcome.upper():7} {report.nodeid} ({report.duration:.1f}s)"
        )
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.flush()

    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config) -> tuple[str, str, str] | None:
        """pytest's own counts say what report.json says: a check that the lab (or the input, or a
        bug in the check) stopped is an error, not a failure, also when it raised during the call."""
        if report.when == "call" and report.failed and ("testbed_outcome", "error") in report.user_properties:
            return "error", "E", "ERROR"
        return None

    def hold(self) -> None:
        """``--keep-on-failure``: after a failed check, keep the running devices until the person
        at the desk is done with them (Enter, Ctrl-C or SIGTERM); once per session."""
        running = [d for d in self.devices if d.machine.is_on()]
        if self._held or not self.failed or not running or not self.config.getoption("--keep-on-failure"):
            return
        self._held = True
        from testbed import desk

        lines = ["a check failed: the devices are kept running for you."]
        for number, device in enumerate(running, 1):
            lines.append(f"  {number}. {device.name}: {desk.ssh_command(device)}")
        lines.append("Type the number of a device and Enter to attach its serial console here (Ctrl-] leaves);")
        lines.append("Enter alone (or Ctrl-C) powers them off and ends the run.")
        # This runs in a fixture's teardown, whose output pytest captures: the person must see it.
        capture = self.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            for line in lines:
                self.say(line)
            desk.wait_for_the_person(running)

    def _trouble(self, record: TestRecord, report: pytest.TestReport) -> bool:
        """Attach the kernel and service trouble that the devices this check used printed since
        they were last looked at; fail a passing check for the kinds the profile's ``trouble.fail``
        lists (not where the check meant the device to fail). True if it failed the check."""
        used = {event.device for event in record.collector.snapshot()}
        for device in self.devices:
            if device.name in used:
                _list_failed_units(device)
        seen = sorted((t for d in self.devices if d.name in used for t in d.trouble.take()), key=lambda t: t.at)
        fails = set(self.profile.trouble.fail) if self.profile is not None else set()
        for t in seen:
            record.collector.add(
                ev.Event(
                    kind="trouble", what=f"{t.kind} on {t.device}" + (" (provoked)" if t.expected else ""),
                    transport="console", started=t.wall, exit_code=1 if t.kind in fails and not t.expected else 0,
                    stdout=t.line, device=t.device,
                )
            )  # fmt: skip
        fatal = [t for t in seen if t.kind in fails and not t.expected]
        if not fatal or not report.passed:
            return False
        message = (
            "DutError: the device printed kernel trouble while the check ran (profile trouble.fail): "
            + "; ".join(f"{t.device}: {t.line}" for t in fatal[:5])
        )
        report.outcome = "failed"
        report.longrepr = message
        record.outcome, record.kind, record.message = "failed", "dut", message
        self.failed = True
        return True

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.run_dir is None:
            return
        try:
            code = self.write_report()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # The lab's disk, not the device: one line naming where and how much is left.
            pytest.exit(f"testbed: lab fault: {no_space(self.run_dir, exc)}", returncode=rep.EXIT_INFRA)
        if exitstatus in (0, 1):
            session.exitstatus = code

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.run_dir is None:
            return
        main = self.profile.name if self.profile is not None else ""
        boots = [b for d in self.devices if d.name == main for b in d.boots]
        cold = next((b.ssh_ready_s for b in boots if b.kind == "cold" and b.ssh_ready_s), None)
        tests = list(self.tests.values())
        c = rep.counts(tests)
        terminalreporter.write_sep("-", "testbed")
        terminalreporter.write_line(
            f"{self.device_name}: {rep.overall_result(tests).upper()}  ({c['passed']} passed, {c['failed']} failed, "
            f"{c['error']} errors, {c['skipped']} skipped)" + (f"; boot to SSH {cold:.1f}s" if cold else "")
        )
        if self.inherited:
            first = self.inherited[0]
            terminalreporter.write_line(
                f"{len(self.inherited)} mode-independent checks inherited from the {first.mode} run "
                f"{first.run_id} ({first.source})"
            )
        terminalreporter.write_line(f"report: {self.run_dir}/report.html  (report.json, junit.xml, console.log)")


def _plugin_fixtures(item: pytest.Item) -> set[str]:
    """The fixtures of this plugin that ``item`` uses (a test's own fixture of the same name is not
    one, nor the autouse one every test has)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {
        name
        for name, defs in info.name2fixturedefs.items()
        if defs and getattr(defs[-1].func, "__module__", None) == __name__ and name != "_testbed_start_early"
    }


def _list_failed_units(device: DUT) -> None:
    """Tell the device's trouble log its failed units, where it answers over SSH now (testbed's
    own look, not a command of the check: the units it finds are the evidence)."""
    if device.state != BootState.SSH_READY or not device.ssh.connected():
        return
    try:
        listing = device.ssh.run("systemctl --failed --no-legend --plain", 30).stdout
    except (DutError, InfraError):
        return
    device.trouble.failed_units(listing)


def _message(exc: BaseException | None, report: pytest.TestReport) -> str:
    if isinstance(exc, (DutError, InfraError, ConfigError)):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (AssertionError, pytest.fail.Exception)):
        return str(exc) or report.longreprtext[-3000:]
    return report.longreprtext[-3000:]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", plan.MARKER_HELP)
    config.addinivalue_line("markers", "fresh: the test needs a device restored to its first-boot snapshot")
    config.addinivalue_line(
        "markers", "reboot_round(prepare=f): the check shares the session's one reboot; f(dut) runs before it"
    )
    if config.getoption("--keep-on-failure") and os.environ.get("CI") == "true":
        raise pytest.UsageError(
            "--keep-on-failure keeps failed devices for a person at a desk and waits for them: it is refused "
            "under CI=true (drop the option in CI)"
        )
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        # A CI job cancelled, a `kill`: end as Ctrl-C does, so that devices are closed and their
        # directories removed (their QEMU would die with pytest anyway).
        signal.signal(signal.SIGTERM, _terminate)
    # What runs killed with kill -9 left (their owner is gone; a live run's are never touched).
    sweep_runtime_dirs(runtime_base())
    session = TestbedSession(config)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, "testbed-session")
    # Explicit options are checked before anything runs: one line, no traceback.
    try:
        _check_options(config)
        if config.getoption("--device") or any(
            config.getoption(o) is not None for o in ("--serial", "--relay", "--flash-to", "--ssh-host")
        ):
            session.resolve_profile()
        if config.getoption("--image"):
            session.resolve_image()
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    except InfraError as exc:
        pytest.exit(f"testbed: lab fault: {exc}", returncode=rep.EXIT_INFRA)


def _check_options(config: pytest.Config) -> None:
    """The options that need no profile or image: ConfigError naming the option and the fix."""
    mode = config.getoption("--mode")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: write --mode development or --mode production")
    cuts = config.getoption("--hup-power-cuts")
    try:
        trials = int(cuts)
    except (TypeError, ValueError):
        trials = -1
    if trials < 0:
        raise ConfigError(f"--hup-power-cuts {cuts!r}: give the number of power-cut trials, 0 or more (0: none)")
    config.option.hup_power_cuts = trials
    bundle = config.getoption("--hup-bundle")
    if bundle is not None and not Path(bundle).expanduser().is_file():
        what = "a directory" if Path(bundle).expanduser().is_dir() else "no such file"
        raise ConfigError(f"--hup-bundle {bundle}: {what}: give the update bundle (the new root filesystem, ext4)")
    _check_report_dir(Path(config.getoption("--report-dir")), create=False)
    run_id = config.getoption("--run-id")
    if run_id is not None and not plan.RUN_ID.fullmatch(run_id):
        raise ConfigError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' (a directory name)")
    if config.getoption("--inherit-wait"):
        if not config.getoption("--inherit"):
            raise ConfigError("--inherit-wait: give --inherit REPORT too (the first mode's report.json, still being written)")
        plan.wait_timeout()
    elif config.getoption("--inherit"):
        plan.load_source(Path(config.getoption("--inherit")))


def _check_report_dir(path: Path, create: bool) -> None:
    """``--report-dir`` must be a directory this run can write (made when ``create``)."""
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                what = "is a file" if part == path else f"is under {part}, which is a file"
                raise ConfigError(
                    f"--report-dir {path} {what}, not a directory: pass a directory (it is made if missing)"
                )
            break
    if not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".testbed-write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise InfraError(no_space(path, exc)) from None
        raise ConfigError(
            f"--report-dir {path}: cannot write there ({exc.strerror}): pass a directory you can write"
        ) from None


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def testbed_state(pytestconfig: pytest.Config) -> TestbedSession:
    """The session object (profile, image, run directory, devices)."""
    return pytestconfig.stash[SESSION_KEY]


@pytest.fixture(scope="session")
def device_profile(testbed_state: TestbedSession) -> Profile:
    """The device profile of this run: expectations come from here, not from the tests."""
    return testbed_state.resolve_profile()  # a ConfigError ends the session in one line (makereport)


@dataclass(frozen=True)
class ImageUnderTest:
    """The image file under test, for offline checks before (or without) a boot."""

    path: Path
    format: str


@pytest.fixture(scope="session")
def image_under_test(testbed_state: TestbedSession) -> ImageUnderTest:
    path = testbed_state.resolve_image()
    testbed_state.open_run()
    return ImageUnderTest(path, testbed_state.image_format)


OfflineEvidence = Callable[..., ev.Event]


@pytest.fixture
def offline_evidence() -> OfflineEvidence:
    """``offline_evidence(what, output, ok=True)``: an offline check (reading the image file) as evidence."""

    def record(what: str, output: str, ok: bool = True) -> ev.Event:
        return ev.note(what, output, ok=ok, transport="offline")

    return record


@pytest.fixture(scope="session")
def dut_booting(testbed_state: TestbedSession, device_profile: Profile) -> Iterator[DUT]:
    """The session's device, powered on and not waited for: ``dut`` waits for it.

    Requesting this before ``dut`` lets the device boot while other work goes on (a suite
    that also boots a second device starts both at once).
    """
    device = testbed_state.new_device()
    try:
        if not testbed_state.start_warm(device):
            device.power_on(wait=False)
        if device.machine.accel_note:
            testbed_state.say(f"{device.machine.accel_note}; using {device.machine.accel}")
        yield device
    finally:
        if not testbed_state.facts:  # the session device never came up: what the machine says
            testbed_state.facts = device.machine.facts()
        try:
            testbed_state.hold()
        finally:
            device.close()


@pytest.fixture(scope="session")
def dut(testbed_state: TestbedSession, dut_booting: DUT) -> DUT:
    """The device under test, booted once for the session and snapshotted when ready.

    Tests that change the device should use ``fresh_dut`` (a snapshot restore).
    """
    device = dut_booting
    if testbed_state.warm_from is not None:  # restored, its "ready" snapshot taken by the run that kept it
        testbed_state.note_facts(device, replace=True)
        testbed_state.session_device = device
        return device
    boot = device.finish_power_on()
    testbed_state.say(f"{device.name} ready over SSH {boot.ssh_ready_s:.1f}s after power on ({device.machine.accel})")
    testbed_state.note_facts(device, replace=True)
    device.save_snapshot("ready")
    testbed_state.keep_warm(device, boot)
    if device.snapshots is not None:
        testbed_state.session_device = device  # restored after a lab fault (pytest_runtest_setup)
    return device


@pytest.fixture(scope="session")
def dut_factory(testbed_state: TestbedSession, device_profile: Profile) -> Iterator[Callable[..., DUT]]:
    """Boot more devices from the same image with their own config.json and boot files.

    ``make(name, config_overrides={...}, boot_files={"/system-connections/x": b"..."}, lab=lab_network)``
    returns a booted DUT (its own overlay, console log ``console-<name>.log``; with ``lab``, a
    second NIC on the farm's lab network); all are closed at the end of the session. For
    checks of what an image does with a config given before its first boot. With
    ``wait=False`` the device is returned while it boots (``device.finish_power_on()`` waits),
    so that it boots while something else runs. ``make(name, twin_of=device)`` returns a
    device that is off, with a copy of ``device``'s disks, snapshots and config.json (a machine
    with snapshots and disk copies): it starts with ``restore(snapshot)``, so a second device
    costs no boot and no set-up.
    """
    if "several" not in provides(device_profile):
        # One board, held by the session's `dut`: a second device needs a second board.
        pytest.skip(f"{device_profile.name}: booting a second device needs a second board (QEMU and the virtual bench)")
    made: list[DUT] = []

    def make(
        name: str,
        config_overrides: dict[str, Any] | None = None,
        boot_files: dict[str, bytes] | None = None,
        media: dict[str, Path] | None = None,
        lab: LabNetwork | None = None,
        wait: bool = True,
        twin_of: DUT | None = None,
    ) -> DUT:
        if twin_of is not None:
            if config_overrides or boot_files or media or lab:
                raise ValueError(f"a twin of {twin_of.name} takes its config, boot files and media from it")
            config_overrides, boot_files, media = twin_of.config_overrides, twin_of.boot_files, twin_of.media
        device = testbed_state.new_device(
            name, config_overrides=config_overrides, boot_files=boot_files, media=media,
            lab_nics=[lab.attach()] if lab is not None else None,
        )  # fmt: skip
        made.append(device)
        if twin_of is not None:
            twin_of.copy_to(device)
            return device  # off: device.restore(snapshot) starts it
        device.power_on(wait=wait)
        if wait:
            testbed_state.note_facts(device)  # when the session's own ``dut`` is not booted in this run
        return device  # without wait: booting, finish with device.finish_power_on()

    yield make
    try:
        testbed_state.hold()
    finally:
        for device in made:
            device.close()


@pytest.fixture(scope="session")
def device_capabilities(device_profile: Profile) -> frozenset[str]:
    """The capabilities a machine of this run's profile has, before one is made."""
    return provides(device_profile)


@pytest.fixture(scope="session")
def lab_network(device_profile: Profile) -> Iterator[LabNetwork]:
    """The farm's lab network for this session: DHCP, DNS and NTP served from a private namespace.

    Devices join it through ``dut_factory(..., lab=lab_network)``. Creating it needs root
    (a network namespace and a tap); without it the tests that need the farm end in a
    ConfigError that says so.
    """
    with LabNetwork(timeout=device_profile.timeouts.lab_services) as lab:
        yield lab


@pytest.fixture
def fresh_dut(dut: DUT) -> DUT:
    """The device as it was right after its first boot.

    On QEMU a snapshot restore (about a second). A board has no snapshots: it is flashed
    again and cold-booted, the only honest way back to a first boot (minutes on an SD card).
    """
    dut.restore("ready")
    return dut


@pytest.fixture(autouse=True)
def _testbed_start_early(request: pytest.FixtureRequest) -> None:
    """Devices that ``testbed.schedule`` starts before a check needs them."""
    schedule.start_early(request)
