"""The device under test: a machine, its console, SSH on 22222, power, and the evidence of each command.

Tests talk to a DUT, never to QEMU or a serial port. What the DUT is made of:

- the machine (``testbed.machines``): the core every machine has, and its capabilities,
  exposed here as ``dut.snapshots``, ``dut.link``, ``dut.media``, ``dut.reflasher`` (``None``
  where the machine has none; see ``testbed.capabilities.require``);
- the boot model (``testbed.boot``): the boot state and every boot with its stages;
  ``testbed.bootcontrol`` powers on, reboots and waits;
- the event stream (``testbed.events``): every command and step is an ``Event`` on the test
  that ran it.

``open_dut(...)`` makes one: the console log, the machine for the profile, the DUT.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from testbed import events as ev
from testbed.boot import BootModel, BootRecord, BootState, Listener
from testbed.bootcontrol import BootControl
from testbed.console import CommandResult, Console, ConsoleLog
from testbed.errors import ConfigError, DutError, InfraError
from testbed.machines import make_machine
from testbed.machines.base import ExtraMedia, LinkControl, Machine, Reflash
from testbed.profile import Profile
from testbed.provision import provision
from testbed.snapshots import SnapshotStore
from testbed.ssh import METHODS, AuthRefused, SshClient, load_or_create_key
from testbed.trouble import TroubleLog
from testbed.util import cache_dir, wait_until
from testbed.warm import WarmDevice, WarmStore, warm_key

# The running root's label: root=LABEL=... on the kernel command line, else the partition name
# of the device mounted on /.
_RUNNING_ROOT = (
    "for a in $(cat /proc/cmdline); do case $a in root=LABEL=*) echo ${a#root=LABEL=}; exit;; esac; done;"
    ' lsblk -no PARTLABEL "$(findmnt -no SOURCE /)"'
)


# How long a machine whose SSH broke may take to be seen dead (its exit collected), in seconds.
MACHINE_DEATH_S = 3.0

# A shell saying a command does not exist: bash ("bash: line 1: jq: command not found") and
# dash ("sh: 1: jq: not found").
_MISSING_TOOL = re.compile(
    r"^(?:[\w./-]+: )?(?:line \d+: )?([\w.+-]+): command not found$|^[\w./-]+: \d+: ([\w.+-]+): not found$", re.M
)


def missing_tool(result: CommandResult) -> str | None:
    """The command the device's shell did not find while running ``result``, if any."""
    found = _MISSING_TOOL.search(result.stderr)
    return (found.group(1) or found.group(2)) if found else None


def describe_failure(result: CommandResult) -> str:
    out = (result.stdout + result.stderr).strip()[-1500:]
    return f"`{result.command}` exited {result.exit_code} over {result.transport}:\n{out}"


def command_event(result: CommandResult, device: str) -> ev.Event:
    return ev.Event(
        kind="command", what=result.command, transport=result.transport, started=result.started,
        duration_s=result.duration_s, exit_code=result.exit_code, stdout=result.stdout, stderr=result.stderr,
        device=device,
    )  # fmt: skip


class Power:
    """``dut.power``: the device's power, as a relay would switch it."""

    def __init__(self, dut: DUT) -> None:
        self._dut = dut

    def cut(self) -> None:
        """Abrupt power loss: no shutdown, nothing flushed."""
        with self._dut.step("power cut"):
            self._dut.machine.power_cut()
            self._dut.ssh.close()
            self._dut.boot.model.off("power cut")

    def on(
        self,
        wait: bool = True,
        timeout: float | None = None,
        max_boots: int | None = None,
        tolerate_panics: bool = False,
    ) -> BootRecord | None:
        """Power on; with ``wait``, until SSH answers (options as for ``DUT.wait_ready``)."""
        return self._dut.boot.power_on(
            "power-cycle", wait=wait, timeout=timeout, max_boots=max_boots, tolerate_panics=tolerate_panics
        )


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
            raise DutError(describe_failure(result))
        return result

    def expect(self, pattern: str, timeout: float, what: str) -> int:
        return self.raw.expect(pattern, timeout, what)

    def tail(self, lines: int = 25) -> str:
        return self.raw.tail(lines)


class Link:
    """``dut.link``: the device's network link switched as a step (the link-control capability)."""

    def __init__(self, dut: DUT, link: LinkControl) -> None:
        self._dut, self._link = dut, link

    def set_link(self, up: bool) -> None:
        with self._dut.step(f"network link {'up' if up else 'down'}"):
            self._link.set_link(up)


def open_dut(
    profile: Profile,
    image: Path,
    image_format: str,
    console_log_path: Path,
    *,
    media: dict[str, Path] | None = None,
    lab_nics: list[Any] | None = None,
    **options: Any,
) -> DUT:
    """A device of ``profile`` booting ``image`` (never written): its console log, machine and DUT.
    ``media`` and ``lab_nics`` go to the machine and the DUT, ``options`` to the DUT (its keywords)."""
    console_log = ConsoleLog(console_log_path)
    console_log.open()
    try:
        machine = make_machine(profile, image, console_log, image_format, lab_nics=lab_nics, media=media)
    except BaseException:
        console_log.close()
        raise
    return DUT(profile, machine, console_log, image=image, media=media, lab_nics=lab_nics, **options)


class DUT:
    """A device under test (see the module's docstring)."""

    def __init__(
        self,
        profile: Profile,
        machine: Machine,
        console_log: ConsoleLog,
        *,
        image: Path,
        name: str = "",
        config_overrides: dict[str, Any] | None = None,
        boot_files: dict[str, bytes] | None = None,
        media: dict[str, Path] | None = None,
        lab_nics: list[Any] | None = None,
        listener: Listener | None = None,
    ) -> None:
        self.profile = profile
        self.machine = machine
        self.console_log = console_log
        self.image = image
        self.name = name or profile.name
        self.config_overrides = dict(config_overrides or {})
        self.boot_files = dict(boot_files or {})
        self.media = dict(media or {})
        self.lab_nics = list(lab_nics or [])
        self.config: dict[str, Any] = {}
        self.boot = BootControl(self, BootModel(self.name, profile.console, listener))
        self.trouble = TroubleLog(self.name)
        machine.events = self.boot.model.on_machine_event
        self.key = load_or_create_key(cache_dir() / "keys" / "id_ed25519")
        host, port = self._ssh_endpoint(required=False)
        self.ssh = SshClient(host, port, profile.ssh.user, self.key)
        self.console = ConsoleAccess(self)
        self.power = Power(self)
        caps = machine.capabilities
        self.snapshots = SnapshotStore(self, caps.snapshots, caps.disk_copy) if caps.snapshots else None
        self.link = Link(self, caps.link) if caps.link else None
        self.reflasher: Reflash | None = caps.reflash
        self.media_access: ExtraMedia | None = caps.media
        self._board_points: set[str] = set()  # snapshot names on a machine without snapshots

    # -- state and evidence -------------------------------------------------------------
    @property
    def state(self) -> BootState:
        return self.boot.model.state

    @property
    def boots(self) -> list[BootRecord]:
        return self.boot.model.boots

    @property
    def development_mode(self) -> bool:
        return self.config.get("developmentMode") in (True, "true")

    def step(self, what: str) -> AbstractContextManager[ev.Event]:
        """Record an action on this device as a step of the running test (``with dut.step(...)``)."""
        return ev.step(what, device=self.name)

    def record(self, result: CommandResult) -> None:
        ev.emit(command_event(result, self.name))

    def record_note(self, what: str, output: str, ok: bool = True, transport: str = "farm") -> None:
        """Evidence for something checked from the farm's side (an HTTP request, an SSH login)."""
        ev.note(what, output, ok=ok, transport=transport, device=self.name)

    # -- set-up -------------------------------------------------------------------------
    def _ssh_endpoint(self, required: bool = True) -> tuple[str, int]:
        try:
            return self.endpoint("ssh")
        except ConfigError:
            if required:
                raise
            return "", self.profile.ssh.port

    def provision(self) -> None:
        """Write the effective config.json into the overlay (once; never into the image)."""
        if self.machine.prepared:
            return
        self.adopt_config(provision(self.machine, self.profile, self.key, self.config_overrides, self.boot_files))

    def adopt_config(self, config: dict[str, Any]) -> None:
        """``config`` is the device's config.json now; a board may be found by its hostname."""
        self.config = config
        self.ssh.host, self.ssh.port = self._ssh_endpoint()

    # -- boots (see testbed.bootcontrol) ------------------------------------------------
    def power_on(self, kind: str = "cold", *, wait: bool = True, timeout: float | None = None) -> BootRecord | None:
        """Power on and (with ``wait``) wait until SSH answers; ``wait=False`` returns once it runs."""
        return self.boot.power_on(kind, wait=wait, timeout=timeout)

    def finish_power_on(self, timeout: float | None = None) -> BootRecord:
        """Wait for SSH after ``power_on(wait=False)``; its times count from the power on."""
        return self.boot.finish_power_on(timeout)

    def wait_ready(
        self, timeout: float | None = None, max_boots: int | None = None, tolerate_panics: bool = False
    ) -> BootRecord:
        """Wait for SSH after the device was started or rebooted some other way (see BootControl.wait)."""
        return self.boot.wait_ready(timeout, max_boots, tolerate_panics)

    def start_reboot(self) -> float:
        return self.boot.start_reboot()

    def reboot(
        self, timeout: float | None = None, max_boots: int | None = None, tolerate_panics: bool = False
    ) -> BootRecord:
        """Reboot through the OS and wait until SSH answers on the new boot."""
        return self.boot.reboot(timeout, max_boots, tolerate_panics)

    def power_cycle(self) -> BootRecord:
        """Power cut, power on, wait for SSH."""
        self.power.cut()
        record = self.boot.power_on("power-cycle")
        assert record is not None  # waited for
        return record

    def reflash(self) -> BootRecord:
        """Back to the first boot by writing the image again (the reflash capability), then a cold boot."""
        if self.reflasher is None:
            raise ValueError(f"{self.name}: a {self.machine.kind} device cannot be flashed again")
        self.power.cut()
        with self.step("write the image again at the next power on"):
            self.reflasher.reflash()
        record = self.boot.power_on("reflash")
        assert record is not None  # waited for
        return record

    # -- first-boot points: snapshots, or a reflash ----------------------------------------
    def save_snapshot(self, name: str = "ready") -> float:
        """Remember this moment as ``name``; return seconds taken. Without snapshots the point
        is the image itself, and ``restore`` flashes it again and cold-boots."""
        if self.snapshots is None:
            self._board_points.add(name)
            return 0.0
        return self.snapshots.save(name)

    def restore(self, name: str = "ready") -> BootRecord:
        """Return to ``name`` and wait until SSH answers again."""
        if self.snapshots is not None:
            return self.snapshots.restore(name)
        if name not in self._board_points:
            raise ValueError(f"no snapshot named {name!r} was taken on {self.name}")
        return self.reflash()

    # -- warm devices (testbed.warm): the first boot's snapshot kept between runs ----------
    def _warm_key(self, image_sha256: str, accel: str) -> str:
        """Everything this device's first boot depends on besides testbed itself (see warm_key)."""
        config = {
            "overrides": self.config_overrides, "key": self.key.get_base64(),
            "boot_files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(self.boot_files.items())},
            "media": sorted(self.media),
        }  # fmt: skip
        profile = self.profile.model_dump(mode="json", exclude={"source"})
        return warm_key(image_sha256=image_sha256, profile=profile, config=config, accel=accel)

    def start_warm(self, store: WarmStore, image_sha256: str) -> WarmDevice | None:
        """Before the first power on: restore this device from a warm device of an earlier run
        (its ``ready`` snapshot) and wait for SSH; None where there is none (then boot it)."""
        copier = self.snapshots.disk_copy if self.snapshots is not None else None
        if copier is None or self.lab_nics or self.state != BootState.OFF:
            return None  # a NIC on the lab network has one owner: never from a snapshot
        taken: list[WarmDevice] = []
        first_log = self.console_log.path.with_name(f".{self.console_log.path.name}.first-boot")

        def load(destinations: dict[str, Path], accel: str) -> bool:
            entry = store.take(self._warm_key(image_sha256, accel), {**destinations, "console.log": first_log})
            taken.extend([entry] if entry is not None else [])
            return entry is not None

        if not copier.import_disks(load):
            return None
        entry = taken[0]
        # The first boot's console, as the run that kept the warm device saw it: the evidence
        # of the boot this run did not make (the kernel banner, the services starting).
        self.console_log.insert_earlier(f"first boot, from the warm device of {entry.created}", first_log.read_text())
        first_log.unlink()
        assert self.snapshots is not None
        self.adopt_config(entry.meta["config"])
        self.snapshots.console_logged_in = {str(k): bool(v) for k, v in entry.meta["console_logged_in"].items()}
        self.restore("ready")
        return entry

    def keep_warm(self, store: WarmStore, image_sha256: str, first_boot: dict[str, Any]) -> WarmDevice | None:
        """Keep this device's ``ready`` snapshot (taken right after its first boot) for later runs."""
        copier = self.snapshots.disk_copy if self.snapshots is not None else None
        if copier is None or self.snapshots is None or "ready" not in self.snapshots.names or self.lab_nics:
            return None
        key = self._warm_key(image_sha256, self.machine.accel)
        meta = {"device": self.name, "config": self.config, "first_boot": first_boot,
                "console_logged_in": dict(self.snapshots.console_logged_in)}  # fmt: skip
        with self.step("keep a warm device for later runs"):
            return copier.export_disks(
                lambda files: store.save(key, {**files, "console.log": self.console_log.path}, meta)
            )

    def copy_to(self, other: DUT) -> None:
        """Make ``other`` a twin of this device (see ``SnapshotStore.make_twin``)."""
        if self.snapshots is None:
            raise ValueError(f"{self.name}: a {self.machine.kind} device has no snapshots to share with a twin")
        self.snapshots.make_twin(other)

    # -- commands -----------------------------------------------------------------------
    def run(self, command: str, timeout: float | None = None, check: bool = False) -> CommandResult:
        """Run a shell command over SSH; the result is kept as evidence on the running test."""
        if not self.ssh.connected():
            self.ssh.wait_ready(self.profile.timeouts.restore_to_ssh, abort=self.boot.abort_if_dead)
        try:
            result = self.ssh.run(command, timeout or self.profile.timeouts.command)
        except InfraError as broken:
            raise self._death_or(broken) from broken
        self.record(result)
        self._require_tools(result)
        if check and not result.ok:
            raise DutError(describe_failure(result))
        return result

    def _death_or(self, broken: InfraError) -> InfraError:
        """SSH broke: if the machine died, that is the fault to report (QEMU's exit code), not
        the connection it took with it. The sockets of a killed process close a moment before
        its exit can be collected, so the death is waited for briefly."""

        def died() -> InfraError | None:
            try:
                self.machine.check_alive()
            except InfraError as exc:
                return exc
            return None

        return wait_until(died, MACHINE_DEATH_S, "the machine's exit after its SSH broke", on_timeout=lambda _: broken)

    def _require_tools(self, result: CommandResult) -> None:
        """A check whose command needs a tool the image lacks cannot say anything about its
        promise: it fails naming the tool, not with the shell's raw error (or, worse, with a
        wrong answer where the command's output was read anyway)."""
        tool = missing_tool(result)
        if tool is None:
            return
        raise DutError(
            f"this check could not be made: the image on {self.name} lacks `{tool}` "
            f'(its shell said "{tool}: not found" running `{result.command}`); an image '
            f"certified with this suite needs `{tool}`, or this promise cannot be checked on it"
        )

    def ssh_offered_methods(self) -> list[str]:
        """The authentication methods the device's sshd offers a new client that logs in as the
        profile's user and tries ``none`` first (what a client is told it may try next);
        ``["none"]`` if ``none`` itself was accepted. Recorded as evidence."""
        host, port = self.endpoint("ssh")
        offered = SshClient(host, port, self.profile.ssh.user).offered_methods(timeout=20)
        self.record_note(f"ssh {self.profile.ssh.user}@{host}:{port}: methods offered after `none`", ", ".join(offered))
        return offered

    def host_key(self) -> str:
        """The SSH host key this device presents now (type and SHA256 fingerprint)."""
        if not self.ssh.connected():
            self.ssh.wait_ready(self.profile.timeouts.restore_to_ssh, abort=self.boot.abort_if_dead)
        key = self.ssh.server_key()
        self.record_note("SSH host key presented", key)
        return key

    def upload(self, local: Path, remote: str, timeout: float = 600) -> CommandResult:
        """Copy a (large) file to the device over SSH, zstd-compressed on the way when the device
        has zstd (decompressed there into a sparse file); ``remote`` appears only once complete."""
        local = Path(local)
        if not local.is_file():
            raise ConfigError(f"{local}: no such file to upload to {self.name}")
        quoted, partial = shlex.quote(remote), shlex.quote(remote + ".partial")
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
            raise DutError(describe_failure(result))
        return result

    def media_device(self, name: str) -> str:
        """Where the device sees the attached medium ``name`` (see ``media``)."""
        if name not in self.media or self.media_access is None:
            raise ValueError(f"{self.name} has no medium named {name!r} (attached: {sorted(self.media)})")
        return self.media_access.media_device(name)

    def boot_id(self) -> str:
        return self.ssh.run("cat /proc/sys/kernel/random/boot_id", 30).stdout.strip()

    def running_root(self) -> str:
        """The partition label of the running root filesystem (e.g. "resin-rootB")."""
        out = self.run(_RUNNING_ROOT, check=True).stdout.strip()
        return out.splitlines()[0] if out else ""

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
        if self.state == BootState.SSH_READY:
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
        self.boot.release_slot()
        self.machine.close()
        self.console_log.close()
        if self.state != BootState.OFF:
            self.boot.model.off("closed")
