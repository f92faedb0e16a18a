"""QMP, QEMU's monitor protocol: a thin synchronous client (qemu.qmp) and the events-only monitor.

Both monitors are connected socket pairs handed to QEMU as file descriptors, so there is
nothing to poll for: the client's socket is QEMU's from the start.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from testbed.errors import InfraError


class Qmp:
    """A thin synchronous QMP client (qemu.qmp) on an already connected socket."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        # qemu.qmp's synchronous shim runs on the creating thread's event loop, so two
        # machines' clients would share one; a QEMU restarted from another thread then tried to
        # run that loop while it was running ("coroutine 'wait_for' was never awaited"). Each
        # client gets its own loop.
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._mon = QEMUMonitorProtocol(sock)
        self._mon.settimeout(timeout)
        self._mon.connect()

    def cmd(self, _command: str, **args: Any) -> Any:
        reply = self._mon.cmd_obj({"execute": _command, "arguments": args} if args else {"execute": _command})
        if "error" in reply:
            raise InfraError(f"QMP {_command} failed: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def hmp(self, command_line: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": command_line}))

    def event(self, names: set[str], timeout: float) -> dict[str, Any] | None:
        """The next event among ``names``, or None when ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                ev = self._mon.pull_event(wait=float(remaining))
            except TimeoutError:
                return None
            if ev and ev.get("event") in names:
                return ev

    def close(self) -> None:
        try:
            self._mon.close()
        except Exception:  # noqa: BLE001 - QEMU may already be gone; closing must not fail.
            return  # the client's finaliser may still need its loop
        self._loop.close()


def events_handshake(sock: socket.socket) -> None:
    """Enter command mode on an events-only QMP monitor (then only events arrive)."""
    sock.settimeout(30)
    reader = sock.makefile("rb")
    if not reader.readline():
        raise InfraError("QEMU's event monitor closed before its greeting")
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    if b"return" not in reader.readline():
        raise InfraError("QEMU's event monitor refused qmp_capabilities")
    sock.settimeout(None)


def shutdown_reason(sock: socket.socket, on_event: Callable[[str], None] | None = None) -> str:
    """Read events until QEMU closes the monitor; return the last SHUTDOWN's reason ("" if none).
    ``on_event`` is called with the name of every event."""
    reason = ""
    with sock, sock.makefile("rb") as reader:
        for line in reader:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            name = str(message.get("event", ""))
            if name == "SHUTDOWN":
                reason = str(message.get("data", {}).get("reason", ""))
            if name and on_event is not None:
                on_event(name)
    return reason


def discard_input(sock: socket.socket | None) -> None:
    """Drop what was typed on the serial line but never read by the QEMU that is gone."""
    if sock is None:
        return
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except (BlockingIOError, OSError):
        pass
    finally:
        sock.setblocking(True)
