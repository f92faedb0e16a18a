"""The virtual bench: QEMU runs an image as if it were a board on a desk.

What a desk board has, and what stands in for it here:

* a USB serial adapter: a pty (``/dev/pts/N``, reached through a stable link in the
  bench's private directory, as ``/dev/serial/by-id/...`` is for an adapter). The bench
  holds the pty and bridges it to QEMU's serial socket while the "board" has power;
  the Board machine opens the link with pyserial exactly as it opens ``/dev/ttyUSB0``;
* a serial relay module: ``RelayEmulator`` on another pty, speaking the LCUS protocol;
  its channel switches the board: on starts QEMU, off kills it (SIGKILL, no shutdown);
* the SD card in a card reader: a loop block device over a sparse file. The backing
  file is unlinked as soon as the loop device holds it and the loop device is set to
  autoclear, so when the last descriptor closes (the bench's, QEMU's; also when the
  process is killed) the kernel detaches it and frees the space: nothing is left behind.
  The unchanged block-device flasher writes it; QEMU boots it raw;
* the board's network: QEMU user networking with loopback-only port forwards.

Every QEMU is an ``OwnedProcess`` (it dies with its owner). Note that PR_SET_PDEATHSIG
follows the thread that started the child: QEMU is started by the relay emulator's
dispatcher thread, which lives until the bench is closed, and the bench kills QEMU
before it stops that thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import shutil
import socket
import stat
import struct
import termios
import threading
import tty
from pathlib import Path
from typing import Any, ClassVar

from testbed.console import ConsoleLog
from testbed.errors import ConfigError, InfraError
from testbed.machines.board import BoardMachine
from testbed.machines.qemu import _firmware_paths, machine_argv, probe_accel
from testbed.machines.qemu import check_host as qemu_host_check
from testbed.power.emulator import RelayEmulator
from testbed.profile import BoardSettings, BoardSshSettings, Profile, SerialSettings
from testbed.util import OwnedProcess, free_port, listening_unix_socket, private_dir

log = logging.getLogger(__name__)

RELAY_CHANNEL = 1

# linux/loop.h
_LOOP_SET_FD = 0x4C00
_LOOP_CLR_FD = 0x4C01
_LOOP_SET_STATUS64 = 0x4C04
_LOOP_CTL_GET_FREE = 0x4C82
_LO_FLAGS_AUTOCLEAR = 4
_LOOP_INFO64 = struct.Struct("QQQQQIIII64s64s32sQQ")
_LOOP_MAJOR = 7


class LoopDisk:
    """A loop block device of ``size`` bytes over an unlinked sparse file; gone when closed or when we die.

    ``path`` is ``/dev/loopN``. Needs root (or CAP_SYS_ADMIN) and ``/dev/loop-control``.
    """

    def __init__(self, size: int, directory: Path) -> None:
        backing_path = directory / "sdcard.img"
        try:
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(
                f"the virtual bench needs loop devices: cannot open /dev/loop-control ({exc}); run as root "
                "(or with CAP_SYS_ADMIN) on a host with the loop module"
            ) from None
        backing = os.open(backing_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(backing, size)
            self.fd, self.path = self._attach(ctl, backing, backing_path)
        finally:
            os.close(backing)
            os.close(ctl)
            backing_path.unlink(missing_ok=True)
        self.size = size

    @staticmethod
    def _attach(ctl: int, backing: int, backing_path: Path) -> tuple[int, Path]:
        # Another process may take the free device between GET_FREE and SET_FD: try again.
        for _ in range(20):
            number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
            path = Path(f"/dev/loop{number}")
            if not path.exists():
                os.mknod(path, 0o660 | stat.S_IFBLK, os.makedev(_LOOP_MAJOR, number))
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, _LOOP_SET_FD, backing)
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY:
                    continue
                raise InfraError(f"attaching {backing_path} to {path} failed: {exc}") from None
            info = _LOOP_INFO64.pack(
                0, 0, 0, 0, 0, 0, 0, 0, _LO_FLAGS_AUTOCLEAR, str(backing_path).encode()[:63], b"", b"", 0, 0
            )
            try:
                fcntl.ioctl(fd, _LOOP_SET_STATUS64, info)
            except OSError as exc:
                fcntl.ioctl(fd, _LOOP_CLR_FD, 0)
                os.close(fd)
                raise InfraError(f"configuring {path} failed: {exc}") from None
            return fd, path
        raise InfraError("no free loop device after 20 attempts: other processes keep taking them")

    def close(self) -> None:
        if self.fd >= 0:
            # Autoclear: the kernel detaches the device once the last descriptor is closed.
            os.close(self.fd)
            self.fd = -1


class PtyAdapter:
    """A USB serial adapter stand-in: a pty whose far end is the board's UART (QEMU's serial socket).

    ``link`` always points at the current pty, like a ``/dev/serial/by-id/`` link.
    ``unplug()`` closes the pty (an open port then fails on its next read, as when a
    USB adapter is pulled out); ``replug()`` makes a new pty and repoints the link.
    Bytes from the board while nobody has the port open are dropped after
    ``overrun_s``, as a UART drops them, so an unread port never stalls the board.
    Descriptors are closed only by the bridge thread, never under its select().
    """

    overrun_s = 1.0

    def __init__(self, link: Path) -> None:
        self.link = link
        self._lock = threading.Lock()
        self._board: socket.socket | None = None
        self._retired: list[Any] = []
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self.master = self.slave = -1
        self.plugged = False
        self._plug()
        self._thread = threading.Thread(target=self._bridge, name=f"pty-adapter {link.name}", daemon=True)
        self._thread.start()

    def _plug(self) -> None:
        master, slave = os.openpty()
        # Raw at once: with echo on, the line discipline would send the board's output back to it.
        tty.setraw(slave)
        self.master, self.slave = master, slave
        self.tty = os.ttyname(slave)
        tmp = self.link.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.tty)
        tmp.replace(self.link)
        self.plugged = True

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def attach(self, board: socket.socket) -> None:
        """Connect the board's UART (QEMU's serial socket)."""
        with self._lock:
            if self._board is not None:
                self._retired.append(self._board)
            self._board = board
        self._poke()

    def detach(self) -> None:
        with self._lock:
            if self._board is not None:
                self._retired.append(self._board)
            self._board = None
        self._poke()

    def unplug(self) -> None:
        """Pull the adapter out: the pty goes away, an open port fails."""
        done = threading.Event()
        with self._lock:
            if not self.plugged:
                return
            self.plugged = False
            self._retired.extend([self.master, self.slave, done])
            self.link.unlink(missing_ok=True)
        self._poke()
        if not done.wait(5):
            raise InfraError("virtual bench: the serial adapter's bridge did not release the pty within 5s")

    def replug(self) -> None:
        with self._lock:
            if not self.plugged:
                self._plug()
        self._poke()

    def _close_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        for item in retired:
            if isinstance(item, threading.Event):
                item.set()
            elif isinstance(item, socket.socket):
                item.close()
            else:
                try:
                    os.close(item)
                except OSError:
                    pass

    def _write_to_port(self, data: bytes, master: int) -> None:
        view = memoryview(data)
        while view:
            _, writable, _ = select.select([], [master], [], self.overrun_s)
            if not writable:
                # Nobody reads the port: drop what waits, as a UART overruns.
                termios.tcflush(self.slave, termios.TCIFLUSH)
                return
            view = view[os.write(master, view) :]

    def _bridge(self) -> None:
        while True:
            self._close_retired()
            with self._lock:
                if self._stop:
                    return
                board = self._board
                master = self.master if self.plugged else None
            watched: list[Any] = [self._wake_r]
            if master is not None:
                watched.append(master)
            if board is not None:
                watched.append(board)
            ready, _, _ = select.select(watched, [], [])
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
                continue
            if board is not None and board in ready:
                try:
                    data = board.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    # The board lost power (QEMU was killed).
                    with self._lock:
                        if self._board is board:
                            self._board = None
                            self._retired.append(board)
                    continue
                if master is not None:
                    try:
                        self._write_to_port(data, master)
                    except OSError:
                        continue
            if master is not None and master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO while nobody has the port open
                    data = b""
                if board is not None and data:
                    try:
                        board.sendall(data)
                    except OSError:
                        continue

    def close(self) -> None:
        with self._lock:
            self._stop = True
            if self._board is not None:
                self._retired.append(self._board)
                self._board = None
            if self.plugged:
                self.plugged = False
                self._retired.extend([self.master, self.slave])
                self.link.unlink(missing_ok=True)
        self._poke()
        self._thread.join(5)
        self._close_retired()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


class VirtualBench:
    """QEMU as a board, behind a pty serial adapter, an emulated serial relay and a loop block device.

    ``settings`` is the board section the Board machine uses: serial = the adapter link,
    power = ``serial-relay`` on the relay emulator's pty, flash = ``blockdev`` on the
    loop device, ssh = a loopback port forward.
    """

    def __init__(self, profile: Profile, *, relay: bool = True) -> None:
        """``relay=False``: no relay emulator; whoever owns the bench switches it with ``switch()``
        (a farm place's network PDU)."""
        assert profile.qemu is not None and profile.board is not None
        self.profile = profile
        self.qemu = profile.qemu
        qemu_host_check(self.qemu, profile.source)
        self.workdir = private_dir("testbed-bench-")
        self.proc: OwnedProcess | None = None
        self.adapter: PtyAdapter | None = None
        self.relay: RelayEmulator | None = None
        self.disk: LoopDisk | None = None
        self._qemu_lock = threading.Lock()
        self._killed_by_relay = True
        try:
            self.accel, self.accel_note = probe_accel(profile)
            code, vars_template = _firmware_paths(self.qemu, profile.source)
            self.firmware_code = code
            # The board's NVRAM: one copy for the bench's life, kept across power cycles.
            self.vars = self.workdir / "vars.fd"
            shutil.copyfile(vars_template, self.vars)
            self.ports = {"ssh": free_port(), "engine": free_port()}
            self.disk = LoopDisk(profile.board.virtual_disk_mib << 20, self.workdir)
            self.adapter = PtyAdapter(self.workdir / "serial-adapter")
            if relay:
                self.relay = RelayEmulator(channels=1, on_change=self._relay_changed, answer_status=True)
        except BaseException:
            self.close()
            raise

    @property
    def settings(self) -> BoardSettings:
        assert self.profile.board is not None and self.adapter is not None and self.relay and self.disk
        return self.profile.board.model_copy(
            update={
                "serial": SerialSettings(url=str(self.adapter.link), baudrate=115200),
                "power": {
                    "driver": "serial-relay",
                    "port": self.relay.port,
                    "channel": RELAY_CHANNEL,
                    "verify": True,
                    "off_seconds": 0.5,
                },
                "flash": {"driver": "blockdev", "device": str(self.disk.path)},
                "ssh": BoardSshSettings(host="127.0.0.1", port=self.ports["ssh"]),
            }
        )

    def endpoint(self, name: str) -> tuple[str, int]:
        return "127.0.0.1", self.ports[name]

    # -- the relay switches the board ---------------------------------------------------
    def _relay_changed(self, channel: int, on: bool) -> None:
        if channel != RELAY_CHANNEL:
            return
        if on:
            self._start_qemu()
        else:
            self._kill_qemu()

    def switch(self, on: bool) -> None:
        """Power the board on (start QEMU) or off (kill it). QEMU dies with the thread that
        started it (PR_SET_PDEATHSIG): call from a thread that lives as long as the bench."""
        self._relay_changed(RELAY_CHANNEL, on)

    def argv(self, serial_fd: int) -> list[str]:
        assert self.disk is not None
        hostfwd = (
            f"hostfwd=tcp:127.0.0.1:{self.ports['ssh']}-:{self.profile.ssh.port},"
            f"hostfwd=tcp:127.0.0.1:{self.ports['engine']}-:{self.profile.dev.engine_port}"
        )
        # A board's own disk and firmware store: raw, written in place, no snapshots. A reset
        # resets the machine in place, as it does on a board.
        return [
            *machine_argv(
                self.qemu, self.accel, f"testbed-bench-{self.profile.name}", self.firmware_code,
                vars_drive=f"format=raw,file={self.vars}",
                disk_drive=f"format=raw,file={self.disk.path},discard=unmap",
                nic_netdev=f"user,{hostfwd}",
            ),
            "-chardev", f"socket,id=ser0,fd={serial_fd},server=on,wait=off",
            "-serial", "chardev:ser0",
            *self.qemu.extra_args,
        ]  # fmt: skip

    def _start_qemu(self) -> None:
        with self._qemu_lock:
            if self.proc is not None and self.proc.alive():
                return
            assert self.adapter is not None
            ser_l = listening_unix_socket(self.workdir / "uart.sock")
            try:
                self.proc = OwnedProcess(
                    self.argv(ser_l.fileno()), pass_fds=[ser_l.fileno()], stderr_path=self.workdir / "qemu.stderr"
                )
                uart = socket.socket(socket.AF_UNIX)
                # The socket is bound and listening already: the connection is queued until QEMU accepts it.
                uart.connect(str(self.workdir / "uart.sock"))
            finally:
                ser_l.close()
            self._killed_by_relay = False
            self.adapter.attach(uart)

    def _kill_qemu(self) -> None:
        with self._qemu_lock:
            self._killed_by_relay = True
            if self.proc is not None:
                self.proc.kill()
                self.proc = None
            if self.adapter is not None:
                self.adapter.detach()

    def check(self) -> None:
        """InfraError if the bench broke: QEMU exited on its own, or a relay callback failed."""
        if self.relay is not None and self.relay.callback_errors:
            raise InfraError(f"virtual bench: switching the board failed: {self.relay.callback_errors[-1]}")
        with self._qemu_lock:
            proc = self.proc
            if proc is not None and not proc.alive() and not self._killed_by_relay:
                raise InfraError(
                    f"virtual bench: QEMU exited by itself (code {proc.proc.returncode}): {proc.stderr_tail()}"
                )

    def is_running(self) -> bool:
        with self._qemu_lock:
            return self.proc is not None and self.proc.alive()

    def facts(self) -> dict[str, Any]:
        return {
            "bench": "virtual",
            "accelerator": self.accel,
            "accelerator_note": self.accel_note,
            "qemu_machine": self.qemu.machine,
            "firmware": str(self.firmware_code),
            "memory_mib": self.qemu.memory_mib,
            "cpus": self.qemu.cpus,
        }

    def close(self) -> None:
        """Kill QEMU, unplug the relay and the adapter, release the loop device, remove the directory.
        A second call does nothing (a board that failed to start closes its bench on the way out)."""
        self._kill_qemu()
        relay, adapter, disk = self.relay, self.adapter, self.disk
        self.relay = self.adapter = self.disk = None
        if relay is not None:
            relay.close()
        if adapter is not None:
            adapter.close()
        if disk is not None:
            disk.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


class VirtualBoardMachine(BoardMachine):
    """A board on the virtual bench: the Board machine's code over the bench's pty adapter,
    relay emulator and loop disk; sshd and the engine behind the bench's port forwards."""

    boots_on_this_host: ClassVar[bool] = True  # the bench's board is a QEMU guest of this host

    def __init__(self, profile: Profile, image: Path, console_log: ConsoleLog, image_format: str = "raw") -> None:
        self.bench = VirtualBench(profile)
        try:
            super().__init__(
                profile,
                image,
                console_log,
                image_format,
                self.bench.settings,
                (self.bench.accel, self.bench.accel_note),
            )
        except BaseException:
            self.bench.close()
            raise

    def check_alive(self) -> None:
        super().check_alive()
        self.bench.check()

    def endpoint(self, name: str, hostname: str | None = None) -> tuple[str, int]:
        return self.bench.endpoint(name)

    def facts(self) -> dict[str, Any]:
        return {**super().facts(), **self.bench.facts()}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.bench.close()


__all__ = ["LoopDisk", "PtyAdapter", "VirtualBench", "VirtualBoardMachine"]
