"""Device profiles: what a device type is and what testbed expects of it.

A profile is a YAML file in ``device_profiles/``. Unknown keys are errors (a misspelled
key must never be silently ignored); every error names the file, the key and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    extra_args: list[str] = []


class Timeouts(_Strict):
    """Named timeouts, in seconds. Every wait in testbed uses one of these."""

    kvm_probe: float = 8.0
    boot_to_login: float = 180.0
    boot_to_ssh: float = 240.0
    restore_to_ssh: float = 60.0
    command: float = 120.0
    shutdown: float = 60.0
    # From a reboot into a new root that must roll back until SSH answers on the old root:
    # the failed boot (or health checks), a restart and a good boot.
    rollback: float = 420.0
    # From SSH ready on an updated root until its health check committed the update.
    health_commit: float = 180.0
    lab_services: float = 20.0  # the farm's dnsmasq and chronyd answering on the lab network
    lab_address: float = 60.0  # the device's lab NIC holding an address from the farm's DHCP
    ntp_sync: float = 120.0  # the device's chrony selecting the farm's NTP server (^*)
    mdns_answer: float = 10.0  # <hostname>.local answered over mDNS on the lab network


class ConsoleSettings(_Strict):
    user: str = "root"
    login_prompt: str = r"login: ?$"
    baudrate: int = 115200


class SshSettings(_Strict):
    port: int = 22222
    user: str = "root"


class PartitionSpec(_Strict):
    label: str
    fstype: str
    min_mib: int = 1
    max_mib: int = 1 << 20


class LayoutSpec(_Strict):
    table: Literal["gpt", "dos"] = "gpt"
    partitions: list[PartitionSpec]


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


class LoggingSpec(_Strict):
    volatile_max_mib: int = 8
    persistent_max_mib: int = 32


class Profile(_Strict):
    name: str
    description: str = ""
    arch: Literal["x86_64", "aarch64"]
    kind: Literal["qemu", "board"] = "qemu"
    qemu: QemuSettings | None = None
    console: ConsoleSettings = ConsoleSettings()
    ssh: SshSettings = SshSettings()
    timeouts: Timeouts = Timeouts()
    layout: LayoutSpec
    os: OsSpec
    rootfs: RootfsSpec = RootfsSpec()
    dev: DevModeSpec = DevModeSpec()
    logging: LoggingSpec = LoggingSpec()

    source: Path | None = None

    @model_validator(mode="after")
    def _machine_section(self) -> Profile:
        if self.kind == "qemu" and self.qemu is None:
            raise ValueError("a profile of kind 'qemu' needs a 'qemu:' section")
        return self


def available_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a model accepts at the location of an error."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
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


def _explain(error: dict[str, Any], path: Path) -> str:
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
    return f"{path}: bad value for '{where}': {error['msg']} (got {error.get('input')!r})"


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
        raise ConfigError(_explain(exc.errors()[0], path)) from None
    if profile.name != path.stem:
        raise ConfigError(f"{path}: 'name' is '{profile.name}' but the file is {path.name}; make them match")
    return profile
