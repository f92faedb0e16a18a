"""Device profiles: what a device type is and what testbed expects of it.

A profile is a YAML file in ``device_profiles/``. Unknown keys are errors (a misspelled
key must never be silently ignored); every error names the file, the key and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from testbed.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "device_profiles"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Firmware(_Strict):
    code: Path = Field(description="read-only firmware code (OVMF_CODE)")
    vars: Path = Field(description="firmware variables template; each run boots a copy")


class QemuSettings(_Strict):
    binary: str = "qemu-system-x86_64"
    machine: str = "q35"
    cpu: str = "max"
    memory_mib: int = Field(1024, ge=128)
    cpus: int = Field(2, ge=1)
    accel: list[Literal["kvm", "tcg"]] = ["kvm", "tcg"]
    firmware: Firmware
    disk_interface: Literal["virtio", "nvme", "ide"] = "virtio"
    nic: str = "virtio-net-pci"
    # What a reset (a reboot, a panic) does: "restart" ends QEMU and starts a new one on the same
    # disks, so the firmware takes its cold path (seconds under TCG); "warm" resets the machine
    # in place, as a board would (OVMF's warm path took 15-20 s under TCG, and could hang).
    reset: Literal["restart", "warm"] = "restart"
    # The display adapter: "std" (a PCI VGA card, as a PC has) or "none" (a board's machine,
    # e.g. aarch64 virt, whose console is its UART).
    vga: Literal["std", "none"] = "std"
    extra_args: list[str] = []


def _seconds(default: float, why: str = "") -> Any:
    """A named timeout: more than 0 seconds (a wait of 0 or less would end before it began)."""
    return Field(default, gt=0, description=why or None)


class Timeouts(_Strict):
    """Named timeouts, in seconds, each more than 0. Every wait in testbed uses one of these."""

    kvm_probe: float = _seconds(8.0)
    boot_to_login: float = _seconds(180.0)
    boot_to_ssh: float = _seconds(240.0)
    restore_to_ssh: float = _seconds(60.0)
    command: float = _seconds(120.0)
    shutdown: float = _seconds(60.0)
    # From a reboot into a new root that must roll back until SSH answers on the old root:
    # the failed boot (or health checks), a restart and a good boot.
    rollback: float = _seconds(420.0)
    # From SSH ready on an updated root until its health check committed the update.
    health_commit: float = _seconds(180.0)
    lab_services: float = _seconds(20.0, "the farm's dnsmasq and chronyd answering on the lab network")
    lab_address: float = _seconds(60.0, "the device's lab NIC holding an address from the farm's DHCP")
    ntp_sync: float = _seconds(120.0, "the device's chrony selecting the farm's NTP server (^*)")
    mdns_answer: float = _seconds(10.0, "<hostname>.local answered over mDNS on the lab network")


class ConsoleSettings(_Strict):
    user: str = "root"
    login_prompt: str = r"login: ?$"
    baudrate: int = 115200
    # Boot stages as the console shows them (regexes, searched line by line): the time of
    # each is recorded for every boot and printed live by `python -m testbed smoke`.
    firmware_pattern: str = r"BdsDxe|U-Boot|UEFI|EDK II|SeaBIOS|Raspberry Pi .*[Bb]ootloader|RPi: BOOT"
    kernel_pattern: str = r"Linux version \d|Booting Linux"
    bootloader_pattern: str = r"GRUB|Booting `"
    userspace_pattern: str = r"^\s*Welcome to |^\[  OK  \]"
    # A boot ending or a new one starting inside a running machine: the kernel's last words
    # before a reset, the firmware's boot manager, a kernel at time zero. (Not the whole
    # firmware_pattern: a booting kernel prints "EFI ... by EDK II" too.)
    restart_pattern: str = r"reboot: Restarting system|BdsDxe: |^U-Boot \d|^\[\s*0\.0+\] Linux version "


class SshSettings(_Strict):
    port: int = 22222
    user: str = "root"


class SerialSettings(_Strict):
    """The board's serial console: a local tty or a serial server URL (anything pyserial opens)."""

    url: str = Field(description="/dev/ttyUSB0, /dev/serial/by-id/..., rfc2217://host:port or socket://host:port")
    baudrate: int = Field(115200, gt=0)


class BoardSshSettings(_Strict):
    """Where the farm reaches the board's sshd. No host: ``<hostname>.local`` from config.json."""

    host: str | None = None
    port: int | None = Field(None, gt=0, lt=65536)


class BoardSettings(_Strict):
    """A real board: serial console, power switch, flasher, network address.

    ``power`` and ``flash`` are driver specs checked by ``testbed.power.make_power`` and
    ``testbed.flash.make_flasher`` (``{driver: serial-relay, port: ..., channel: 1}``).
    Without ``flash`` the board boots whatever its storage already holds. ``bench:
    virtual`` runs the reference path without hardware: QEMU behind a pty serial adapter,
    an emulated serial relay and a loop block device (serial, power and flash are then
    supplied by the bench).
    """

    bench: Literal["none", "virtual"] = "none"
    serial: SerialSettings | None = None
    power: dict[str, Any] | None = None
    flash: dict[str, Any] | None = None
    ssh: BoardSshSettings = BoardSshSettings()
    lock_wait: float = Field(0.0, ge=0, description="seconds to wait for a board another run holds; 0: fail at once")
    place: str | None = Field(
        None,
        description="a labgrid place instead of local ports: its name, or tags:KEY=VALUE,... for any place in service",
    )
    coordinator: str | None = Field(None, description="the labgrid coordinator HOST:PORT (default: LG_COORDINATOR)")
    lease_seconds: float = Field(30.0, ge=1, le=600, description="a place's lease without a heartbeat")
    avoid_places: list[str] = Field([], description="places a request by tags takes only if no other matches")
    virtual_disk_mib: int = Field(4096, ge=64, description="size of the virtual bench's block device")


class PartitionSpec(_Strict):
    label: str
    # The number Linux gives it (sda<number>); on an MBR, 5 and up are logical partitions in
    # the extended container. None: any number (only the order of the labels is checked).
    number: int | None = Field(default=None, ge=1, le=128)
    fstype: str
    min_mib: int = 1
    max_mib: int = 1 << 20


class LayoutSpec(_Strict):
    # "mbr" is another name for "dos" (an MBR table, as on a Raspberry Pi).
    table: Literal["gpt", "dos"] = "gpt"
    partitions: list[PartitionSpec]

    @field_validator("table", mode="before")
    @classmethod
    def _mbr_is_dos(cls, value: Any) -> Any:
        return "dos" if value == "mbr" else value


class OsSpec(_Strict):
    slug: str
    machine: str
    os_release_keys: list[str] = ["NAME", "VERSION", "VERSION_ID", "PRETTY_NAME", "MACHINE", "SLUG"]


class RootfsSpec(_Strict):
    """What the read-only root promises: paths persisted from resin-state, paths in RAM."""

    persistent: list[str] = []
    volatile: list[str] = ["/tmp", "/var/tmp", "/var/log"]


class DevModeSpec(_Strict):
    """Development-mode features and where they show."""

    engine_port: int = 2375
    gettys: list[str] = ["getty@tty1.service", "serial-getty@ttyS0.service"]


class OomBound(_Strict):
    """A critical service and the highest ``oom_score_adj`` its processes may have."""

    unit: str
    max_oom_score_adj: int = Field(-1, ge=-1000, le=1000)


class ServicesSpec(_Strict):
    """What systemd promises about services (checked by ``suites/services``).

    ``oom_protected``: critical services whose main process must keep an ``oom_score_adj`` at
    or below the bound (systemd's ``OOMScoreAdjust=``), so the kernel's OOM killer takes
    anything else first. A listed unit that is not running in the booted mode is skipped by
    name. ``own_mount_namespace``: services that run in a mount namespace of their own
    (``PrivateTmp=``, ``ProtectSystem=``, ...), not PID 1's.
    """

    oom_protected: list[OomBound] = []
    own_mount_namespace: list[str] = []


class LoggingSpec(_Strict):
    volatile_max_mib: int = 8
    persistent_max_mib: int = 32


TroubleKind = Literal["panic", "oops", "bug", "stall", "warning", "segfault", "oom", "unit", "trace"]


class TroubleSpec(_Strict):
    """Kernel and service trouble seen on the console while a check runs (testbed/trouble.py):
    every kind is attached to the check's evidence and flagged; the kinds in ``fail`` also fail
    the check."""

    fail: list[TroubleKind] = ["panic", "oops", "bug"]


class HealthSpec(_Strict):
    """Health checks of the farm places this profile drives (``python -m testbed farm health``):
    a farm night checks a place whose last check is older than ``every_hours`` before it gets
    work, with ``image`` (default: the reference image) and the smoke suite."""

    every_hours: float = Field(24.0, gt=0)
    image: str | None = None


class Profile(_Strict):
    name: str
    description: str = ""
    arch: Literal["x86_64", "aarch64"]
    kind: Literal["qemu", "board"] = "qemu"
    qemu: QemuSettings | None = None
    board: BoardSettings | None = None
    console: ConsoleSettings = ConsoleSettings()
    ssh: SshSettings = SshSettings()
    timeouts: Timeouts = Timeouts()
    layout: LayoutSpec
    os: OsSpec
    rootfs: RootfsSpec = RootfsSpec()
    dev: DevModeSpec = DevModeSpec()
    logging: LoggingSpec = LoggingSpec()
    services: ServicesSpec = ServicesSpec()
    trouble: TroubleSpec = TroubleSpec()
    health: HealthSpec = HealthSpec()

    source: Path | None = None

    @model_validator(mode="after")
    def _machine_section(self) -> Profile:
        if self.kind == "qemu" and self.qemu is None:
            raise ValueError("a profile of kind 'qemu' needs a 'qemu:' section")
        if self.kind == "board":
            if self.board is None:
                raise ValueError("a profile of kind 'board' needs a 'board:' section (serial, power, flash, ssh)")
            if self.board.bench == "virtual":
                if self.qemu is None:
                    raise ValueError("board.bench 'virtual' runs the board on QEMU: add a 'qemu:' section")
            elif not self.board.place:  # a labgrid place brings its own serial port and power
                missing = [k for k in ("serial", "power") if getattr(self.board, k) is None]
                if missing:
                    raise ValueError(
                        f"a board needs board.{' and board.'.join(missing)} "
                        "(e.g. serial: {url: /dev/ttyUSB0}, power: {driver: serial-relay, port: /dev/ttyUSB1, channel: 1})"
                    )
        return self


def available_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a model accepts at the location of an error."""
    current = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for args in list(candidates):
            candidates.extend(getattr(args, "__args__", ()))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        current = nested[0]
    return [k for k in current.model_fields if k != "source"]


def _explain(error: ErrorDetails, path: Path) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(Profile, loc)
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
        return f"{path}: unknown key '{where}' ({hint})"
    if error["type"] == "missing":
        return f"{path}: missing required key '{where}': add it to the profile"
    if error["type"] == "greater_than" and loc[:1] == ("timeouts",):
        return f"{path}: timeouts.{loc[-1]} is {error.get('input')!r}: a timeout must be more than 0 seconds; fix it"
    return f"{path}: bad value for '{where}': {error['msg']} (got {error.get('input')!r}); fix it in the profile"


def load_profile(name_or_path: str, directory: Path = PROFILES_DIR) -> Profile:
    """Load a profile by device name (``qemu-x86_64``) or by path to a YAML file.

    Raises ConfigError with a one-line message naming the file, the key and the fix.
    """
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or "/" in name_or_path:
        path = candidate
        if not path.is_file():
            raise ConfigError(f"device profile not found: {path} (pass --device with a device name or a profile file)")
    else:
        path = directory / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(available_profiles(directory)) or "none"
            raise ConfigError(
                f"unknown device '{name_or_path}': there is no {path}; known devices: {known} "
                "(pass --device NAME, or --device path/to/profile.yaml)"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: fix the syntax ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a device profile must be a YAML mapping of keys to values")
    try:
        profile = Profile.model_validate({**data, "source": path})
    except ValidationError as exc:
        # An unknown key first: a misspelled required key is also reported missing, and the
        # misspelling is what the person has to fix.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise ConfigError(_explain(errors[0], path)) from None
    if profile.name != path.stem:
        raise ConfigError(f"{path}: 'name' is '{profile.name}' but the file is {path.name}; make them match")
    return profile


def parse_power_option(text: str) -> dict[str, Any]:
    """A ``--relay`` value as a power spec.

    ``serial-relay:PORT:CHANNEL`` (PORT may be a URL: ``serial-relay:rfc2217://host:4001:2``),
    ``hid-relay:CHANNEL`` or ``hid-relay:SERIAL:CHANNEL``, ``manual``, or for any driver
    ``DRIVER:key=value,key=value`` (values parsed as YAML scalars).
    """
    driver, _, rest = text.partition(":")
    usage = (
        f"--relay {text!r}: write serial-relay:PORT:CHANNEL, hid-relay:[SERIAL:]CHANNEL, manual, "
        "or DRIVER:key=value,key=value"
    )
    if not driver:
        raise ConfigError(usage)
    if not rest:
        return {"driver": driver}
    if "=" in rest and not rest.startswith(("/", "rfc2217://", "socket://")):
        spec: dict[str, Any] = {"driver": driver}
        for pair in rest.split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ConfigError(usage)
            spec[key.strip()] = yaml.safe_load(value)
        return spec
    head, _, last = rest.rpartition(":")
    if not last.isdigit():
        raise ConfigError(usage)
    if driver == "serial-relay":
        if not head:
            raise ConfigError(usage)
        return {"driver": driver, "port": head, "channel": int(last)}
    if driver == "hid-relay":
        return {"driver": driver, "channel": int(last), **({"serial": head} if head else {})}
    raise ConfigError(usage)


def parse_flash_option(text: str) -> dict[str, Any] | None:
    """A ``--flash-to`` value as a flash spec: a block device, ``usbsdmux:SG``, or ``none`` (do not flash)."""
    if text == "none":
        return None
    if text.startswith("usbsdmux:"):
        return {"driver": "usbsdmux", "sg": text.removeprefix("usbsdmux:")}
    return {"driver": "blockdev", "device": text}


def apply_board_overrides(
    profile: Profile,
    *,
    serial: str | None = None,
    relay: str | None = None,
    flash_to: str | None = None,
    ssh_host: str | None = None,
    lock_wait: float | None = None,
    place: str | None = None,
    coordinator: str | None = None,
    avoid_place: str | None = None,
) -> Profile:
    """The profile with a board's ports replaced from the command line (the file is not edited).

    ``ssh_host`` is ``HOST`` or ``HOST:PORT``. Options for a QEMU profile are a ConfigError.
    """
    given = {
        "--serial": serial,
        "--relay": relay,
        "--flash-to": flash_to,
        "--ssh-host": ssh_host,
        "--lock-wait": lock_wait,
        "--place": place,
        "--coordinator": coordinator,
        "--avoid-place": avoid_place,
    }
    used = [name for name, value in given.items() if value is not None]
    if not used:
        return profile
    if profile.kind != "board" or profile.board is None:
        raise ConfigError(
            f"{', '.join(used)} apply to boards, but device '{profile.name}' ({profile.source}) is of kind "
            f"'{profile.kind}': pick a board profile with --device"
        )
    board = profile.board
    if board.bench == "virtual" and any(v is not None for v in (serial, relay, flash_to)):
        raise ConfigError(
            f"device '{profile.name}' is a virtual bench: its serial port, relay and disk are created for each run, "
            "so --serial, --relay and --flash-to do not apply"
        )
    update: dict[str, Any] = {}
    if serial is not None:
        base = board.serial.baudrate if board.serial else 115200
        url, _, baud = serial.partition("@")
        if baud and not baud.isdigit():
            raise ConfigError(f"--serial {serial!r}: write PORT or PORT@BAUD, e.g. /dev/ttyUSB0@115200")
        update["serial"] = SerialSettings(url=url, baudrate=int(baud) if baud else base)
    if relay is not None:
        update["power"] = parse_power_option(relay)
    if flash_to is not None:
        update["flash"] = parse_flash_option(flash_to)
    if ssh_host is not None:
        host, _, port = ssh_host.rpartition(":") if ssh_host.count(":") == 1 else (ssh_host, "", "")
        if port and not port.isdigit():
            raise ConfigError(f"--ssh-host {ssh_host!r}: write HOST or HOST:PORT")
        update["ssh"] = BoardSshSettings(host=host or ssh_host, port=int(port) if port else board.ssh.port)
    if place is not None:
        if not place or place == "tags:":
            raise ConfigError("--place: give a place name or tags:KEY=VALUE,... (labgrid-client places lists them)")
        update["place"] = place
    if coordinator is not None:
        update["coordinator"] = coordinator
    if avoid_place is not None:
        update["avoid_places"] = [p for p in avoid_place.split(",") if p]
    if lock_wait is not None:
        if lock_wait < 0:
            raise ConfigError(f"--lock-wait must be 0 or more seconds, got {lock_wait}")
        update["lock_wait"] = lock_wait
    return profile.model_copy(update={"board": board.model_copy(update=update)})
