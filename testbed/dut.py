"""The device under test: a machine, its console, SSH on 22222, power, and the evidence of each command.

States: off -> booting -> ssh-ready. Tests talk to a DUT, never to QEMU or a serial port.
"""

from __future__ import annotations

import copy
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import image as img
from testbed.console import CommandResult, Console, ConsoleLog, utcnow
from testbed.errors import ConfigError, DutError, InfraError
from testbed.machines import make_machine
from testbed.machines.qemu import TapNic
from testbed.profile import Profile
from testbed.ssh import METHODS, AuthRefused, SshClient, load_or_create_key
from testbed.util import cache_dir

EvidenceSink = Callable[[dict[str, Any]], None]
KERNEL_BANNER = re.compile(r"Linux version \d")

# The running root's label: root=LABEL=... on the kernel command line, else the partition name
# of the device mounted on /.
_RUNNING_ROOT = (
    "for a in $(cat /proc/cmdline); do case $a in root=LABEL=*) echo ${a#root=LABEL=}; exit;; esac; done;"
    ' lsblk -no PARTLABEL "$(findmnt -no SOURCE /)"'
)
StageListener = Callable[[str, float | None, str], None]
# How long after a power on or reboot SSH probes wait at most for the device's NIC to come up
# (see DUT._network_gate): a guest that brings it up without telling QEMU is then probed anyway.
NETWORK_HINT_LIMIT = 90.0


@dataclass
class BootRecord:
    """One boot of the device, as seen from testbed."""

    kind: str  # cold | reboot | power-cycle | restore | reflash
    started: float
    ssh_ready_s: float | None = None
    login_prompt_s: float | None = None
    firmware_s: float | None = None
    kernel_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ssh_ready_s": self.ssh_ready_s,
            "login_prompt_s": self.login_prompt_s,
            "firmware_s": self.firmware_s,
            "kernel_s": self.kernel_s,
        }


@dataclass
class Power:
    """``dut.power``: the device's power, as a relay would switch it."""

    dut: DUT

    def cut(self) -> None:
        """Abrupt power loss: no shutdown, nothing flushed."""
        self.dut.machine.power_cut()
        self.dut.ssh.close()
        self.dut.state = "off"

    def on(self, wait: bool = True, **wait_options: Any) -> BootRecord | None:
        """Power on; with ``wait``, until SSH answers (options as for ``DUT.wait_ready``)."""
        return self.dut.power_on(kind="power-cycle", wait=wait, **wait_options)


class ConsoleAccess:
    """``dut.console``: commands over the serial console, recorded as evidence."""

    def __init__(self, dut: DUT) -> None:
        self._dut = dut

    @property
    def raw(self) -> Console:
        console = self._dut.machine.console
        if console is None:
            raise InfraError(f"{self._dut.name} is off: no console")
        return console

    def login(self) -> None:
        c = self._dut.profile.console
        self.raw.login(c.user, c.login_prompt, self._dut.profile.timeouts.boot_to_login)

    def run(self, command: str, timeout: float | None = None, check: bool = False) -> CommandResult:
        console = self.raw
        if not console.logged_in:
            self.login()
        result = console.run(command, timeout or self._dut.profile.timeouts.command)
        self._dut.record(result)
        if check and not result.ok:
            raise DutError(_describe_failure(result))
        return result

    def expect(self, pattern: str, timeout: float, what: str) -> int:
        return self.raw.expect(pattern, timeout, what)

    def tail(self, lines: int = 25) -> str:
        return self.raw.tail(lines)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; nested objects are merged, ``None`` removes a key."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe_failure(result: CommandResult) -> str:
    out = (result.stdout + result.stderr).strip()[-1500:]
    return f"`{result.command}` exited {result.exit_code} over {result.transport}:\n{out}"


@dataclass
class DUT:
    """A device under test."""

    profile: Profile
    image: Path
    image_format: str
    console_log_path: Path
    name: str = ""
    state: str = "off"
    boots: list[BootRecord] = field(default_factory=list)
    sink: EvidenceSink | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    boot_files: dict[str, bytes] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    media: dict[str, Path] = field(default_factory=dict)  # read-only disks attached from power-on
    lab_nics: list[TapNic] = field(default_factory=list)  # NICs on the farm's lab network, after net0
    _snapshot_console_logged_in: dict[str, bool] = field(default_factory=dict)
    kernel_starts: int = 0  # kernel banners seen on the console, over all boots
    stage_listener: StageListener | None = None

    def __post_init__(self) -> None:
        self.name = self.name or self.profile.name
        self.console_log = ConsoleLog(self.console_log_path)
        self.console_log.open()
        self._firmware_re = re.compile(self.profile.console.firmware_pattern)
        self._kernel_re = re.compile(self.profile.console.kernel_pattern)
        try:
            self.machine = make_machine(
                self.profile, self.image, self.console_log, self.image_format, lab_nics=self.lab_nics, media=self.media
            )
        except BaseException:
            self.console_log.close()
            raise
        if hasattr(self.machine, "events"):
            self.machine.events = lambda stage, detail: self._stage(stage, None, detail)
        self.key = load_or_create_key(cache_dir() / "keys" / "id_ed25519")
        host, port = self._ssh_endpoint(required=False)
        self.ssh = SshClient(host, port, self.profile.ssh.user, self.key)
        self.console = ConsoleAccess(self)
        self.power = Power(self)

    # -- evidence ----------------------------------------------------------------------
    def record(self, result: CommandResult) -> None:
        if self.sink is not None:
            self.sink(result.as_evidence())

    def _stage(self, stage: str, seconds: float | None, detail: str = "") -> None:
        if self.stage_listener is not None:
            self.stage_listener(stage, seconds, detail)

    def _ssh_endpoint(self, required: bool = True) -> tuple[str, int]:
        try:
            return self.endpoint("ssh")
        except ConfigError:
            if required:
                raise
            return "", self.profile.ssh.port

    # -- boot --------------------------------------------------------------------------
    def _abort_if_dead(self) -> None:
        self.machine.check_alive()
        if self.machine.console is not None:
            self.machine.console.check_fault()
        self._check_stage_deadlines()

    def _check_stage_deadlines(self) -> None:
        """A boot that stalls before SSH fails at its named timeout, with the console tail.

        No kernel by ``timeouts.boot_to_login``: the lab's fault (no power, serial wiring,
        an unwritten card: InfraError). A kernel but no login prompt by then, where a
        serial getty is promised (development mode): the device's fault (DutError).
        """
        # Boards only: QEMU's own faults show as QEMU dying, and an image may keep its kernel
        # off the serial console. Not after a reboot: the shutdown's own time counts there.
        if self.machine.kind != "board":
            return
        if not self.boots or self.boots[-1].kind not in ("cold", "power-cycle", "reflash"):
            return
        record = self.boots[-1]
        limit = self.profile.timeouts.boot_to_login
        if time.monotonic() - record.started < limit:
            return
        console = self.machine.console
        tail = console.tail() if console is not None else ""
        if record.kernel_s is None:
            seen = (
                f"the firmware started after {record.firmware_s:.1f}s but no kernel followed"
                if record.firmware_s is not None
                else "neither firmware nor kernel showed on the console"
            )
            raise InfraError(
                f"{self.name} did not start a kernel within {limit:g}s of power on (timeouts.boot_to_login): {seen}. "
                "Check the boot medium was written, the power and the serial wiring and baud rate; "
                f"last console lines:\n{tail or '(nothing)'}"
            )
        if self.development_mode and record.login_prompt_s is None:
            raise DutError(
                f"{self.name} started its kernel after {record.kernel_s:.1f}s but showed no login prompt within "
                f"{limit:g}s of power on (timeouts.boot_to_login); last console lines:\n{tail}"
            )

    def prepare_disk(self) -> None:
        """Create the overlay and write the effective config.json into it (never into the image).

        testbed's public key is always added to ``os.sshKeys``: a production image lets in
        only the keys its config.json lists.
        """
        if self.machine.prepared:
            return
        self.machine.prepare()
        boot_label = self.profile.layout.partitions[0].label
        config = img.read_config_json(self.machine.overlay, boot_label)
        config = _merge(config, self.config_overrides)
        public = f"{self.key.get_name()} {self.key.get_base64()} testbed"
        os_section = config.setdefault("os", {})
        keys = list(os_section.get("sshKeys") or [])
        if public not in keys:
            keys.append(public)
        os_section["sshKeys"] = keys
        img.write_config_json(self.machine.overlay, config, boot_label)
        if self.boot_files:
            layout = img.read_layout(self.machine.overlay)
            img.write_files_to_fat_in_overlay(self.machine.overlay, layout.by_label(boot_label), self.boot_files)
        self.config = config
        # A board may be found by the hostname config.json gives it (<hostname>.local).
        self.ssh.host, self.ssh.port = self._ssh_endpoint()

    @property
    def development_mode(self) -> bool:
        return self.config.get("developmentMode") in (True, "true")

    def power_on(self, kind: str = "cold", *, wait: bool = True, **wait_options: Any) -> BootRecord | None:
        """Power on and wait until SSH answers; the boot is recorded with its timings.

        ``wait=False`` returns once the machine runs (for a power cut at a chosen moment);
        ``wait_options`` are those of :meth:`wait_ready`.
        """
        self.prepare_disk()
        console = self.machine.power_on()
        record = BootRecord(kind=kind, started=self.machine.powered_on_at)
        self.boots.append(record)
        self._stage("power on", 0.0, self.machine.accel)
        console.watchers.append(self._watch_console)
        # What the console showed before the watcher was attached (a board's firmware speaks
        # at once); a line seen twice changes nothing.
        for line in console.lines():
            self._watch_console(line, replay=True)
        self.state = "booting"
        if not wait:
            return None
        return self._wait_boot(kind, self.machine.powered_on_at, record, **wait_options)

    def _watch_console(self, line: str, replay: bool = False) -> None:
        """Runs on the console reader thread: count kernel starts; note when this boot showed
        firmware, kernel and a login."""
        if KERNEL_BANNER.search(line) and not replay:
            self.kernel_starts += 1
        if not self.boots:
            return
        record = self.boots[-1]
        now = round(time.monotonic() - record.started, 3)
        if record.firmware_s is None and record.kernel_s is None and self._firmware_re.search(line):
            record.firmware_s = now
            self._stage("firmware", now, line.strip()[:80])
        if record.kernel_s is None and self._kernel_re.search(line):
            record.kernel_s = now
            self._stage("kernel", now, line.strip()[:80])
        if record.login_prompt_s is None and re.search(r"login: ?$", line):
            record.login_prompt_s = now
            self._stage("login", now, line.strip()[:80])

    def _wait_boot(
        self,
        kind: str,
        started: float,
        record: BootRecord | None = None,
        timeout: float | None = None,
        max_boots: int | None = None,
        tolerate_panics: bool = False,
    ) -> BootRecord:
        if record is None:
            record = BootRecord(kind=kind, started=started)
            self.boots.append(record)
        timeout = timeout or self.profile.timeouts.boot_to_ssh
        first_start = self.kernel_starts

        def abort() -> None:
            if tolerate_panics and self.machine.console is not None:
                self.machine.console.clear_fault()
            self._abort_if_dead()
            starts = self.kernel_starts - first_start
            if max_boots is not None and starts > max_boots:
                raise DutError(
                    f"the kernel started {starts} times without SSH coming up (at most {max_boots} "
                    "boots expected: the device keeps booting a root that does not come up)"
                )

        try:
            self.ssh.wait_ready(
                timeout, abort=abort, reachable=None if kind == "restore" else self._network_gate(started)
            )
        except DutError as exc:
            tail = self.machine.console.tail() if self.machine.console else ""
            raise DutError(
                f"{self.name} did not become ready over SSH on port {self.profile.ssh.port} "
                f"(forwarded to {self.ssh.host}:{self.ssh.port}): {exc}\nlast console lines:\n{tail}"
            ) from None
        record.ssh_ready_s = round(time.monotonic() - started, 3)
        self.console_log.mark(f"ssh ready after {record.ssh_ready_s:.1f}s ({kind})")
        self._stage("ssh ready", record.ssh_ready_s, f"{self.ssh.host}:{self.ssh.port}")
        self.state = "ssh-ready"
        return record

    def _network_gate(self, started: float) -> Callable[[], str] | None:
        """For the SSH wait of a boot: why the device cannot answer yet ("" once it can).

        Where the machine shows when the guest brings its NIC up (QEMU with a virtio NIC),
        SSH probes wait for that, so that no early probe costs the booting guest an sshd
        process; after ``NETWORK_HINT_LIMIT`` seconds they go anyway.
        """
        if self.machine.network_up() is None:
            return None

        def why() -> str:
            if self.machine.network_up() or time.monotonic() - started > NETWORK_HINT_LIMIT:
                return ""
            return "the device has not brought its NIC up yet"

        return why

    def wait_ready(
        self, timeout: float | None = None, max_boots: int | None = None, tolerate_panics: bool = False
    ) -> BootRecord:
        """Wait for SSH after the device was started or rebooted some other way.

        ``timeout`` defaults to the profile's boot_to_ssh; ``max_boots`` fails the wait early
        once the kernel started more often than that (a boot loop); ``tolerate_panics`` lets
        kernel panics on the way pass (a root that is meant to fail).
        """
        return self._wait_boot("wait", time.monotonic(), None, timeout, max_boots, tolerate_panics)

    def finish_power_on(self, **wait_options: Any) -> BootRecord:
        """Wait for SSH after ``power_on(wait=False)``; the wait completes that boot's record
        (its times count from the power on). ``wait_options`` are those of :meth:`wait_ready`."""
        if not self.boots:
            raise InfraError(f"{self.name} was never powered on")
        record = self.boots[-1]
        if record.ssh_ready_s is not None:
            return record
        return self._wait_boot(record.kind, record.started, record, **wait_options)

    def start_reboot(self) -> float:
        """Ask the OS to reboot and return once the old boot is over (not waiting for the new one)."""
        console = self.machine.console
        assert console is not None
        console.drain()
        # The delay lets this command return before sshd stops. A timer's default accuracy is a
        # minute, and systemd spreads timers within it by a per-machine offset: without
        # AccuracySec some devices waited most of a minute before rebooting.
        self.ssh.run("systemd-run --on-active=300ms --timer-property=AccuracySec=10ms --no-block systemctl reboot", 30)
        self.ssh.close()
        self.state = "booting"
        t0 = time.monotonic()
        # Recorded from here, so the new boot's firmware and kernel lines count for it.
        record = BootRecord(kind="reboot", started=t0)
        self.boots.append(record)
        # The firmware starting again is the sign the old boot is over.
        console.expect(
            r"reboot: Restarting system|BdsDxe|Linux version", self.profile.timeouts.shutdown, "the device to restart"
        )
        return t0

    def reboot(
        self, timeout: float | None = None, max_boots: int | None = None, tolerate_panics: bool = False
    ) -> BootRecord:
        """Reboot through the OS and wait until SSH answers on the new boot (see :meth:`wait_ready`)."""
        before = self.boot_id()
        t0 = self.start_reboot()
        record = self._wait_boot("reboot", t0, self.boots[-1], timeout, max_boots, tolerate_panics)
        after = self.boot_id()
        if after == before:
            raise DutError(f"{self.name} did not reboot: boot_id is still {after}")
        return record

    def reflash(self) -> BootRecord:
        """A board's way back to its first boot: power off, write the image again, cold boot."""
        self.power.cut()
        self.machine.reflash()  # type: ignore[attr-defined]
        return self.power_on(kind="reflash")

    def power_cycle(self) -> BootRecord:
        """Power cut, power on, wait for SSH."""
        self.power.cut()
        return self.power_on(kind="power-cycle")

    def boot_id(self) -> str:
        return self.ssh.run("cat /proc/sys/kernel/random/boot_id", 30).stdout.strip()

    # -- snapshots ---------------------------------------------------------------------
    def save_snapshot(self, name: str = "ready") -> float:
        """Snapshot the running device (RAM, disk, firmware vars); return seconds taken.

        A board has no snapshots: its "snapshot" is the image it was flashed with, and
        ``restore`` flashes it again and cold-boots (see ``restore``).
        """
        t0 = time.monotonic()
        if not self.machine.snapshots:
            self._snapshot_console_logged_in[name] = False
            return 0.0
        self.ssh.close()
        self.machine.save_snapshot(name)
        console = self.machine.console
        self._snapshot_console_logged_in[name] = bool(console and console.logged_in)
        self.ssh.wait_ready(self.profile.timeouts.restore_to_ssh, abort=self._abort_if_dead)
        return time.monotonic() - t0

    def copy_to(self, other: DUT) -> None:
        """Make ``other`` a twin of this device: its disks become a copy of this device's, with
        every snapshot, and its config.json is this one's. ``other`` must come from the same
        profile, image and media and never have been powered on; it starts from one of the
        snapshots (``other.restore(name)``), so that two devices can share one set-up."""
        copy_disks = getattr(self.machine, "copy_disks_to", None)
        if copy_disks is None or not self.machine.snapshots:
            raise ConfigError(f"{self.name}: a {self.machine.kind} device has no disks to copy (QEMU only)")
        if other.state != "off" or other.boots:
            raise InfraError(f"{other.name} was already powered on: only a new device can be a twin of {self.name}")
        if (other.profile.name, other.image, other.media) != (self.profile.name, self.image, self.media):
            raise InfraError(f"{other.name} has another profile, image or media than {self.name}: it cannot be a twin")
        if self.lab_nics or other.lab_nics:
            # A snapshot holds every NIC's state, and a tap on the lab network has one owner.
            raise InfraError(f"{self.name} or {other.name} has a NIC on the lab network: a twin can have none")
        copy_disks(other.machine)
        other.config = copy.deepcopy(self.config)
        other.ssh.host, other.ssh.port = other._ssh_endpoint()
        other._snapshot_console_logged_in = dict(self._snapshot_console_logged_in)

    def restore(self, name: str = "ready") -> BootRecord:
        """Return to a snapshot and wait until SSH answers again."""
        if name not in self._snapshot_console_logged_in:
            raise InfraError(f"no snapshot named {name!r} was taken on {self.name}")
        if not self.machine.snapshots:
            return self.reflash()
        if not self.machine.is_on():
            self.machine.power_on().watchers.append(self._watch_console)
        self.ssh.close()
        t0 = time.monotonic()
        self.machine.load_snapshot(name)
        console = self.machine.console
        if console is not None:
            console.drain()
            console.logged_in = self._snapshot_console_logged_in[name]
        return self._wait_boot("restore", t0)

    # -- commands ----------------------------------------------------------------------
    def run(self, command: str, timeout: float | None = None, check: bool = False) -> CommandResult:
        """Run a shell command over SSH; the result is kept as evidence on the current test."""
        if not self.ssh.connected():
            self.ssh.wait_ready(self.profile.timeouts.restore_to_ssh, abort=self._abort_if_dead)
        result = self.ssh.run(command, timeout or self.profile.timeouts.command)
        self.record(result)
        if check and not result.ok:
            raise DutError(_describe_failure(result))
        return result

    def upload(self, local: Path, remote: str, timeout: float = 600) -> CommandResult:
        """Copy a (large) file to the device over SSH, zstd-compressed on the way when the device
        has zstd (decompressed there into a sparse file); ``remote`` appears only once complete."""
        local = Path(local)
        if not local.is_file():
            raise ConfigError(f"{local}: no such file to upload to {self.name}")
        quoted = shlex.quote(remote)
        partial = shlex.quote(remote + ".partial")
        has_zstd = self.run("command -v zstd", 30).exit_code == 0
        with open(local, "rb") as raw:
            if has_zstd:
                import zstandard

                stream: Any = zstandard.ZstdCompressor(level=1, threads=-1).stream_reader(raw)
                command = f"zstd -q -d -c --sparse > {partial} && mv -f {partial} {quoted}"
            else:
                stream = raw
                command = f"cat > {partial} && mv -f {partial} {quoted}"
            result = self.ssh.run(command, timeout, stdin=stream)
        result.command = f"upload {local} ({local.stat().st_size} bytes) to {remote}: {command}"
        self.record(result)
        if not result.ok:
            raise DutError(_describe_failure(result))
        return result

    def media_device(self, name: str) -> str:
        """Where the device sees the attached medium ``name`` (see ``media``)."""
        if name not in self.media:
            raise ConfigError(f"{self.name} has no medium named {name!r} (attached: {sorted(self.media)})")
        return self.machine.media_device(name)

    def running_root(self) -> str:
        """The partition label of the running root filesystem (e.g. "resin-rootB")."""
        out = self.run(_RUNNING_ROOT, check=True).stdout.strip()
        return out.splitlines()[0] if out else ""

    def record_note(self, what: str, output: str, ok: bool = True, transport: str = "farm") -> None:
        """Evidence for something checked from the farm's side (an HTTP request, an SSH login)."""
        self.record(
            CommandResult(
                command=what,
                exit_code=0 if ok else 1,
                stdout=output,
                stderr="",
                started=utcnow(),
                duration_s=0.0,
                transport=transport,
            )
        )

    def try_ssh_login(self, what: str, key: Any = None, methods: tuple[str, ...] = METHODS) -> str:
        """Try a fresh SSH login the way a user would; return "accepted (<method>)" or "refused: <why>".

        For checks of who may log in (development vs production, keys from config.json); the
        attempt is recorded as evidence under ``what``.
        """
        host, port = self.endpoint("ssh")
        client = SshClient(host, port, self.profile.ssh.user, key=key)
        try:
            client.connect_once(timeout=20, methods=methods)
            outcome = f"accepted ({client.auth_method})"
        except AuthRefused as exc:
            outcome = f"refused: {exc}"
        finally:
            client.close()
        self.record_note(f"ssh {self.profile.ssh.user}@{host}:{port} {what}", outcome)
        return outcome

    def endpoint(self, name: str) -> tuple[str, int]:
        """Where the farm reaches a device service ("ssh", "engine") from this host."""
        return self.machine.endpoint(name, self.config.get("hostname"))

    def read_file(self, path: str) -> str:
        return self.run(f"cat {shlex.quote(path)}", check=True).stdout

    def facts(self) -> dict[str, Any]:
        """What the device says about itself (OS, kernel) plus the machine's facts."""
        facts: dict[str, Any] = {"device": self.name, **self.machine.facts()}
        if self.state == "ssh-ready":
            try:
                osr = self.ssh.run("cat /etc/os-release; echo KERNEL=$(uname -r)", 30).stdout
                for line in osr.splitlines():
                    key, _, value = line.partition("=")
                    if key in ("PRETTY_NAME", "VERSION_ID", "KERNEL", "SLUG"):
                        facts[key.lower()] = value.strip().strip('"')
                root = self.ssh.run(_RUNNING_ROOT, 30).stdout.strip()
                facts["root"] = root.splitlines()[0] if root else ""
            except (DutError, InfraError):
                pass
        return facts

    def close(self) -> None:
        self.ssh.close()
        self.machine.close()
        self.console_log.close()
        self.state = "off"
