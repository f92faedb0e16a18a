"""SSH readiness probing against a real TCP server that behaves like QEMU's user-mode forward:
it accepts every connection at once, but a connection made before the "guest" is up never
hears a banner. The probe must not wait on that connection; it must use a later one."""

from __future__ import annotations

import socket
import threading

import pytest

from testbed import ssh
from testbed.errors import DutError
from testbed.ssh import SshClient

BANNER = b"SSH-2.0-testbed-probe\r\n"


class HoldingForward:
    """Accepts on loopback. The first ``silent`` connections are held open and never answered
    (their SYN "lost" in the guest); every later one gets an SSH banner at once."""

    def __init__(self, silent: int) -> None:
        self.silent = silent
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.answered: list[int] = []  # indexes of the connections that got a banner
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            # Record before the banner goes out: the client may act on the banner (and the test
            # read these lists) before this thread runs again.
            with self._changed:
                self.accepted.append(conn)
                answer = len(self.accepted) > self.silent
                if answer:
                    self.answered.append(len(self.accepted) - 1)
                self._changed.notify_all()
            if answer:
                conn.sendall(BANNER)

    def wait_accepted(self, count: int, timeout: float = 5.0) -> int:
        """Waits until ``count`` connections were accepted (a client's connect() completes in
        the kernel's backlog before this server's accept() runs); returns how many were."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.accepted) >= count, timeout)
            return len(self.accepted)

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would leave the
        # socket listening until that accept() returns (it holds the kernel's reference).
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def forward():
    made: list[HoldingForward] = []

    def make(silent: int) -> HoldingForward:
        made.append(HoldingForward(silent))
        return made[-1]

    yield make
    for f in made:
        f.close()


def test_a_connection_held_without_a_banner_does_not_hold_up_the_probe(forward) -> None:
    fwd = forward(silent=1)
    client = SshClient("127.0.0.1", fwd.port, "root")
    sock = client._answering_socket(timeout=3 * ssh.PROBE_EVERY)
    try:
        assert sock.recv(len(BANNER), socket.MSG_PEEK) == BANNER
        # The first connection was held silent; the one handed over is a later one.
        assert fwd.wait_accepted(2) >= 2
        assert fwd.answered, "no connection got a banner"
        assert fwd.answered[0] >= 1, "the silent first connection was answered"
    finally:
        sock.close()


def test_no_banner_at_all_times_out_naming_the_endpoint(forward) -> None:
    fwd = forward(silent=1000)
    client = SshClient("127.0.0.1", fwd.port, "root")
    with pytest.raises(TimeoutError, match=f"no SSH banner from 127.0.0.1:{fwd.port}"):
        client._answering_socket(timeout=1.5 * ssh.PROBE_EVERY)
    # The probe was renewed, not left waiting on the first connection.
    assert fwd.wait_accepted(2) >= 2


def test_a_refused_port_is_retried_until_the_timeout() -> None:
    # A port bound but not listening refuses every connection, and stays ours for the test
    # (a port merely closed could be taken by another process meanwhile).
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        client = SshClient("127.0.0.1", port, "root")
        with pytest.raises(TimeoutError, match="refused"):
            client._answering_socket(timeout=1.5 * ssh.PROBE_EVERY)


def test_abort_stops_the_probe(forward) -> None:
    fwd = forward(silent=1000)
    client = SshClient("127.0.0.1", fwd.port, "root")

    class Stop(Exception):
        pass

    def abort() -> None:
        raise Stop("the machine died")

    with pytest.raises(Stop):
        client._answering_socket(timeout=30, abort=abort)


def test_no_probe_goes_out_while_the_device_cannot_answer(forward) -> None:
    fwd = forward(silent=0)
    client = SshClient("127.0.0.1", fwd.port, "root")
    with pytest.raises(DutError, match="its NIC is down"):
        client.wait_ready(timeout=1.0, reachable=lambda: "its NIC is down")
    # A connect() that went out would be accepted within milliseconds; give it a second.
    assert fwd.wait_accepted(1, timeout=1.0) == 0, "a probe went out while the device could not answer"


def test_probes_start_once_the_device_can_answer(forward) -> None:
    fwd = forward(silent=0)
    client = SshClient("127.0.0.1", fwd.port, "root")
    asked = []

    def reachable() -> str:
        asked.append(len(fwd.accepted))
        return "not yet" if len(asked) < 3 else ""

    # The fake forward speaks only a banner, so the login itself never succeeds here.
    with pytest.raises(DutError):
        client.wait_ready(timeout=2.0, reachable=reachable)
    assert asked[:3] == [0, 0, 0]
    assert fwd.wait_accepted(1) >= 1, "no probe went out once the device could answer"
