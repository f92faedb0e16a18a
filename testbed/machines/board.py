"""A real board: serial console through pyserial, power through a relay driver, storage through a flasher.

The same DUT code drives it as drives QEMU: ``power_on()`` returns a ``Console`` (the
same pexpect console code over a ``SerialTransport``), ``endpoint("ssh")`` says where
sshd answers.

The effective config.json reaches the board the way it reaches QEMU: the DUT writes it
into a qcow2 overlay over the user's image (the image file is only read); before the
first power on the overlay is converted to a sparse raw file in a private directory
and the profile's flasher writes that to the board's storage (block device with
verification, or USB-SD-Mux). With no flasher the board boots what its storage holds.

A board has no snapshots. ``reflash()`` makes the next power on write the image again,
which is how a board returns to its first-boot state (the DUT's ``restore()`` on a
board: power off, flash, cold boot; honest, and as slow as writing the card).

A board is used by one run at a time: ``DeviceLock`` on its serial port (the real
path, so two names of one adapter are one lock) is taken before anything touches the
hardware and held until ``close()``; the port is also opened exclusively.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

from testbed import events as ev
from testbed.console import Console, ConsoleLog, SerialTransport
from testbed.errors import ConfigError, InfraError
from testbed.flash import FlashResult, make_flasher
from testbed.lab.lock import DeviceLock
from testbed.machines.base import Capabilities, MachineEvents
from testbed.power import Power, make_power
from testbed.power import preflight as power_preflight
from testbed.profile import BoardSettings, Profile
from testbed.util import private_dir, qemu_img


def serial_ports_present() -> str:
    """The serial adapters this host has now, by id (what a person picks from), for messages."""
    by_id = Path("/dev/serial/by-id")
    ports = sorted(str(p) for p in by_id.iterdir()) if by_id.is_dir() else []
    return ", ".join(ports) if ports else f"none in {by_id}/ (is the USB serial adapter plugged in?)"


def check_host(profile: Profile) -> None:
    """What a board needs before the run starts, checked before anything is touched: its serial
    port exists (a local one; a serial server is reached when the run opens it) and its power
    driver's optional package is installed. ConfigError naming the option or key and the fix.
    A port that vanishes later is the lab's (InfraError from the console)."""
    board = profile.board
    if board is None or board.bench != "none":
        return
    if board.serial is not None and "://" not in board.serial.url and not os.path.exists(board.serial.url):
        raise ConfigError(
            f"serial port {board.serial.url} does not exist (--serial, or board.serial.url in {profile.source}): "
            f"ports present: {serial_ports_present()}"
        )
    if board.power is not None:
        power_preflight(board.power)


class BoardMachine:
    """One board on a desk or in a rack, with the ports of ``settings`` (the profile's board
    section unless a subclass brings its own: the virtual bench).

    Its one capability is ``reflash``. ``events(stage, detail)`` (optional) hears about the
    steps before the console speaks: "flash", "flashed".
    """

    kind: ClassVar[str] = "board"
    console_is_evidence: ClassVar[bool] = True
    boots_on_this_host: ClassVar[bool] = False

    def __init__(
        self,
        profile: Profile,
        image: Path,
        console_log: ConsoleLog,
        image_format: str = "raw",
        settings: BoardSettings | None = None,
        accel: tuple[str, str] = ("board", ""),
    ) -> None:
        if profile.board is None:
            raise ConfigError(f"{profile.source}: a board needs a 'board:' section")
        self.profile = profile
        self.image = image.resolve()
        self.image_format = image_format
        self.console_log = console_log
        self.events: MachineEvents | None = None
        self.console: Console | None = None
        self.powered_on_at = 0.0
        self.prepared = False
        self.flashed = False
        self.flash_result: FlashResult | None = None
        self._on = False
        self.lock: DeviceLock | None = None
        self._power: Power | None = None
        self.workdir = private_dir("testbed-board-")
        self.overlay = self.workdir / "disk.qcow2"
        self.settings: BoardSettings = settings or profile.board
        self.accel, self.accel_note = accel
        try:
            if self.settings.serial is None or self.settings.power is None:
                raise ConfigError(
                    f"{profile.source}: board {profile.name} needs board.serial and board.power "
                    "(or --serial and --relay)"
                )
            self.serial = self.settings.serial
            self.lock = DeviceLock(self.serial.url, what=f"board {profile.name} (serial {self.serial.url})")
            self.lock.acquire(self.settings.lock_wait)
            self._power = make_power(self.settings.power)
            self.flasher = make_flasher(self.settings.flash) if self.settings.flash else None
        except BaseException:
            self.close()
            raise

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(reflash=self)

    @property
    def power(self) -> Power:
        if self._power is None:
            raise InfraError(f"board {self.profile.name}: its power driver was not set up")
        return self._power

    def _event(self, stage: str, detail: str) -> None:
        if self.events is not None:
            self.events(stage, detail)

    # -- storage -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the overlay the DUT writes config.json into (once per device)."""
        if self.prepared:
            return
        qemu_img("create", "-q", "-f", "qcow2", "-F", self.image_format, "-b", str(self.image), str(self.overlay))
        self.prepared = True

    def reflash(self) -> None:
        """Write the image again at the next power on (the board's way back to its first boot)."""
        self.flashed = False

    def flash(self) -> FlashResult | None:
        """Power off, then write the overlay (image + effective config.json) to the board's storage."""
        self.prepare()
        if self.flasher is None:
            self.console_log.mark("no flasher in the profile: the board boots what its storage holds")
            self.flashed = True
            return None
        self.power.off()
        self._on = False
        raw = self.workdir / "flash.img"
        t0 = time.monotonic()
        self._event("flash", f"writing the image to {self._flash_target()}")
        with ev.step(f"flash the image to {self._flash_target()}", device=self.profile.name) as step:
            qemu_img("convert", "-q", "-f", "qcow2", "-O", "raw", str(self.overlay), str(raw))
            # Unlinked before the long write, read through /proc/self/fd: a killed run leaves no
            # image-sized file behind.
            fd = os.open(raw, os.O_RDONLY | os.O_CLOEXEC)
            raw.unlink()
            try:
                result = self.flasher.flash(Path(f"/proc/self/fd/{fd}"))
            finally:
                os.close(fd)
            step.stdout = f"{result.bytes_written} bytes to {result.target}, verified: {result.verified}"
        self.flash_result = result
        self.flashed = True
        detail = (
            f"{result.bytes_written >> 20} MiB to {result.target} in {time.monotonic() - t0:.1f}s"
            f"{', verified' if result.verified else ''}"
        )
        self.console_log.mark(f"flashed {detail}")
        self._event("flashed", detail)
        return result

    def _flash_target(self) -> str:
        spec = self.settings.flash or {}
        return str(spec.get("device") or spec.get("sg") or spec.get("driver"))

    # -- power -------------------------------------------------------------------------
    def _open_console(self) -> Console:
        transport = SerialTransport(self.serial.url, self.serial.baudrate)
        self.console = Console(
            transport, self.console_log, name=f"{self.profile.name} serial console {self.serial.url}"
        )
        return self.console

    def power_on(self) -> Console:
        """Flash if needed, open the serial console, switch the power on; return the console."""
        if self._on:
            raise InfraError("power_on: the board is already on")
        if not self.flashed:
            self.flash()
        console = self._open_console()
        self.console_log.mark(f"power on ({self.accel})")
        self.powered_on_at = time.monotonic()
        try:
            self.power.on()
        except InfraError as exc:
            tail = console.tail()
            self._close_console()
            raise InfraError(f"{exc}\nlast console lines:\n{tail or '(nothing)'}") from None
        self._on = True
        return console

    def _close_console(self) -> None:
        if self.console is not None:
            self.console.close()
            self.console = None

    def power_cut(self) -> None:
        """Switch the power off at once (for a relay, a cut is an off)."""
        try:
            if self._on:
                self.power.cut()
                self.console_log.mark("power cut")
        finally:
            self._on = False
            self._close_console()

    def power_off(self, timeout: float) -> None:
        """A board has no ACPI button here: the power is switched off."""
        self.power_cut()

    def is_on(self) -> bool:
        return self._on

    def check_alive(self) -> None:
        """InfraError if the lab side broke: the serial adapter vanished, the bench failed."""
        console = self.console
        if console is not None and console.closed:
            reason = console.closed_reason or f"serial console {self.serial.url} closed"
            raise InfraError(f"{reason}; last console lines:\n{console.tail()}")

    def endpoint(self, name: str, hostname: str | None = None) -> tuple[str, int]:
        """Where sshd (``ssh``) or the engine (``engine``) answers: the profile's host, else ``<hostname>.local``."""
        ssh = self.settings.ssh
        port = {"ssh": ssh.port or self.profile.ssh.port, "engine": self.profile.dev.engine_port}[name]
        if ssh.host:
            return ssh.host, port
        if hostname:
            return f"{hostname}.local", port
        raise ConfigError(
            f"{self.profile.source}: no address for board {self.profile.name}: set board.ssh.host (or pass "
            "--ssh-host), or give the device a hostname in config.json to reach it as <hostname>.local"
        )

    def network_up(self) -> bool | None:
        """A board's NIC cannot be watched from the farm: SSH probes go from power on."""
        return None

    def facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "machine": "board",
            "serial": self.serial.url,
            "baudrate": self.serial.baudrate,
            "power": (self.settings.power or {}).get("driver", ""),
            "flasher": (self.settings.flash or {}).get("driver", "none"),
        }
        if self.flash_result is not None:
            facts["flash"] = {
                "target": self.flash_result.target,
                "bytes": self.flash_result.bytes_written,
                "seconds": round(self.flash_result.seconds, 1),
                "verified": self.flash_result.verified,
                "sha256": self.flash_result.sha256,
            }
        return facts

    def close(self) -> None:
        """Power off, close the console and the power driver, release the lock and the bench."""
        try:
            if self._on:
                try:
                    self.power_cut()
                except InfraError:
                    pass
            self._close_console()
            if self._power is not None:
                self._power.close()
        finally:
            if self.lock is not None:
                self.lock.release()
            shutil.rmtree(self.workdir, ignore_errors=True)
