"""The pytest plugin: options, the ``dut`` fixture, evidence capture and the run report."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import testbed
from testbed import report as rep
from testbed.dut import DUT
from testbed.errors import ConfigError, DutError, InfraError
from testbed.lab.network import LabNetwork
from testbed.profile import Profile, apply_board_overrides, load_profile

DEFAULT_DEVICE = "qemu-x86_64"
STATE_KEY = pytest.StashKey["TestbedState"]()


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
        choices=["development", "production"],
        default=None,
        help="set developmentMode in the booted copy's config.json (default: as the image has it)",
    )
    group.addoption(
        "--hup-bundle",
        default=None,
        help="host OS update bundle for the hup suite (default: the reference recipe built as a newer version)",
    )
    group.addoption(
        "--hup-power-cuts", type=int, default=5, help="power-cut trials of the hup suite (default %(default)s)"
    )
    group.addoption(
        "--hup-seed", type=int, default=None, help="seed of the power-cut moments (default: random, reported)"
    )
    group.addoption(
        "--report-dir", default="reports", help="where runs write reports/<device>/<run-id>/ (default: reports)"
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
    board.addoption("--boot-stages", action="store_true", help="print boot stages (power on, firmware, kernel, ...)")


class TestbedState:
    """What one pytest session knows about its device, image and results."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.device_name: str = config.getoption("--device") or DEFAULT_DEVICE
        self.image_option: str | None = config.getoption("--image")
        self.profile: Profile | None = None
        self.image: Path | None = None
        self.image_format = "raw"
        self.image_sha256 = ""
        self.run_dir: Path | None = None
        self.run_id = ""
        self.started = ""
        self.dut: DUT | None = None
        self.facts: dict[str, Any] = {}
        self.tests: dict[str, rep.TestRecord] = {}
        self.current: rep.TestRecord | None = None

    # -- resolution (errors here are the user's to fix) ---------------------------------
    def resolve_profile(self) -> Profile:
        if self.profile is None:
            opt = self.config.getoption
            self.profile = apply_board_overrides(
                load_profile(self.device_name),
                serial=opt("--serial"),
                relay=opt("--relay"),
                flash_to=opt("--flash-to"),
                ssh_host=opt("--ssh-host"),
                lock_wait=opt("--lock-wait"),
            )
        return self.profile

    def resolve_image(self) -> Path:
        if self.image is None:
            from testbed import image as img

            if self.image_option:
                path = Path(self.image_option).expanduser()
                self.image_format = img.image_format(path)
                self.image = path.resolve()
            else:
                from testbed import reference

                self._say("building the reference image (cached after the first build)")
                self.image = reference.build(log=self._say)
                self.image_format = "raw"
        return self.image

    def say_stage(self, stage: str, seconds: float | None, detail: str) -> None:
        """One boot stage as it happens (``--boot-stages``): ``testbed: [  5.3s] kernel  Linux version ...``."""
        when = f"{seconds:6.1f}s" if seconds is not None else "       "
        self._say(f"[{when}] {stage:9} {detail}".rstrip())
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        flush = getattr(tr, "flush", None)
        if flush is not None:
            flush()

    def _say(self, text: str) -> None:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"testbed: {text}")

    # -- the run directory ------------------------------------------------------------
    def open_run(self) -> Path:
        if self.run_dir is None:
            profile = self.resolve_profile()
            self.started = datetime.now(UTC).isoformat(timespec="seconds")
            self.run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)
            report_root = Path(self.config.getoption("--report-dir"))
            self.run_dir = report_root / profile.name / self.run_id
            self.run_dir.mkdir(parents=True)
        return self.run_dir

    def evidence(self, item: dict[str, Any]) -> None:
        if self.current is not None:
            self.current.evidence.append(item)

    def write_report(self) -> str:
        assert self.run_dir is not None and self.profile is not None
        from testbed import image as img

        if self.image is not None and not self.image_sha256:
            self.image_sha256 = img.sha256_file(self.image)
        if self.image is not None and "partitions" not in self.facts:
            try:
                layout = img.read_layout(self.image)
                self.facts["partition_table"] = layout.table
                self.facts["partitions"] = [
                    {"label": p.label or p.name, "fstype": p.fstype, "size": p.size} for p in layout.partitions
                ]
            except ConfigError:
                pass
        tests = list(self.tests.values())
        result = rep.overall_result(tests)
        boots = self.dut.boots if self.dut else []
        cold = next((b for b in boots if b.kind == "cold"), None)
        report = {
            "schema": rep.SCHEMA_VERSION,
            "device": self.profile.name,
            "run_id": self.run_id,
            "image": {"path": str(self.image or ""), "sha256": self.image_sha256, "format": self.image_format},
            "started": self.started,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "result": result,
            "counts": rep.counts(tests),
            "facts": self.facts,
            "timings": {
                "boot_to_ssh_s": cold.ssh_ready_s if cold else None,
                "boots": [b.as_dict() for b in boots],
            },
            "tests": [t.as_dict() for t in tests],
            "testbed": {"version": testbed.__version__, "host": socket.gethostname()},
        }
        rep.write_json(self.run_dir / "report.json", report)
        rep.write_junit(self.run_dir / "junit.xml", report)
        rep.point_latest(self.run_dir)
        try:
            from testbed.report.html import render_html

            render_html(self.run_dir)
        except Exception as exc:  # noqa: BLE001 - a rendering bug must not change the verdict
            self._say(f"report.html not written: {type(exc).__name__}: {exc}")
        return result


def _fail_usage(exc: ConfigError) -> None:
    raise pytest.UsageError(str(exc))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fresh: the test needs a device restored to its first-boot snapshot")
    state = TestbedState(config)
    config.stash[STATE_KEY] = state
    # Explicit options are checked before anything runs: one line, no traceback.
    try:
        if config.getoption("--device") or any(
            config.getoption(o) is not None for o in ("--serial", "--relay", "--flash-to", "--ssh-host")
        ):
            state.resolve_profile()
        if config.getoption("--image"):
            state.resolve_image()
    except ConfigError as exc:
        _fail_usage(exc)


def _state(config: pytest.Config) -> TestbedState:
    return config.stash[STATE_KEY]


@pytest.fixture(scope="session")
def testbed_state(pytestconfig: pytest.Config) -> TestbedState:
    return _state(pytestconfig)


@pytest.fixture(scope="session")
def device_profile(testbed_state: TestbedState) -> Profile:
    """The device profile of this run: expectations come from here, not from the tests."""
    try:
        return testbed_state.resolve_profile()
    except ConfigError as exc:
        pytest.exit(f"testbed: {exc}", returncode=rep.EXIT_USAGE)


@dataclass(frozen=True)
class ImageUnderTest:
    """The image file under test, for offline checks before (or without) a boot."""

    path: Path
    format: str


@pytest.fixture(scope="session")
def image_under_test(testbed_state: TestbedState) -> ImageUnderTest:
    try:
        path = testbed_state.resolve_image()
    except ConfigError as exc:
        pytest.exit(f"testbed: {exc}", returncode=rep.EXIT_USAGE)
    testbed_state.open_run()
    return ImageUnderTest(path, testbed_state.image_format)


class OfflineEvidence:
    """Records an offline check (reading the image file) as evidence, like a command."""

    def __init__(self, state: TestbedState) -> None:
        self._state = state

    def __call__(self, what: str, output: str, ok: bool = True) -> None:
        self._state.evidence(
            {
                "transport": "offline",
                "command": what,
                "exit_code": 0 if ok else 1,
                "stdout": output,
                "stderr": "",
                "started": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "duration_s": 0.0,
            }
        )


@pytest.fixture
def offline_evidence(testbed_state: TestbedState) -> OfflineEvidence:
    return OfflineEvidence(testbed_state)


@pytest.fixture(scope="session")
def dut_booting(testbed_state: TestbedState, device_profile: Profile) -> Iterator[DUT]:
    """The session's device, powered on and not waited for: ``dut`` waits for it.

    Requesting this before ``dut`` lets the device boot while other work goes on (a suite
    that also boots a second device starts both at once).
    """
    try:
        image = testbed_state.resolve_image()
    except ConfigError as exc:
        pytest.exit(f"testbed: {exc}", returncode=rep.EXIT_USAGE)
    run_dir = testbed_state.open_run()
    mode = testbed_state.config.getoption("--mode")
    device = DUT(
        profile=device_profile,
        image=image,
        image_format=testbed_state.image_format,
        console_log_path=run_dir / "console.log",
        config_overrides={"developmentMode": mode == "development"} if mode else {},
    )
    testbed_state.dut = device
    device.sink = testbed_state.evidence
    if testbed_state.config.getoption("--boot-stages"):
        device.stage_listener = testbed_state.say_stage
    try:
        if device.machine.accel_note:
            testbed_state._say(f"{device.machine.accel_note}; using {device.machine.accel}")
        device.power_on(wait=False)
        yield device
    finally:
        if not testbed_state.facts:
            testbed_state.facts = device.machine.facts()
        device.close()


@pytest.fixture(scope="session")
def dut(testbed_state: TestbedState, dut_booting: DUT) -> DUT:
    """The device under test, booted once for the session and snapshotted when ready.

    Tests that change the device should use ``fresh_dut`` (a snapshot restore).
    """
    device = dut_booting
    boot = device.finish_power_on()
    testbed_state._say(f"{device.name} ready over SSH {boot.ssh_ready_s:.1f}s after power on ({device.machine.accel})")
    testbed_state.facts = device.facts()
    device.save_snapshot("ready")
    return device


@pytest.fixture(scope="session")
def dut_factory(testbed_state: TestbedState, device_profile: Profile) -> Iterator[Callable[..., DUT]]:
    """Boot more devices from the same image with their own config.json and boot files.

    ``make(name, config_overrides={...}, boot_files={"/system-connections/x": b"..."}, lab=lab_network)``
    returns a booted DUT (its own overlay, console log ``console-<name>.log``; with ``lab``, a
    second NIC on the farm's lab network); all are closed at the end of the session. For
    checks of what an image does with a config given before its first boot. With
    ``wait=False`` the device is returned while it boots (``device.finish_power_on()`` waits),
    so that it boots while something else runs. ``make(name, twin_of=device)`` returns a
    device that is off, with a copy of ``device``'s disks, snapshots and config.json (QEMU
    only): it starts with ``restore(snapshot)``, so a second device costs no boot and no set-up.
    """
    board = device_profile.board
    if device_profile.kind == "board" and board is not None and board.bench != "virtual":
        # One board, held by the session's `dut`: a second device needs a second board.
        pytest.skip(f"{device_profile.name}: booting a second device needs a second board (QEMU and the virtual bench)")
    made: list[DUT] = []
    mode = testbed_state.config.getoption("--mode")

    def make(
        name: str,
        config_overrides: dict[str, Any] | None = None,
        boot_files: dict[str, bytes] | None = None,
        media: dict[str, Path] | None = None,
        lab: LabNetwork | None = None,
        wait: bool = True,
        twin_of: DUT | None = None,
    ) -> DUT:
        image = testbed_state.resolve_image()
        run_dir = testbed_state.open_run()
        overrides = {"developmentMode": mode == "development"} if mode else {}
        if twin_of is not None:
            if config_overrides or boot_files or media or lab:
                raise InfraError(f"a twin of {twin_of.name} takes its config, boot files and media from it")
            config_overrides, boot_files, media = twin_of.config_overrides, twin_of.boot_files, twin_of.media
        device = DUT(
            profile=device_profile,
            image=image,
            image_format=testbed_state.image_format,
            console_log_path=run_dir / f"console-{name}.log",
            name=f"{device_profile.name}-{name}",
            config_overrides={**overrides, **(config_overrides or {})},
            boot_files=boot_files or {},
            media=dict(media or {}),
            lab_nics=[lab.attach()] if lab is not None else [],
        )
        device.sink = testbed_state.evidence
        made.append(device)
        if twin_of is not None:
            twin_of.copy_to(device)
            return device  # off: device.restore(snapshot) starts it
        device.power_on(wait=wait)
        if not wait:
            return device  # booting: finish with device.finish_power_on()
        if not testbed_state.facts:
            # The report's device facts, when the session's own ``dut`` is not booted in this run.
            testbed_state.facts = device.facts()
        return device

    yield make
    for device in made:
        device.close()


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


DEVICE_FIXTURES = {"dut", "fresh_dut", "dut_factory", "lab_network"}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Offline checks (the image file alone) run first: a broken image fails fast, before any boot."""
    items.sort(key=lambda item: bool(DEVICE_FIXTURES & set(getattr(item, "fixturenames", ()))))


# -- evidence and outcomes ----------------------------------------------------------------
def pytest_runtest_setup(item: pytest.Item) -> None:
    state = _state(item.config)
    record = state.tests.setdefault(item.nodeid, rep.TestRecord(nodeid=item.nodeid))
    state.current = record


def _classify(excinfo: pytest.ExceptionInfo[BaseException] | None) -> str:
    if excinfo is None:
        return ""
    if excinfo.errisinstance(InfraError):
        return "infra"
    if excinfo.errisinstance(ConfigError):
        return "config"
    if excinfo.errisinstance(DutError):
        return "dut"
    if excinfo.errisinstance(AssertionError):
        return "assertion"
    return "other"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    state = _state(item.config)
    record = state.tests.setdefault(item.nodeid, rep.TestRecord(nodeid=item.nodeid))
    record.duration_s += report.duration
    if report.passed:
        return
    kind = _classify(call.excinfo)
    if report.skipped:
        record.outcome = "skipped"
        record.message = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return
    text = _message(call.excinfo, report)
    # The device's fault is a failure wherever it shows; the lab's (or the user's) is an error.
    lab_fault = kind in ("infra", "config") or (kind == "other" and report.when != "call")
    if record.outcome != "failed":
        record.outcome = "error" if lab_fault else "failed"
    record.kind = kind
    record.message = (record.message + "\n" + text).strip() if record.message else text
    if kind == "infra" and report.when == "call":
        report.outcome = "failed"
        report.user_properties.append(("testbed_kind", "infra"))


def _message(excinfo: pytest.ExceptionInfo[BaseException] | None, report: pytest.TestReport) -> str:
    if excinfo is not None and isinstance(excinfo.value, (DutError, InfraError, ConfigError)):
        return f"{type(excinfo.value).__name__}: {excinfo.value}"
    if excinfo is not None and excinfo.errisinstance(AssertionError):
        return str(excinfo.value) or report.longreprtext[-3000:]
    return report.longreprtext[-3000:]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = _state(session.config)
    state.current = None
    if state.run_dir is None:
        return
    result = state.write_report()
    if exitstatus in (0, 1):
        session.exitstatus = rep.exit_code_for(result)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = _state(config)
    if state.run_dir is None:
        return
    boots = state.dut.boots if state.dut else []
    cold = next((b.ssh_ready_s for b in boots if b.kind == "cold" and b.ssh_ready_s), None)
    tests = list(state.tests.values())
    result = rep.overall_result(tests)
    c = rep.counts(tests)
    terminalreporter.write_sep("-", "testbed")
    terminalreporter.write_line(
        f"{state.device_name}: {result.upper()}  ({c['passed']} passed, {c['failed']} failed, "
        f"{c['error']} infra errors, {c['skipped']} skipped)" + (f"; boot to SSH {cold:.1f}s" if cold else "")
    )
    terminalreporter.write_line(f"report: {state.run_dir}/report.html  (report.json, junit.xml, console.log)")
