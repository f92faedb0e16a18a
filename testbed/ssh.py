"""SSH to the device on port 22222: one paramiko transport, kept open, reconnected after reboots."""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import re
import secrets
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import paramiko

from testbed.console import CommandResult, utcnow
from testbed.errors import DutError, InfraError
from testbed.util import wait_until

logging.getLogger("paramiko").setLevel(logging.CRITICAL)


METHODS = ("none", "publickey", "password")
# How SSH readiness is probed (see SshClient._answering_socket).
PROBE_EVERY = 2.0
PROBE_KEEP = 2


class AuthRefused(DutError):
    """The device answered SSH but refused every way testbed tried to log in."""


def load_or_create_key(path: Path) -> paramiko.Ed25519Key:
    """testbed's own SSH key (injected into production images' config.json)."""
    if path.exists():
        return paramiko.Ed25519Key.from_private_key_file(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # paramiko cannot generate ed25519 keys; ssh-keygen can.
    import subprocess

    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "testbed", "-f", str(path)],
        check=True,
    )
    return paramiko.Ed25519Key.from_private_key_file(str(path))


class SshClient:
    """An SSH session to ``host:port`` as ``user``.

    Authentication tries, in order: none (a development image's passwordless root), an
    empty password, then ``key``. Host keys are not pinned: a device's keys change when
    it is reflashed, and the farm reaches it only over loopback or its own lab network.
    """

    def __init__(self, host: str, port: int, user: str, key: paramiko.PKey | None = None) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.key = key
        self.transport: paramiko.Transport | None = None
        self.auth_method = ""
        self._idle = threading.Event()  # never set: paces SSH probes when all were refused
        self._shell: _Shell | None = None
        self._shell_lock = threading.Lock()

    # -- connection --------------------------------------------------------------------
    def connected(self) -> bool:
        return self.transport is not None and self.transport.is_active() and self.transport.is_authenticated()

    def connect_once(
        self, timeout: float = 10.0, methods: tuple[str, ...] = METHODS, abort: Callable[[], None] | None = None
    ) -> None:
        """One attempt: TCP, banner, key exchange, authentication. Raises on any failure.

        ``abort`` runs while waiting for the banner and raises to stop early.
        """
        self.close()
        sock = self._answering_socket(timeout, abort)
        # Without TCP_NODELAY every exec round trip waits for Nagle (about 40 ms more).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        transport.auth_timeout = timeout
        try:
            transport.start_client(timeout=timeout)
        except Exception:
            transport.close()
            raise
        self.transport = transport
        self._authenticate(transport, methods)
        transport.set_keepalive(15)

    def _answering_socket(self, timeout: float, abort: Callable[[], None] | None = None) -> socket.socket:
        """A TCP connection to the server on which its first bytes (the SSH banner) wait.

        A user-mode port forward (QEMU's) accepts the host side at once, before the guest
        listens, and holds that connection while its SYN to the guest goes unanswered (the
        guest's NIC not up yet) and backs off: one connection opened early can sit many
        seconds after sshd is up. So a new connection is opened every ``PROBE_EVERY``
        seconds, the last ``PROBE_KEEP`` of them stay open, and the first to have bytes to
        read is the one used. Few are kept: each one the server accepts costs it a process.
        """
        family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        deadline = time.monotonic() + timeout
        probes: list[socket.socket] = []
        last_error = "no answer"
        next_probe = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError(f"no SSH banner from {self.host}:{self.port} within {timeout:g}s ({last_error})")
                if now >= next_probe:
                    if abort is not None:
                        abort()
                    probe = socket.socket(family, kind, proto)
                    probe.setblocking(False)
                    code = probe.connect_ex(address)
                    if code not in (0, errno.EINPROGRESS):
                        probe.close()
                        last_error = os.strerror(code)
                    else:
                        probes.append(probe)
                        while len(probes) > PROBE_KEEP:
                            probes.pop(0).close()
                    next_probe = now + PROBE_EVERY
                wait = max(0.0, min(next_probe, deadline) - time.monotonic())
                if not probes:  # every probe refused: the next one is due in ``wait`` seconds
                    self._idle.wait(wait)
                    continue
                readable, _, _ = select.select(probes, [], [], wait)
                for probe in readable:
                    try:
                        first = probe.recv(1, socket.MSG_PEEK)
                    except OSError as exc:
                        first, last_error = b"", exc.strerror or str(exc)
                    else:
                        last_error = last_error if first else "closed before the banner"
                    if first:
                        probes.remove(probe)
                        probe.setblocking(True)
                        probe.settimeout(timeout)
                        return probe
                    probes.remove(probe)
                    probe.close()
        finally:
            for probe in probes:
                probe.close()

    def offered_methods(self, timeout: float = 10.0) -> list[str]:
        """Connect, ask to log in with ``none``, and return what the server offers instead
        (``["none"]`` when ``none`` was accepted). Closes the connection."""
        self.close()
        sock = self._answering_socket(timeout)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = timeout
        try:
            transport.start_client(timeout=timeout)
            try:
                transport.auth_none(self.user)
            except paramiko.BadAuthenticationType as exc:
                return list(exc.allowed_types)
            return ["none"]
        finally:
            transport.close()

    def server_key(self) -> str:
        """The connected server's host key: its type and SHA256 fingerprint."""
        if self.transport is None:
            raise InfraError(f"SSH to {self.host}:{self.port} is not connected")
        key = self.transport.get_remote_server_key()
        digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
        return f"{key.get_name()} SHA256:{digest}"

    def _authenticate(self, transport: paramiko.Transport, methods: tuple[str, ...]) -> None:
        tried: list[str] = []
        allowed: list[str] = ["publickey", "password"]
        for method in methods:
            if transport.is_authenticated():
                break
            if method != "none" and method not in allowed:
                continue
            try:
                if method == "none":
                    transport.auth_none(self.user)
                elif method == "publickey" and self.key is not None:
                    transport.auth_publickey(self.user, self.key)
                elif method == "password":
                    transport.auth_password(self.user, "")
                else:
                    continue
                self.auth_method = {"password": "empty-password"}.get(method, method)
            except paramiko.BadAuthenticationType as exc:
                tried.append(method)
                allowed = list(exc.allowed_types)
            except paramiko.AuthenticationException:
                tried.append(method)
        if not transport.is_authenticated():
            transport.close()
            self.transport = None
            raise AuthRefused(
                f"SSH {self.user}@{self.host}:{self.port} refused login "
                f"(tried: {', '.join(tried) or 'nothing the server allows'}; server allows: {', '.join(allowed)})"
            )

    def wait_ready(
        self,
        timeout: float,
        abort: Callable[[], None] | None = None,
        reachable: Callable[[], str] | None = None,
    ) -> float:
        """Connect, retrying until the device's sshd answers and lets us in; return seconds taken.

        A refused login is final (the device answered; retrying would not help).
        ``reachable`` holds the probes back while it returns why the device cannot answer yet
        (its network is not up), and lets them go once it returns "".
        """
        t0 = time.monotonic()
        last: list[str] = [""]

        def attempt() -> bool:
            if reachable is not None and (why := reachable()):
                last[0] = why
                return False
            try:
                self.connect_once(timeout=min(10.0, timeout), abort=abort)
                return True
            except AuthRefused:
                raise
            except (OSError, paramiko.SSHException, EOFError) as exc:
                last[0] = f"{type(exc).__name__}: {exc}"
                return False

        wait_until(
            attempt,
            timeout,
            f"SSH on {self.host}:{self.port}",
            interval=0.1,
            max_interval=0.5,
            abort=abort,
            on_timeout=lambda msg: DutError(f"{msg} (last attempt: {last[0]})"),
        )
        return time.monotonic() - t0

    def close(self) -> None:
        shell, self._shell = self._shell, None
        if shell is not None:
            shell.close()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # -- commands ----------------------------------------------------------------------
    def run(self, command: str, timeout: float, stdin: BinaryIO | None = None) -> CommandResult:
        """Run one command; return exit code, stdout, stderr. Output is read as it comes.

        A command runs in a subshell of one long-lived shell on its own channel (``_Shell``):
        under an emulated CPU, sshd's new session and shell for every command cost most of a
        command's round trip. A command given ``stdin``, or one run while another is running
        (another thread), gets a channel of its own as before. ``stdin``, if given, is streamed
        to the command (then end of file) before its output is collected: for uploads
        (``cat > file``) without SFTP's round trips.
        """
        if not self.connected():
            raise InfraError(f"SSH to {self.host}:{self.port} is not connected")
        assert self.transport is not None
        if stdin is None and self._shell_lock.acquire(blocking=False):
            try:
                return self._run_in_shell(command, timeout)
            finally:
                self._shell_lock.release()
        return self._run_on_channel(command, timeout, stdin)

    def _run_in_shell(self, command: str, timeout: float) -> CommandResult:
        assert self.transport is not None
        started, t0 = utcnow(), time.monotonic()
        shell = self._shell
        if shell is None or not shell.alive():
            try:
                shell = self._shell = _Shell(self.transport, timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise InfraError(f"SSH channel to {self.host}:{self.port} failed: {exc}") from None
        try:
            code, out, err = shell.run(command, t0 + timeout)
        except _ShellTimeout as exc:
            self._shell = None
            shell.close()  # the shell is busy with the command: the next one gets a new shell
            raise DutError(
                f"`{command}` did not finish within {timeout:g}s over SSH; output so far:\n{exc.output[-2000:]}"
            ) from None
        except _ShellEnded as exc:
            self._shell = None
            shell.close()
            if not self.transport.is_active():
                raise InfraError(f"SSH connection to {self.host}:{self.port} dropped during `{command}`") from None
            raise DutError(
                f"the shell running `{command}` over SSH ended before it did; output:\n{exc.output[-2000:]}"
            ) from None
        return CommandResult(
            command=command, exit_code=code, stdout=out, stderr=err, started=started,
            duration_s=time.monotonic() - t0, transport="ssh",
        )  # fmt: skip

    def _run_on_channel(self, command: str, timeout: float, stdin: BinaryIO | None) -> CommandResult:
        assert self.transport is not None
        started, t0 = utcnow(), time.monotonic()
        try:
            chan = self.transport.open_session(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise InfraError(f"SSH channel to {self.host}:{self.port} failed: {exc}") from None
        out, err = bytearray(), bytearray()
        try:
            chan.exec_command(command)
            deadline = t0 + timeout
            if stdin is not None:
                while chunk := stdin.read(1 << 20):
                    chan.settimeout(max(deadline - time.monotonic(), 0.1))
                    try:
                        chan.sendall(chunk)
                    except (TimeoutError, OSError) as exc:
                        if chan.exit_status_ready():
                            break  # the command ended early; its exit code says why
                        raise DutError(f"`{command}` stopped taking input within {timeout:g}s: {exc}") from None
                chan.settimeout(None)
            chan.shutdown_write()
            while True:
                while chan.recv_ready():
                    out.extend(chan.recv(65536))
                while chan.recv_stderr_ready():
                    err.extend(chan.recv_stderr(65536))
                if chan.closed or (chan.exit_status_ready() and chan.eof_received):
                    if not chan.recv_ready() and not chan.recv_stderr_ready():
                        break
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DutError(
                        f"`{command}` did not finish within {timeout:g}s over SSH; output so far:\n"
                        f"{out.decode(errors='replace')[-2000:]}"
                    )
                select.select([chan], [], [], remaining)
                if not self.transport.is_active():
                    raise InfraError(f"SSH connection to {self.host}:{self.port} dropped during `{command}`")
            code = chan.recv_exit_status()
        finally:
            chan.close()
        return CommandResult(
            command=command,
            exit_code=code,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            started=started,
            duration_s=time.monotonic() - t0,
            transport="ssh",
        )

    def put(self, data: bytes, remote_path: str, mode: int = 0o644) -> None:
        assert self.transport is not None
        with paramiko.SFTPClient.from_transport(self.transport) as sftp:  # type: ignore[union-attr]
            with sftp.open(remote_path, "wb") as fh:
                fh.write(data)
            sftp.chmod(remote_path, mode)

    def get(self, remote_path: str) -> bytes:
        assert self.transport is not None
        with paramiko.SFTPClient.from_transport(self.transport) as sftp:  # type: ignore[union-attr]
            with sftp.open(remote_path, "rb") as fh:
                return bytes(fh.read())


class _ShellTimeout(Exception):
    def __init__(self, output: str) -> None:
        self.output = output


class _ShellEnded(Exception):
    def __init__(self, output: str) -> None:
        self.output = output


class _Shell:
    """The user's shell on one session channel (``exec $SHELL -s``), reading commands from its
    standard input. Each command is sent as ``( eval 'COMMAND' ) </dev/null`` followed by end
    markers on stdout (with the exit code) and stderr: the subshell keeps ``exit``, ``cd`` and
    variables from reaching the next command, ``eval`` of a quoted string keeps a command's
    syntax error its own (exit 2), and /dev/null keeps it from reading the next command. Each
    marker starts on a line of its own and carries a token of this shell, so output without a
    final newline stays exact and no output can pass for a marker.
    """

    def __init__(self, transport: paramiko.Transport, timeout: float) -> None:
        self.chan = transport.open_session(timeout=timeout)
        self.chan.exec_command('exec "${SHELL:-/bin/sh}" -s')
        self.token = "@@TBSH" + secrets.token_hex(6)
        self.n = 0
        self._out = bytearray()
        self._err = bytearray()

    def alive(self) -> bool:
        return not self.chan.closed and not self.chan.exit_status_ready()

    def run(self, command: str, deadline: float) -> tuple[int, str, str]:
        self.n += 1
        mark = f"{self.token}E{self.n}"
        self.chan.sendall(
            f"( eval {shlex.quote(command)} ) </dev/null; printf '\\n%s:%s\\n' {mark} $?; printf '\\n%s\\n' {mark} >&2\n".encode()
        )
        out_end = re.compile(rb"\n" + mark.encode() + rb":(\d+)\n")
        err_end = b"\n" + mark.encode() + b"\n"
        code: int | None = None
        err_at = -1
        # Where the markers are looked for: the tail of what came (a big output is not
        # searched again from its start at every read).
        out_scan = err_scan = 0
        back = len(mark) + 24
        while code is None or err_at < 0:
            while self.chan.recv_ready():
                self._out.extend(self.chan.recv(65536))
            while self.chan.recv_stderr_ready():
                self._err.extend(self.chan.recv_stderr(65536))
            if code is None:
                if found := out_end.search(self._out, out_scan):
                    code = int(found.group(1))
                    out, self._out = bytes(self._out[: found.start()]), self._out[found.end() :]
                else:
                    out_scan = max(0, len(self._out) - back)
            if err_at < 0:
                if (at := self._err.find(err_end, err_scan)) >= 0:
                    err_at = at
                    err, self._err = bytes(self._err[:at]), self._err[at + len(err_end) :]
                else:
                    err_scan = max(0, len(self._err) - back)
            if code is not None and err_at >= 0:
                break
            if self.chan.closed or self.chan.eof_received:
                raise _ShellEnded(self._out.decode(errors="replace"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _ShellTimeout(self._out.decode(errors="replace"))
            select.select([self.chan], [], [], remaining)
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    def close(self) -> None:
        self.chan.close()
