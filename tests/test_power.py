"""Power drivers: the serial relay against the pty relay emulator, HID report bytes,
GPIO without a chip, commands, the person at the desk, and profile spec errors."""

from __future__ import annotations

import os
import pty
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import serial

from testbed.errors import ConfigError, InfraError
from testbed.power import DRIVERS, CommandPower, GpioPower, HidRelay, ManualPower, Power, SerialRelay, make_power
from testbed.power.emulator import RelayEmulator
from testbed.power.hid_relay import parse_state_report

WAIT = 5.0  # seconds an event may take before a test fails; never slept


# The frames written out by hand from the LCUS protocol: A0, channel, state, (A0+channel+state) & 0xFF.
CH1_ON = bytes.fromhex("a0 01 01 a2")
CH1_OFF = bytes.fromhex("a0 01 00 a1")
CH2_ON = bytes.fromhex("a0 02 01 a3")
CH2_OFF = bytes.fromhex("a0 02 00 a2")
CH4_ON = bytes.fromhex("a0 04 01 a5")
CH4_OFF = bytes.fromhex("a0 04 00 a4")


@pytest.fixture
def changes() -> queue.Queue[tuple[int, bool]]:
    return queue.Queue()


@pytest.fixture
def emulator(changes: queue.Queue[tuple[int, bool]]):
    emu = RelayEmulator(channels=4, on_change=lambda ch, on: changes.put((ch, on)))
    yield emu
    emu.close()


def next_change(changes: queue.Queue[tuple[int, bool]]) -> tuple[int, bool]:
    return changes.get(timeout=WAIT)


def wait_frames(emu: RelayEmulator, count: int) -> None:
    emu.wait_for(lambda: len(emu.frames) >= count, WAIT, f"{count} frames")


# --- serial relay over a real pty ---------------------------------------------------------------


def test_serial_relay_sends_exact_frames_on_several_channels(emulator, changes):
    relays = {ch: SerialRelay(port=emulator.port, channel=ch, off_seconds=0) for ch in (1, 2, 4)}
    try:
        relays[1].on()
        relays[2].on()
        relays[4].on()
        relays[2].off()
        relays[1].off()
        relays[4].off()
        wait_frames(emulator, 6)
        assert emulator.frames == [CH1_ON, CH2_ON, CH4_ON, CH2_OFF, CH1_OFF, CH4_OFF]
        assert emulator.rejected == []
        assert [next_change(changes) for _ in range(6)] == [
            (1, True),
            (2, True),
            (4, True),
            (2, False),
            (1, False),
            (4, False),
        ]
        assert not any(emulator.state(ch) for ch in (1, 2, 3, 4))
    finally:
        for relay in relays.values():
            relay.close()


def test_serial_relay_cycle_and_cut(emulator, changes):
    relay = SerialRelay(port=emulator.port, channel=3, off_seconds=0)
    relay.on()
    relay.cycle()
    relay.cut()
    wait_frames(emulator, 4)
    on, off = bytes.fromhex("a0 03 01 a4"), bytes.fromhex("a0 03 00 a3")
    assert emulator.frames == [on, off, on, off]
    assert [next_change(changes) for _ in range(4)] == [(3, True), (3, False), (3, True), (3, False)]
    relay.close()


def test_callback_only_on_change(emulator, changes):
    relay = SerialRelay(port=emulator.port, channel=1)
    relay.on()
    relay.on()  # already on: a frame on the wire, but the relay does not move
    relay.off()
    wait_frames(emulator, 3)
    assert emulator.frames == [CH1_ON, CH1_ON, CH1_OFF]
    assert next_change(changes) == (1, True)
    assert next_change(changes) == (1, False)
    assert changes.empty()
    relay.close()


def test_emulator_ignores_bad_frames_like_the_hardware(emulator, changes):
    with serial.serial_for_url(emulator.port, baudrate=9600) as port:
        port.write(bytes.fromhex("a0 01 01 a3"))  # bad checksum
        port.write(bytes.fromhex("55 aa"))  # line noise, no start byte
        port.write(bytes.fromhex("a0 09 01 aa"))  # channel 9 on a 4-channel module
        port.write(bytes.fromhex("a0 02"))  # truncated frame, then directly a good one
        port.write(CH2_ON)
        port.flush()
        wait_frames(emulator, 1)
    assert emulator.frames == [CH2_ON]
    reasons = [reason for _, reason in emulator.rejected]
    assert emulator.rejected[0] == (bytes.fromhex("a0 01 01 a3"), "bad checksum")
    assert "no start byte 0xA0" in reasons
    assert any("no channel 9" in r for r in reasons)
    assert next_change(changes) == (2, True)
    assert changes.empty()
    assert emulator.state(2) and not emulator.state(1)


def test_emulator_survives_failing_and_slow_callbacks():
    calls: queue.Queue[tuple[int, bool]] = queue.Queue()
    release = threading.Event()

    def callback(channel: int, on: bool) -> None:
        calls.put((channel, on))
        if channel == 1:
            raise RuntimeError("the VM could not start")
        if channel == 2:
            release.wait(WAIT)  # a slow bench action must not stall frame parsing

    emu = RelayEmulator(channels=2, on_change=callback)
    relay1 = SerialRelay(port=emu.port, channel=1)
    relay2 = SerialRelay(port=emu.port, channel=2)
    try:
        relay1.on()
        relay2.on()
        assert calls.get(timeout=WAIT) == (1, True)
        assert calls.get(timeout=WAIT) == (2, True)
        # The dispatcher is blocked in the slow callback; the reader still takes frames.
        relay1.off()
        wait_frames(emu, 3)
        assert emu.state(1) is False
        release.set()
        assert calls.get(timeout=WAIT) == (1, False)
        emu.wait_for(lambda: len(emu.callback_errors) == 2, WAIT, "the second callback error")
        assert all(isinstance(e, RuntimeError) for e in emu.callback_errors)
    finally:
        relay1.close()
        relay2.close()
        emu.close()


def test_unplugged_adapter_is_infra_error_naming_the_port(emulator, changes):
    relay = SerialRelay(port=emulator.port, channel=1)
    relay.on()
    assert next_change(changes) == (1, True)
    emulator.close()  # the USB cable is pulled
    with pytest.raises(InfraError) as err:
        relay.off()
    assert emulator.port in str(err.value)
    assert "unplugged" in str(err.value)
    # Not tried again here: the kernel may hand the freed /dev/pts number to another
    # process's pty at once, and a reopen would then write into it.
    relay.close()


def test_missing_port_says_how_to_fix():
    relay = SerialRelay(port="/dev/serial/by-id/usb-testbed-no-such-relay-if00-port0", channel=1)
    with pytest.raises(InfraError) as err:
        relay.on()
    message = str(err.value)
    assert "usb-testbed-no-such-relay" in message
    assert "ls -l /dev/serial/by-id/" in message


def test_unknown_url_scheme_is_config_error():
    with pytest.raises(ConfigError, match="rfc2217://"):
        SerialRelay(port="ftp://relay:23", channel=1).on()


def test_serial_relay_over_socket_url():
    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray()
    try:
        relay = SerialRelay(port=f"socket://127.0.0.1:{server.getsockname()[1]}", channel=2)
        relay.on()
        conn, _ = server.accept()
        with conn:
            conn.settimeout(WAIT)
            while len(received) < 4:
                received += conn.recv(4 - len(received))
            relay.close()
    finally:
        server.close()
    assert bytes(received) == CH2_ON


def test_verify_with_a_module_that_answers_status():
    emu = RelayEmulator(channels=2, answer_status=True)
    relay = SerialRelay(port=emu.port, channel=2, verify=True)
    try:
        relay.on()
        assert relay.query() is True
        relay.off()
        assert relay.query() is False
        assert emu.status_queries == 4
        assert emu.frames == [CH2_ON, CH2_OFF]
    finally:
        relay.close()
        emu.close()


def test_verify_with_a_silent_module_says_to_turn_it_off(emulator):
    relay = SerialRelay(port=emulator.port, channel=1, verify=True, answer_timeout=0.2)
    with pytest.raises(InfraError, match="verify to false"):
        relay.on()
    relay.close()


# --- make_power spec validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {},
            "power: missing key 'driver'; set it to one of: command, gpio, hid-relay, labgrid-network, manual, serial-relay",
        ),
        ({"driver": "serial_relay"}, "unknown driver 'serial_relay' (did you mean 'serial-relay'?)"),
        (
            {"driver": "serial-relay", "port": "/dev/ttyUSB0", "chanel": 1},
            "power driver 'serial-relay': unknown key 'chanel' (did you mean 'channel'?); allowed keys: port, channel",
        ),
        (
            {"driver": "serial-relay", "port": "/dev/ttyUSB0"},
            "power driver 'serial-relay': missing key 'channel'; required keys: port, channel; allowed keys:",
        ),
        (
            {"driver": "serial-relay", "port": "/dev/ttyUSB0", "channel": "1"},
            "power driver 'serial-relay': key 'channel' must be an integer, got '1'",
        ),
        (
            {"driver": "serial-relay", "port": "/dev/ttyUSB0", "channel": True},
            "key 'channel' must be an integer, got True",
        ),
        ({"driver": "serial-relay", "port": "/dev/ttyUSB0", "channel": 0}, "channel must be 1..8"),
        (
            {"driver": "serial-relay", "port": "/dev/ttyUSB0", "channel": 1, "off_seconds": -1},
            "off_seconds must be 0 or more",
        ),
        ({"driver": "hid-relay", "channel": 1, "serial": "ABCDE", "path": "/dev/hidraw0"}, "either serial or path"),
        ({"driver": "hid-relay", "channel": 1, "device": "x"}, "unknown key 'device'"),
        ({"driver": "gpio", "line": 3.5}, "key 'line' must be an integer or a string"),
        ({"driver": "command", "on_command": "true"}, "missing key 'off_command'"),
        (
            {"driver": "command", "on_command": "true", "off_command": ["relayctl", 3]},
            "key 'off_command' must be a string or a list of strings",
        ),
        ({"driver": "command", "on_command": [], "off_command": "true"}, "on_command is empty"),
        ({"driver": "manual", "input": "x"}, "unknown key 'input'"),
        ("serial-relay", "power: expected a mapping with a 'driver' key"),
    ],
)
def test_make_power_spec_errors(spec, expected):
    with pytest.raises(ConfigError) as err:
        make_power(spec)
    assert expected in str(err.value)


def test_make_power_builds_each_driver():
    specs = {
        "serial-relay": {"port": "/dev/ttyUSB0", "channel": 2, "off_seconds": 1},
        "hid-relay": {"channel": 1, "serial": "QAAMZ"},
        "gpio": {"line": "RELAY_1", "chip": "gpiochip1", "active_low": True},
        "command": {"on_command": "pdu on 3", "off_command": ["pdu", "off", "3"]},
        "manual": {"board": "rpi4-lab2"},
        "labgrid-network": {"model": "simplerest", "host": "http://127.0.0.1:9/relay/{index}/{value}", "index": 1},
    }
    assert set(specs) == set(DRIVERS)
    for name, keys in specs.items():
        power = make_power({"driver": name, **keys})
        assert isinstance(power, DRIVERS[name])
        assert isinstance(power, Power)
    gpio = make_power({"driver": "gpio", "line": 17, "chip": "gpiochip1"})
    assert isinstance(gpio, GpioPower) and gpio.chip == "/dev/gpiochip1"


# --- HID relay: exact feature reports -----------------------------------------------------------


class RelayBoard:
    """A USBRelay board's HID interface as hidapi's ``hid.device`` shows it.

    It records every feature report and answers the state request like the V-USB
    firmware: 5 serial bytes, two unused bytes, then the channel bitmask.
    """

    def __init__(self, serial: str = "QAAMZ", channels: int = 2, stuck: bool = False) -> None:
        self.serial = serial.encode()
        self.channels = channels
        self.stuck = stuck
        self.mask = 0
        self.sent: list[bytes] = []
        self.requests: list[tuple[int, int]] = []
        self.closed = False
        self.path: bytes | None = None

    def open_path(self, path: bytes) -> None:
        self.path = path

    def send_feature_report(self, data) -> int:
        data = bytes(data)
        self.sent.append(data)
        assert data[0] == 0x00, "USBRelay boards use no report ids: byte 0 must be 0"
        if not self.stuck:
            command, channel = data[1], data[2]
            if command == 0xFF:
                self.mask |= 1 << (channel - 1)
            elif command == 0xFD:
                self.mask &= ~(1 << (channel - 1))
            elif command == 0xFE:
                self.mask = (1 << self.channels) - 1
            elif command == 0xFC:
                self.mask = 0
        return len(data)

    def get_feature_report(self, report_num: int, max_length: int) -> list[int]:
        self.requests.append((report_num, max_length))
        return list(self.serial[:5].ljust(5, b"\0") + bytes((0, 0, self.mask)))

    def close(self) -> None:
        self.closed = True


def test_hid_relay_exact_feature_reports():
    board = RelayBoard(channels=2)
    relay = HidRelay(channel=2, off_seconds=0, device=board, channels=2)
    relay.on()
    relay.off()
    relay.cycle()
    relay.all_on()
    relay.all_off()
    assert board.sent == [
        bytes([0x00, 0xFF, 0x02, 0, 0, 0, 0, 0, 0]),
        bytes([0x00, 0xFD, 0x02, 0, 0, 0, 0, 0, 0]),
        bytes([0x00, 0xFD, 0x02, 0, 0, 0, 0, 0, 0]),
        bytes([0x00, 0xFF, 0x02, 0, 0, 0, 0, 0, 0]),
        bytes([0x00, 0xFE, 0x00, 0, 0, 0, 0, 0, 0]),
        bytes([0x00, 0xFC, 0x00, 0, 0, 0, 0, 0, 0]),
    ]
    # Every switch is read back with get_feature_report(0x01, 9).
    assert board.requests == [(0x01, 9)] * 6


def test_hid_relay_reads_back_state():
    board = RelayBoard(channels=2)
    relay = HidRelay(channel=1, device=board, channels=2)
    relay.on()
    assert board.mask == 0b01
    assert relay.state() == {1: True, 2: False}
    assert parse_state_report([0x51, 0x41, 0x41, 0x4D, 0x5A, 0, 0, 0b10]) == ("QAAMZ", 2)


def test_hid_relay_that_does_not_switch_is_infra_error():
    relay = HidRelay(channel=1, serial="QAAMZ", device=RelayBoard(stuck=True))
    with pytest.raises(InfraError, match="channel 1 did not switch ON"):
        relay.on()


class FakeHidApi:
    """What ``import hid`` offers: enumerate() and device(), over a set of RelayBoards."""

    def __init__(self, boards: dict[bytes, RelayBoard]) -> None:
        self.boards = boards

    def enumerate(self, vendor_id: int, product_id: int) -> list[dict[str, object]]:
        assert (vendor_id, product_id) == (0x16C0, 0x05DF)
        return [{"path": path, "product_string": f"USBRelay{b.channels}"} for path, b in self.boards.items()]

    def device(self):
        api = self

        class Handle:
            def open_path(self, path: bytes) -> None:
                self.board = api.boards[path]

            def __getattr__(self, name):
                return getattr(self.board, name)

        return Handle()


def test_hid_relay_opens_the_board_by_its_serial():
    boards = {b"/dev/hidraw3": RelayBoard("AAAAA", 2), b"/dev/hidraw4": RelayBoard("BBBBB", 4)}
    relay = HidRelay(channel=3, serial="BBBBB", hid_api=FakeHidApi(boards))
    relay.on()
    assert boards[b"/dev/hidraw4"].sent == [bytes([0, 0xFF, 3, 0, 0, 0, 0, 0, 0])]
    assert boards[b"/dev/hidraw3"].sent == [] and boards[b"/dev/hidraw3"].closed
    assert relay.channels == 4

    with pytest.raises(InfraError, match="boards present are: AAAAA, BBBBB"):
        HidRelay(channel=1, serial="CCCCC", hid_api=FakeHidApi(boards)).on()
    with pytest.raises(ConfigError, match="set power.serial to one of them"):
        HidRelay(channel=1, hid_api=FakeHidApi(boards)).on()
    with pytest.raises(ConfigError, match="has 2 channels, channel 3 does not exist"):
        HidRelay(channel=3, path="/dev/hidraw3", hid_api=FakeHidApi(boards)).on()


def test_hid_relay_with_real_hidapi_and_no_board():
    pytest.importorskip("hid", reason="hidapi is not installed (pip install hidapi)")
    with pytest.raises(InfraError, match="no USB HID relay board"):
        HidRelay(channel=1, serial="NONE1").on()


def test_hid_relay_without_hidapi_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "hid", None)
    with pytest.raises(ConfigError, match="pip install hidapi"):
        HidRelay(channel=1).on()


# --- GPIO ---------------------------------------------------------------------------------------


def test_gpio_without_gpiod_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gpiod", None)
    power = make_power({"driver": "gpio", "line": 5})
    with pytest.raises(ConfigError, match=r"pip install 'gpiod>=2'"):
        power.on()


def test_gpio_missing_chip_and_not_a_chip():
    pytest.importorskip("gpiod", reason="gpiod is not installed (pip install gpiod)")
    with pytest.raises(InfraError, match="/dev/gpiochip-testbed-none does not exist.*gpiodetect"):
        GpioPower(line=5, chip="/dev/gpiochip-testbed-none").on()
    with pytest.raises(ConfigError, match="/dev/null is not a GPIO chip"):
        GpioPower(line=5, chip="/dev/null").off()


# --- external commands --------------------------------------------------------------------------


def test_command_power_runs_strings_and_argv(tmp_path):
    log = tmp_path / "pdu.log"
    power = CommandPower(
        on_command=f"echo on >> {log}",
        off_command=["sh", "-c", f"echo off >> {log}"],
        off_seconds=0,
    )
    power.on()
    power.off()
    power.cycle()
    power.cut()
    assert log.read_text().split() == ["on", "off", "off", "on", "off"]


def test_command_power_uses_cycle_and_cut_commands(tmp_path):
    log = tmp_path / "pdu.log"
    power = make_power(
        {
            "driver": "command",
            "on_command": f"echo on >> {log}",
            "off_command": f"echo off >> {log}",
            "cycle_command": f"echo reboot >> {log}",
            "cut_command": ["sh", "-c", f"echo cut >> {log}"],
        }
    )
    power.cycle()
    power.cut()
    assert log.read_text().split() == ["reboot", "cut"]


def test_command_failure_shows_stderr():
    power = CommandPower(on_command="echo 'outlet 3: no such outlet' >&2; exit 3", off_command="true")
    with pytest.raises(InfraError) as err:
        power.on()
    message = str(err.value)
    assert "power on command failed with exit code 3" in message
    assert "outlet 3: no such outlet" in message


def test_command_timeout_kills_it():
    power = CommandPower(on_command=["sleep", "30"], off_command="true", timeout=0.3)
    with pytest.raises(InfraError, match=r"power on command timed out after 0.3s and was killed: sleep 30"):
        power.on()


def test_command_missing_program_is_config_error():
    power = CommandPower(on_command=["testbed-no-such-pdu-tool", "on"], off_command="true")
    with pytest.raises(ConfigError, match="program 'testbed-no-such-pdu-tool' not found"):
        power.on()


# --- the person at the desk ---------------------------------------------------------------------


def answer_when_asked(prompt_fd: int, answer_fd: int, seen: list[str]) -> threading.Thread:
    """A person: reads the screen until a question ends, then presses Enter."""

    def person() -> None:
        text = b""
        while not text.endswith(b"press Enter "):
            chunk = os.read(prompt_fd, 1024)
            if not chunk:
                return
            text += chunk
        seen.append(text.decode())
        os.write(answer_fd, b"\n")

    thread = threading.Thread(target=person, daemon=True)
    thread.start()
    return thread


def test_manual_power_over_pipes():
    screen_r, screen_w = os.pipe()
    keys_r, keys_w = os.pipe()
    # Keys pressed before the question must not answer it.
    os.write(keys_w, b"\n\n")
    with os.fdopen(screen_w, "w") as screen, os.fdopen(keys_r, "rb", buffering=0) as keys:
        power = ManualPower(board="rpi4-lab2", input=keys, output=screen)
        seen: list[str] = []
        person = answer_when_asked(screen_r, keys_w, seen)
        power.on()
        person.join(WAIT)
        assert seen == ["\n>>> testbed: switch ON the power of rpi4-lab2 and press Enter "]
        person = answer_when_asked(screen_r, keys_w, seen)
        power.off()
        person.join(WAIT)
        assert "switch OFF the power of rpi4-lab2" in seen[1]
        os.close(keys_w)  # the person leaves
        with pytest.raises(InfraError, match="end of input"):
            power.cut()
    os.close(screen_r)


def test_manual_power_on_a_terminal():
    master, slave = pty.openpty()
    with os.fdopen(slave, "r+b", buffering=0) as tty:
        screen = tty_text(tty)
        power = make_power({"driver": "manual", "board": "bbb-3"}, input=tty, output=screen)
        seen: list[str] = []
        person = answer_when_asked(master, master, seen)
        power.cycle()
        person.join(WAIT)
        assert "switch OFF the power of bbb-3, wait a few seconds, switch it ON again" in seen[0]
    os.close(master)


def tty_text(raw):
    class Text:
        def write(self, s: str) -> int:
            return raw.write(s.encode())

        def flush(self) -> None:
            raw.flush()

    return Text()


def test_manual_power_timeout():
    keys_r, keys_w = os.pipe()
    screen = open(os.devnull, "w")  # noqa: SIM115
    with os.fdopen(keys_r, "rb", buffering=0) as keys, screen:
        power = ManualPower(board="b", input=keys, output=screen, timeout=0.2)
        with pytest.raises(InfraError, match=r"nobody pressed Enter within 0.2s \(power.timeout\)"):
            power.on()
    os.close(keys_w)


def test_manual_power_needs_a_terminal(tmp_path):
    # Without injected streams the driver talks to /dev/tty; in a process without a
    # controlling terminal that is a ConfigError that says what to do.
    code = (
        "from testbed.power import make_power\n"
        "from testbed.errors import ConfigError\n"
        "try:\n"
        "    make_power({'driver': 'manual'}).on()\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
        cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.DEVNULL,
    )
    assert "needs a person at a terminal" in out.stdout
