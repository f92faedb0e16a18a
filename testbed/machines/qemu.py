"""A device on QEMU: command line from the profile, a qcow2 overlay, QMP, snapshots, power.

The image under test is never written: QEMU boots a qcow2 overlay whose backing file is
the image, and a per-run copy of the firmware variables (qcow2 too, so ``savevm`` works).
QMP and the serial console are unix sockets in a private 0700 directory, bound by testbed
before QEMU starts and handed over as file descriptors, so there is nothing to poll for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from testbed import budget
from testbed.console import Console, ConsoleLog
from testbed.errors import ConfigError, InfraError
from testbed.machines.base import Capabilities, Machine, MachineEvents
from testbed.machines.qemu_process import QemuProcess
from testbed.machines.qmp import Qmp
from testbed.profile import Profile, QemuSettings
from testbed.util import OwnedProcess, free_port, listening_unix_socket, private_dir, qemu_img, require_tool

T = TypeVar("T")

_accel_cache: dict[tuple[str, str], tuple[str, str]] = {}


@dataclass(frozen=True)
class Forward:
    """A loopback-only port forward from the host to the guest."""

    name: str
    guest_port: int
    host_port: int


class TapNic(Protocol):
    """A second NIC on a tap device the farm opened (the lab network); QEMU gets its descriptor."""

    @property
    def fd(self) -> int: ...

    @property
    def mac(self) -> str: ...


def _firmware_paths(settings: QemuSettings, source: Path | None) -> tuple[Path, Path]:
    code, vars_ = settings.firmware.code, settings.firmware.vars
    for key, path in (("qemu.firmware.code", code), ("qemu.firmware.vars", vars_)):
        if not path.is_file():
            package = "qemu-efi-aarch64" if "aarch64" in settings.binary else "ovmf"
            raise ConfigError(
                f"{source}: {key} is {path}, which does not exist: install the firmware (apt-get install {package}) "
                f"or point {key} at it"
            )
    return code, vars_


def emulator_package(binary: str) -> str:
    """The Debian package that provides a QEMU system emulator."""
    name = Path(binary).name
    if "x86" in name or name.endswith("i386"):
        return "qemu-system-x86"
    if "aarch64" in name or "arm" in name:
        return "qemu-system-arm"
    return "qemu-system-misc"


def check_host(settings: QemuSettings, source: Path | None) -> None:
    """What a QEMU device of a profile needs on this host, checked before anything starts: the
    emulator, qemu-img and the firmware files. ConfigError naming the profile key and the fix."""
    if shutil.which(settings.binary) is None:
        package = emulator_package(settings.binary)
        raise ConfigError(
            f"{source}: qemu.binary {settings.binary!r} is not installed: install the '{package}' package "
            f"(apt-get install {package}), or set qemu.binary to the emulator's path"
        )
    require_tool("qemu-img", "qemu-utils")
    _firmware_paths(settings, source)


def firmware_argv(
    s: QemuSettings, accel: str, name: str, code: Path, vars_drive: str, memory_mib: int | None = None
) -> list[str]:
    """The machine a device type's profile defines, up to its firmware: machine, accelerator,
    CPU, memory and the firmware's code and variables (``vars_drive``: the ``-drive`` options
    after ``if=pflash``). The one builder of QEMU's command line: the QEMU device, the virtual
    bench's board (through ``machine_argv``) and the KVM probe (the firmware alone) start from it.
    """
    cpu = "host" if accel == "kvm" else s.cpu
    return [
        s.binary, "-name", name, "-nodefaults", "-no-user-config",
        "-machine", s.machine, "-accel", accel, "-cpu", cpu,
        "-m", str(memory_mib or s.memory_mib), "-smp", str(s.cpus),
        "-display", "none", "-vga", s.vga,
        "-drive", f"if=pflash,format=raw,readonly=on,file={code}",
        "-drive", f"if=pflash,{vars_drive}",
    ]  # fmt: skip


def machine_argv(
    s: QemuSettings, accel: str, name: str, code: Path, vars_drive: str, disk_drive: str, nic_netdev: str
) -> list[str]:
    """``firmware_argv`` plus the boot disk and the first NIC: ``disk_drive`` is the ``-drive``
    options after ``if=none,id=`` (format, file, cache), ``nic_netdev`` the first NIC's
    ``-netdev``. Each caller adds its own console, monitors and extra devices.
    """
    disk_dev = {"virtio": "virtio-blk-pci", "nvme": "nvme,serial=testbed0", "ide": "ide-hd"}[s.disk_interface]
    return [
        *firmware_argv(s, accel, name, code, vars_drive),
        "-drive", f"if=none,id=disk0,{disk_drive}",
        "-device", f"{disk_dev},drive=disk0,bootindex=0",
        "-netdev", f"{nic_netdev},id=net0",
        "-device", f"{s.nic},netdev=net0",
    ]  # fmt: skip


def probe_accel(profile: Profile, timeout: float | None = None) -> tuple[str, str]:
    """Choose the accelerator: the first of the profile's list that really runs a guest.

    ``/dev/kvm`` existing proves little (on some hosts a guest dies right in the firmware).
    KVM is accepted only if a guest booted under it reaches the firmware's first serial
    output with the VM still running. The answer is cached per process.
    Returns (accel, reason why any earlier choice was rejected).
    """
    assert profile.qemu is not None
    settings = profile.qemu
    key = (settings.binary, ",".join(settings.accel))
    if key in _accel_cache:
        return _accel_cache[key]
    reasons = []
    chosen = ""
    host = os.uname().machine
    for accel in settings.accel:
        if accel == "tcg":
            chosen = "tcg"
            break
        if profile.arch != host:
            # KVM runs a guest of the host's own architecture only: no probe, one reason.
            reasons.append(f"kvm: not for a foreign architecture ({profile.arch} guest on an {host} host)")
            continue
        ok, why = _probe_kvm(profile, timeout or profile.timeouts.kvm_probe)
        if ok:
            chosen = "kvm"
            break
        reasons.append(f"kvm: {why}")
    if not chosen:
        raise InfraError(f"no usable accelerator among {settings.accel} ({'; '.join(reasons)})")
    _accel_cache[key] = (chosen, "; ".join(reasons))
    return _accel_cache[key]


def _probe_kvm(profile: Profile, timeout: float) -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    return probe_guest(profile, "kvm", timeout)


def probe_guest(profile: Profile, accel: str, timeout: float) -> tuple[bool, str]:
    """Start the profile's firmware alone under ``accel``: does it run and print?"""
    assert profile.qemu is not None
    code, vars_ = _firmware_paths(profile.qemu, profile.source)
    work = private_dir("testbed-kvm-probe-")
    try:
        shutil.copyfile(vars_, work / "vars.fd")
        qmp_l = listening_unix_socket(work / "qmp.sock")
        ser_l = listening_unix_socket(work / "serial.sock")
        argv = [
            *firmware_argv(
                profile.qemu, accel, "testbed-accel-probe", code, f"format=raw,file={work / 'vars.fd'}", memory_mib=256
            ),
            "-S",
            "-chardev", f"socket,id=qmp,fd={qmp_l.fileno()},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=ser0,fd={ser_l.fileno()},server=on,wait=off",
            "-serial", "chardev:ser0",
        ]  # fmt: skip
        with OwnedProcess(argv, pass_fds=[qmp_l.fileno(), ser_l.fileno()], stderr_path=work / "stderr") as proc:
            qs = socket.socket(socket.AF_UNIX)
            qs.connect(str(work / "qmp.sock"))
            ss = socket.socket(socket.AF_UNIX)
            ss.connect(str(work / "serial.sock"))
            # Only QEMU may hold the listening sockets now: if it dies before accepting, the
            # queued connections are reset and the QMP greeting wait ends (it has no timeout).
            qmp_l.close()
            ser_l.close()
            try:
                qmp = Qmp(qs, timeout)
            except Exception as exc:  # noqa: BLE001 - any failure here means KVM is unusable.
                first = (proc.stderr_tail(3) or str(exc)).splitlines()[0]
                return False, f"QEMU with -accel {accel} did not start ({first})"
            try:
                qmp.cmd("cont")
                ss.settimeout(timeout)
                try:
                    printed = ss.recv(1)
                except TimeoutError:
                    printed = b""
                status = qmp.cmd("query-status")
                if status.get("status") != "running":
                    return False, f"the guest stopped in the firmware (status {status.get('status')})"
                if not printed:
                    return False, f"the firmware printed nothing within {timeout:g}s"
                return True, ""
            except InfraError as exc:
                return False, str(exc)
            finally:
                qmp.close()
                ss.close()
                qs.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class QemuMachine:
    """One QEMU virtual machine for one device under test.

    ``power_on()`` starts QEMU paused, connects QMP and the console, then lets the guest
    run; ``power_cut()`` kills it at once (an abrupt power loss); powering on again uses
    the same overlay and firmware variables, like a board whose power came back. Its
    capabilities: snapshots, disk copies, link control and attached media. The accelerator is
    chosen (KVM probed) in ``prepare()``.
    """

    kind: ClassVar[str] = "qemu"
    console_is_evidence: ClassVar[bool] = False
    boots_on_this_host: ClassVar[bool] = True

    def __init__(
        self,
        profile: Profile,
        image: Path,
        console_log: ConsoleLog,
        image_format: str = "raw",
        lab_nics: list[TapNic] | None = None,
    ) -> None:
        if profile.qemu is None:
            raise ConfigError(f"{profile.source}: a QEMU device needs a 'qemu:' section")
        self.profile = profile
        self.settings = profile.qemu
        self.image = image.resolve()
        self.image_format = image_format
        self.console_log = console_log
        self.workdir = private_dir()
        self.overlay = self.workdir / "disk.qcow2"
        self.vars = self.workdir / "vars.qcow2"
        self.forwards = {
            "ssh": Forward("ssh", profile.ssh.port, free_port()),
            "engine": Forward("engine", 2375, free_port()),
        }
        # Read-only disks plugged in from power-on (an update bundle, like a USB stick), by
        # name; the guest sees /dev/disk/by-id/virtio-tb-<name>.
        self.media: dict[str, Path] = {}
        # NICs after net0 (the user-mode NIC that carries SSH and the engine), on taps whose
        # descriptors stay open in testbed across power cycles.
        self.lab_nics = list(lab_nics or [])
        self.accel, self.accel_note = "", ""
        self.prepared = False
        self.events: MachineEvents | None = None
        self.process = QemuProcess(
            profile.name, console_log, self.workdir, self.argv, [nic.fd for nic in self.lab_nics], self._reset_seen
        )

    def _reset_seen(self, reason: str) -> None:
        if self.events is not None:
            self.events("reset", reason)

    # -- power (the process does it) -----------------------------------------------------
    @property
    def console(self) -> Console | None:
        return self.process.console

    @property
    def powered_on_at(self) -> float:
        return self.process.powered_on_at

    def power_on(self) -> Console:
        """Start QEMU and the guest; return the console, already being drained."""
        self.prepare()
        return self.process.start(self.accel)

    def power_cut(self) -> None:
        """An abrupt power loss: the process is killed, nothing is flushed or shut down."""
        self.process.cut()

    def power_off(self, timeout: float) -> None:
        """An ACPI shutdown; cut the power if the guest has not stopped in time."""
        self.process.power_off(timeout)

    def is_on(self) -> bool:
        return self.process.is_on()

    def check_alive(self) -> None:
        """Raise InfraError if QEMU died (used between waits)."""
        self.process.check_alive()

    def network_up(self) -> bool | None:
        """Whether the guest has brought a NIC up since this boot's power on or reset, or None
        where that cannot be seen.

        A virtio NIC tells QEMU its receive filter when the guest's driver opens it (QMP event
        NIC_RX_FILTER_CHANGED): from then on an SSH probe can reach the guest. Probes sent
        before that are held by the user-mode network and all reach sshd at once when the NIC
        comes up, each costing the guest an sshd process at the busiest moment of its boot.
        """
        if not self.settings.nic.startswith("virtio-net"):
            return None
        return self.process.nic_up()

    # -- disks -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the overlay and the firmware variables copy (once per device)."""
        if self.prepared:
            return
        check_host(self.settings, self.profile.source)
        _code, vars_template = _firmware_paths(self.settings, self.profile.source)
        self.accel, self.accel_note = probe_accel(self.profile)
        qemu_img("create", "-q", "-f", "qcow2", "-F", self.image_format, "-b", str(self.image), str(self.overlay))
        qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(vars_template), str(self.vars))
        self.prepared = True

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(snapshots=self, disk_copy=self, link=self, media=self)

    def attach_media(self, media: dict[str, Path]) -> None:
        """Attach read-only disks from the next power on, by name (see ``media_device``)."""
        self.media.update(media)

    def host_port(self, name: str) -> int:
        return self.forwards[name].host_port

    def endpoint(self, name: str, hostname: str | None = None) -> tuple[str, int]:
        """Where this host reaches a guest service: a loopback port forward (``hostname`` is not needed)."""
        return "127.0.0.1", self.forwards[name].host_port

    def argv(self, qmp_fd: int, serial_fd: int, events_fd: int) -> list[str]:
        s = self.settings
        code, _ = _firmware_paths(s, self.profile.source)
        hostfwd = ",".join(f"hostfwd=tcp:127.0.0.1:{f.host_port}-:{f.guest_port}" for f in self.forwards.values())
        return [
            *machine_argv(
                s, self.accel, f"testbed-{self.profile.name}", code,
                # The firmware variables are rewritten at every boot: host flushes for them (one
                # per word the firmware writes, with qcow2's metadata ordering) would buy nothing.
                vars_drive=f"format=qcow2,file={self.vars},cache=unsafe",
                # cache=unsafe: a guest flush still writes QEMU's cached qcow2 metadata to the
                # host file, so a power cut (QEMU killed) loses what a disk with a volatile cache
                # would; only the host's own fsync is skipped, which matters if the host loses
                # power. With it (cache=writeback) a reboot after a snapshot waited minutes on
                # the host disk.
                disk_drive=f"format=qcow2,file={self.overlay},cache=unsafe,discard=unmap",
                nic_netdev=",".join(filter(None, ("user", hostfwd))),
            ),
            "-S",
            *self._media_args(),
            *self._lab_nic_args(),
            # Connected sockets, handed over: the QMP client, a second monitor for events only
            # (read by the supervisor thread), and the serial line.
            "-chardev", f"socket,id=qmp,fd={qmp_fd},server=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=events,fd={events_fd},server=off",
            "-mon", "chardev=events,mode=control",
            "-chardev", f"socket,id=ser0,fd={serial_fd},server=off",
            "-serial", "chardev:ser0",
            # A reset ends this QEMU; the supervisor starts the next one (see _supervise).
            *(["-action", "reboot=shutdown"] if s.reset == "restart" else []),
            *s.extra_args,
        ]  # fmt: skip

    def _media_args(self) -> list[str]:
        args: list[str] = []
        for index, (name, path) in enumerate(sorted(self.media.items())):
            args += [
                "-drive", f"if=none,id=media{index},format=raw,readonly=on,file={path}",
                "-device", f"virtio-blk-pci,drive=media{index},serial=tb-{name}",
            ]  # fmt: skip
        return args

    def media_device(self, name: str) -> str:
        """The guest's path of the medium ``name`` (see ``media``)."""
        return f"/dev/disk/by-id/virtio-tb-{name}"

    def _lab_nic_args(self) -> list[str]:
        args: list[str] = []
        for index, nic in enumerate(self.lab_nics):
            netdev = f"lab{index}"
            args += ["-netdev", f"tap,id={netdev},fd={nic.fd}"]
            args += ["-device", f"{self.settings.nic},netdev={netdev},mac={nic.mac}"]
        return args

    # -- snapshots ---------------------------------------------------------------------
    def _monitor(self, what: str) -> Qmp:
        qmp = self.process.qmp
        if qmp is None:
            raise InfraError(f"{what}: {self.profile.name}'s QEMU is not running")
        return qmp

    def save_snapshot(self, name: str) -> None:
        out = self._monitor(f"savevm {name}").hmp(f"savevm {name}").strip()
        if out:
            raise InfraError(f"savevm {name} failed: {out}")

    def load_snapshot(self, name: str) -> None:
        out = self._monitor(f"loadvm {name}").hmp(f"loadvm {name}").strip()
        if out:
            raise InfraError(f"loadvm {name} failed: {out}")
        self.console_log.mark(f"restored snapshot {name}")

    def copy_disks_to(self, other: Machine) -> None:
        """Give ``other`` (a machine of the same profile, image and media, never prepared) a copy
        of this machine's overlay, with every snapshot in it, and of its firmware variables.

        A running QEMU is paused for the copy: stopping drains its disks and writes its cached
        qcow2 metadata to the files, and nothing changes under the copy.
        """
        if not isinstance(other, QemuMachine):
            raise TypeError(f"a copy of a QEMU machine's disks needs another QEMU machine, not {other.kind}")
        if other.prepared:
            raise ValueError(f"{other.overlay} exists already: only a new machine can take a copy of the disks")
        if not self.prepared:
            raise ValueError("this machine has no disks to copy yet (it was never powered on)")
        with self._paused():
            shutil.copyfile(self.overlay, other.overlay)
            shutil.copyfile(self.vars, other.vars)
        other.accel, other.accel_note = self.accel, self.accel_note
        other.prepared = True

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        """Nothing changes under the disk files: a running QEMU is stopped (which drains its
        disks and writes its cached qcow2 metadata) and continued afterwards."""
        with self.process.lock:
            qmp = self.process.qmp if self.process.is_on() else None
            was_running = bool(qmp.cmd("query-status").get("running")) if qmp is not None else False
            if qmp is not None and was_running:
                qmp.cmd("stop")
            try:
                yield
            finally:
                if qmp is not None and was_running:
                    qmp.cmd("cont")

    def export_disks(self, save: Callable[[dict[str, Path]], T]) -> T:
        if not self.prepared:
            raise ValueError("this machine has no disks yet (it was never powered on)")
        with self._paused():
            return save({"disk.qcow2": self.overlay, "vars.qcow2": self.vars})

    def import_disks(self, load: Callable[[dict[str, Path], str], bool]) -> bool:
        if self.prepared:
            raise ValueError(f"{self.overlay} exists already: disks are imported before the first power on")
        check_host(self.settings, self.profile.source)
        accel, note = probe_accel(self.profile)
        if not load({"disk.qcow2": self.overlay, "vars.qcow2": self.vars}, accel):
            return False
        # The saved overlay names the image where it was then; the content is the same (the
        # caller's key holds its sha256), its path may not be.
        qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-F", self.image_format, "-b", str(self.image), str(self.overlay))
        self.accel, self.accel_note = accel, note
        self.prepared = True
        return True

    def set_link(self, up: bool) -> None:
        self._monitor("set_link").cmd("set_link", name="net0", up=up)

    # -- end ---------------------------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        return {
            "machine": "qemu",
            "accelerator": self.accel,
            "accelerator_note": self.accel_note,
            "qemu_machine": self.settings.machine,
            "firmware": str(self.settings.firmware.code),
            "memory_mib": self.settings.memory_mib,
            "cpus": self.settings.cpus,
            "boot_slots": budget.describe(self.accel, self.settings.cpus),
        }

    def close(self) -> None:
        self.power_cut()
        shutil.rmtree(self.workdir, ignore_errors=True)
