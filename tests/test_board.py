"""The Board machine: profiles and overrides, the serial console through pyserial, lab faults, and
the virtual bench (QEMU behind a pty serial adapter, an LCUS relay emulator and a loop device).

Where a board cannot exist in a test, a pty stands in for its UART and the relay emulator
for its relay module; both speak the real protocols to the real drivers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.console import Console, ConsoleLog, SerialTransport
from testbed.dut import open_dut
from testbed.errors import ConfigError, InfraError
from testbed.machines import make_machine
from testbed.machines.board import BoardMachine
from testbed.power.emulator import RelayEmulator
from testbed.power.serial_relay import frame
from testbed.profile import (
    BoardSettings,
    BoardSshSettings,
    Profile,
    SerialSettings,
    Timeouts,
    apply_board_overrides,
    load_profile,
    parse_power_option,
)
from testbed.util import free_port, wait_until

HERE = Path(__file__).parent
REPO = HERE.parent


def require_tools(*tools: str) -> None:
    """As tests/conftest.py: fail with CI=true, skip elsewhere, when a host tool is missing."""
    import shutil

    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        message = f"needs {', '.join(missing)} on PATH (install with ./run, see README)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)


@pytest.fixture(autouse=True)
def private_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_LOCK_DIR", str(tmp_path / "locks"))


# --- profiles and command-line overrides -----------------------------------------------------


def test_board_profiles_load() -> None:
    for name in ("raspberrypi4-64", "generic-x86-64-board", "virtual-board"):
        profile = load_profile(name)
        assert profile.kind == "board" and profile.board is not None
    assert load_profile("virtual-board").board.bench == "virtual"  # type: ignore[union-attr]
    assert load_profile("raspberrypi4-64").board.power["driver"] == "serial-relay"  # type: ignore[union-attr,index]


def test_a_misspelled_board_key_is_named_with_the_fix(tmp_path: Path) -> None:
    text = (
        (REPO / "device_profiles" / "raspberrypi4-64.yaml")
        .read_text()
        .replace("    baudrate: 115200", "    baud: 115200")
    )
    path = tmp_path / "raspberrypi4-64.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"unknown key 'board.serial.baud' \(did you mean 'baudrate'\?\)"):
        load_profile(str(path))
    path.write_text(text.replace("kind: board", "kind: board\nboard_: {}").split("board:\n")[0] + "\n")
    with pytest.raises(ConfigError):
        load_profile(str(path))


def test_ports_are_overridden_from_the_command_line() -> None:
    profile = apply_board_overrides(
        load_profile("raspberrypi4-64"),
        serial="/dev/ttyUSB0@921600",
        relay="serial-relay:/dev/ttyUSB1:2",
        flash_to="/dev/sdx",
        ssh_host="192.0.2.10:2222",
        lock_wait=30,
    )
    board = profile.board
    assert board is not None
    assert (board.serial.url, board.serial.baudrate) == ("/dev/ttyUSB0", 921600)  # type: ignore[union-attr]
    assert board.power == {"driver": "serial-relay", "port": "/dev/ttyUSB1", "channel": 2}
    assert board.flash == {"driver": "blockdev", "device": "/dev/sdx"}
    assert (board.ssh.host, board.ssh.port, board.lock_wait) == ("192.0.2.10", 2222, 30)
    assert parse_power_option("serial-relay:rfc2217://lab:4001:3") == {
        "driver": "serial-relay",
        "port": "rfc2217://lab:4001",
        "channel": 3,
    }
    assert parse_power_option("hid-relay:HURTM:2") == {"driver": "hid-relay", "serial": "HURTM", "channel": 2}
    assert parse_power_option("command:on=relayctl on,off=relayctl off") == {
        "driver": "command",
        "on": "relayctl on",
        "off": "relayctl off",
    }
    with pytest.raises(ConfigError, match="serial-relay:PORT:CHANNEL"):
        parse_power_option("serial-relay:/dev/ttyUSB1")
    with pytest.raises(ConfigError, match="kind 'qemu'"):
        apply_board_overrides(load_profile("qemu-x86_64"), serial="/dev/ttyUSB0")
    with pytest.raises(ConfigError, match="virtual bench"):
        apply_board_overrides(load_profile("virtual-board"), serial="/dev/ttyUSB0")


def test_the_machine_follows_the_profile_kind(tmp_path: Path) -> None:
    log = ConsoleLog(tmp_path / "console.log")
    machine = make_machine(load_profile("raspberrypi4-64"), tmp_path / "os.img", log)
    try:
        assert isinstance(machine, BoardMachine)
        assert machine.capabilities.snapshots is None and machine.capabilities.reflash is machine
        with pytest.raises(ConfigError, match="set board.ssh.host"):
            machine.endpoint("ssh")
        assert machine.endpoint("ssh", "rpi-desk") == ("rpi-desk.local", 22222)
    finally:
        machine.close()


# --- a board stand-in: a pty UART and the LCUS relay emulator --------------------------------


class FakeBoard:
    """A pty for the board's UART and a relay emulator for its relay; power on prints ``boot_text``."""

    def __init__(self, boot_text: bytes, *, relay_answers: bool = True) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self.boot_text = boot_text
        self.relay = RelayEmulator(channels=1, on_change=self._power, answer_status=relay_answers)

    def _power(self, channel: int, on: bool) -> None:
        if on:
            os.write(self.master, self.boot_text)

    def profile(self, **timeouts: float) -> Profile:
        base = load_profile("raspberrypi4-64")
        board = BoardSettings(
            serial=SerialSettings(url=self.port),
            power={"driver": "serial-relay", "port": self.relay.port, "channel": 1, "verify": True, "off_seconds": 0},
            flash=None,
            ssh=BoardSshSettings(host="127.0.0.1", port=free_port()),
        )
        return base.model_copy(update={"board": board, "timeouts": Timeouts(**timeouts)})

    def close(self) -> None:
        self.relay.close()
        for fd in (self.master, self.slave):
            os.close(fd)


@pytest.fixture
def fake_board() -> Iterator[FakeBoard]:
    board = FakeBoard(b"\r\nU-Boot 2024.01 (Jan 01 2024)\r\nDRAM:  4 GiB\r\nHit any key to stop autoboot:  0\r\n")
    yield board
    board.close()


def _null_modem(a: int, b: int, stop: threading.Event) -> None:
    """Copy bytes both ways between two pty masters: a serial cable between two ttys."""
    import select

    while not stop.is_set():
        ready, _, _ = select.select([a, b], [], [], 0.2)
        for src in ready:
            try:
                data = os.read(src, 4096)
            except OSError:
                return
            os.write(b if src == a else a, data)


def test_serial_console_through_pyserial_logs_in_and_runs(tmp_path: Path) -> None:
    """The console code QEMU uses, over pyserial on a tty, with a real bash behind a getty on another tty."""
    board_master, board_slave = os.openpty()
    host_master, host_slave = os.openpty()
    tty.setraw(host_slave)
    getty = subprocess.Popen(
        [str(HERE / "fake_getty.sh")], stdin=board_slave, stdout=board_slave, stderr=board_slave,
        start_new_session=True,
    )  # fmt: skip
    os.close(board_slave)
    stop = threading.Event()
    cable = threading.Thread(target=_null_modem, args=(board_master, host_master, stop), daemon=True)
    cable.start()
    log = ConsoleLog(tmp_path / "console.log")
    log.open()
    console = Console(SerialTransport(os.ttyname(host_slave), 115200), log, name="pty serial")
    try:
        console.login("root", r"login: ?$", timeout=10)
        result = console.run("echo over pyserial; false", timeout=10)
        assert (result.exit_code, result.stdout, result.transport) == (1, "over pyserial\n", "serial")
        with pytest.raises(InfraError, match="in use|lock"):
            SerialTransport(os.ttyname(host_slave), 115200)  # opened exclusively: never two runs on one port
    finally:
        getty.kill()
        getty.wait()
        console.close()
        log.close()
        stop.set()
        cable.join(5)
        for fd in (board_master, host_master, host_slave):
            os.close(fd)


def test_serial_console_over_a_socket_url(tmp_path: Path) -> None:
    """``socket://`` (a serial server): the same console, another transport."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        received = b""

        def until(text: bytes) -> None:
            nonlocal received
            while text not in received:
                chunk = conn.recv(4096)
                if not chunk:
                    raise EOFError
                received += chunk
            received = received.split(text, 1)[1]

        with conn:
            conn.sendall(b"board ttyS0\r\n\r\nboard login: ")
            # As a getty does: an empty line gets the prompt again.
            while b"root\r" not in received:
                chunk = conn.recv(4096)
                if not chunk:
                    raise EOFError
                received += chunk
                if received.endswith(b"\r") and not received.endswith(b"root\r"):
                    conn.sendall(b"\r\nboard login: ")
            until(b"root\r")
            conn.sendall(b"\r\nroot@board:~# ")
            until(b"unset PROMPT_COMMAND\r")
            conn.sendall(b"\r\nTB-SH# ")
            until(b"never sent")

    def serve_quietly() -> None:
        try:
            serve()
        except (EOFError, OSError):
            pass

    thread = threading.Thread(target=serve_quietly, daemon=True)
    thread.start()
    log = ConsoleLog(tmp_path / "console.log")
    log.open()
    console = Console(SerialTransport(f"socket://127.0.0.1:{port}", 115200), log, name="serial server")
    try:
        console.login("root", r"login: ?$", timeout=10)
        assert console.logged_in
    finally:
        console.close()
        log.close()
        server.close()
    thread.join(5)


def test_serial_adapter_unplugged_while_waiting_is_an_infra_error_with_the_tail(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    log = ConsoleLog(tmp_path / "console.log")
    log.open()
    console = Console(SerialTransport(os.ttyname(slave), 115200), log, name="pty serial")
    os.close(slave)
    os.write(master, b"Starting kernel ...\r\n")
    wait_until(lambda: "Starting kernel" in console.tail(), 5, "the line to arrive")
    os.close(master)  # the adapter is gone
    try:
        with pytest.raises(InfraError) as err:
            console.expect("login:", timeout=30, what="a login prompt")
        message = str(err.value)
        assert "serial adapter" in message and "failed while reading" in message, message
        assert "Starting kernel ..." in message
    finally:
        console.close()
        log.close()


def test_a_relay_that_does_not_answer_is_an_infra_error(fake_board: FakeBoard, tmp_path: Path) -> None:
    silent = FakeBoard(b"", relay_answers=False)
    log = ConsoleLog(tmp_path / "console.log")
    log.open()
    machine = BoardMachine(silent.profile(), tmp_path / "unused.img", log)
    machine.flashed = True  # nothing to write: the test is about the relay
    try:
        t0 = time.monotonic()
        with pytest.raises(InfraError) as err:
            machine.power_on()
        assert time.monotonic() - t0 < 10
        message = str(err.value)
        assert "did not report channel 1" in message and "last console lines" in message, message
        assert not machine.is_on() and machine.console is None
        assert silent.relay.frames == [frame(1, True)]
    finally:
        machine.close()
        log.close()
        silent.close()


def test_the_lock_keeps_a_second_run_off_the_board(fake_board: FakeBoard, tmp_path: Path) -> None:
    log = ConsoleLog(tmp_path / "console.log")
    profile = fake_board.profile()
    first = BoardMachine(profile, tmp_path / "unused.img", log)
    try:
        with pytest.raises(InfraError, match=rf"in use by pid {os.getpid()}"):
            BoardMachine(profile, tmp_path / "unused.img", log)
    finally:
        first.close()
    BoardMachine(profile, tmp_path / "unused.img", log).close()


@pytest.fixture(scope="module")
def reference_image(qemu_tools: None) -> Path:
    from testbed import reference

    return reference.build(log=lambda _line: None)


def test_a_board_that_never_starts_a_kernel_fails_at_the_named_timeout(
    fake_board: FakeBoard, reference_image: Path, tmp_path: Path
) -> None:
    dut = open_dut(
        fake_board.profile(boot_to_login=3, boot_to_ssh=60), reference_image, "raw", tmp_path / "console.log"
    )
    try:
        t0 = time.monotonic()
        with pytest.raises(InfraError) as err:
            dut.power_on()
        assert time.monotonic() - t0 < 30
        message = str(err.value)
        assert "timeouts.boot_to_login" in message and "no kernel followed" in message, message
        assert "U-Boot 2024.01" in message  # the console tail
        assert dut.boots[-1].firmware_s is not None
    finally:
        dut.close()


# --- the virtual bench: real QEMU, pty adapter, relay emulator, loop device ----------------


def _bench_tools() -> None:
    require_tools("qemu-system-x86_64", "qemu-img", "mcopy")
    if not os.access("/dev/loop-control", os.R_OK | os.W_OK):
        message = "the virtual bench needs loop devices (/dev/loop-control, root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)


def _attached_loops() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def test_a_killed_owner_leaves_no_loop_device_behind(tmp_path: Path) -> None:
    _bench_tools()
    code = (
        "import sys; from pathlib import Path; from testbed.machines.virtual_bench import LoopDisk;"
        "d = LoopDisk(64 << 20, Path(sys.argv[1])); print(d.path, flush=True); sys.stdin.readline()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    loop = proc.stdout.readline().strip()
    assert re.fullmatch(r"/dev/loop\d+", loop)
    backing = str(tmp_path / "sdcard.img")
    assert backing in _attached_loops()
    assert not (tmp_path / "sdcard.img").exists()  # unlinked at once: no file to leak
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until(lambda: backing not in _attached_loops(), 10, f"{loop} to be detached after its owner died")


def test_smoke_command_on_the_virtual_board_with_power_cut_and_serial_faults(tmp_path: Path) -> None:
    """One boot of the virtual board: the smoke suite, then the fault checks of tests/bench_checks.py
    (serial adapter pulled out mid-run, power cut through the relay and back) in the same session."""
    _bench_tools()
    report_dir = tmp_path / "reports"
    proc = subprocess.run(
        [
            sys.executable, "-m", "testbed", "smoke", "--device", "virtual-board", "--mode", "development",
            "--report-dir", str(report_dir), "--", str(HERE / "bench_checks.py"), "-p", "no:randomly",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TESTBED_LOCK_DIR": str(tmp_path / "locks")},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # The boot stages, live, then the verdict.
    for stage in ("flashed", "power on", "firmware", "kernel", "login", "ssh ready"):
        assert re.search(rf"testbed: \[[ \d.s]*\] {stage}\b", out), f"no {stage!r} stage line in:\n{out[-4000:]}"
    assert "smoke virtual-board: PASSED" in out and "boot: firmware" in out, out[-3000:]
    report = json.loads(next(report_dir.glob("virtual-board/*/report.json")).read_text())
    outcomes = {t["nodeid"].split("::")[-1]: t["outcome"] for t in report["tests"]}
    assert outcomes["test_ssh_answers_on_22222"] == "passed"
    assert outcomes["test_serial_adapter_pulled_out_mid_run_is_an_infra_error"] == "passed"
    assert outcomes["test_power_cut_through_the_relay_and_the_board_comes_back"] == "passed"
    assert set(outcomes.values()) == {"passed"}, outcomes
    assert report["facts"]["machine"] == "board" and report["facts"]["flash"]["verified"] is True
    # Everything the bench made is gone: QEMU, the loop device, its private directory.
    bench_dir = str(Path(report["facts"]["serial"]).parent)
    assert "testbed-bench-" in bench_dir and not Path(bench_dir).exists()
    assert bench_dir not in _attached_loops()
    assert bench_dir not in subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    print(out)  # the smoke command's own output, for -rP or -s


def test_the_accelerator_probe_returns_when_qemu_dies_before_answering() -> None:
    """The virtual bench probes KVM as QEMU does; a QEMU gone before its QMP greeting must not hang it."""
    from testbed.machines.qemu import probe_guest

    _bench_tools()
    profile = load_profile("virtual-board")
    assert profile.qemu is not None
    dying = profile.model_copy(update={"qemu": profile.qemu.model_copy(update={"binary": "false"})})
    t0 = time.monotonic()
    ok, why = probe_guest(dying, "kvm", 8)
    assert not ok and "did not start" in why
    assert time.monotonic() - t0 < 8


def test_nothing_of_the_bench_outlives_a_killed_pytest(tmp_path: Path) -> None:
    """kill -9 of a run on the virtual bench: its QEMU dies with it and its loop device is detached."""
    _bench_tools()
    runtime = tmp_path / "rt"
    runtime.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "suites/smoke", "--device", "virtual-board",
         "--report-dir", str(tmp_path / "r")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TESTBED_RUNTIME_DIR": str(runtime), "TESTBED_LOCK_DIR": str(tmp_path / "locks")},
    )  # fmt: skip

    def bench_qemu() -> list[str]:
        out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
        # The bench's QEMU, not the accelerator probe's (which also runs in the runtime directory).
        return [line.split()[0] for line in out.splitlines() if "testbed-bench-" in line and str(runtime) in line]

    try:
        # QEMU starts once the image is flashed and the relay switched on.
        wait_until(bench_qemu, 300, "the bench's QEMU to start under pytest")
        assert str(runtime) in _attached_loops()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        wait_until(lambda: not bench_qemu(), 15, "QEMU to exit after its pytest was killed")
        wait_until(lambda: str(runtime) not in _attached_loops(), 15, "the loop device to be detached")
    finally:
        proc.kill()
        proc.wait()
