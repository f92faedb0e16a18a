"""Fixtures shared by the suites: a second device booted with a config.json set before its first boot."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from testbed.dut import DUT

# Documentation addresses (RFC 5737): never reached, only configured and read back.
CONFIGURED = {
    "hostname": "tb-configured",
    "dnsServers": "192.0.2.53 198.51.100.53",
    "ntpServers": "192.0.2.123",
    "persistentLogging": True,
}
CONNECTION_NAME = "testbed-dropped"
# A dummy-interface connection: applying it needs no network, and NetworkManager shows it.
CONNECTION_FILE = f"""[connection]
id={CONNECTION_NAME}
type=dummy
interface-name=tbdummy0
autoconnect=true

[ipv4]
method=manual
address1=192.0.2.77/32

[ipv6]
method=ignore
""".encode()


@dataclass
class Configured:
    """A device whose config.json was set before its first boot, and the extra key it lists."""

    dut: DUT
    extra_key: paramiko.PKey
    config: dict[str, object]


@pytest.fixture(scope="session")
def extra_key(tmp_path_factory: pytest.TempPathFactory) -> paramiko.PKey:
    path = Path(tmp_path_factory.mktemp("keys")) / "extra"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "extra", "-f", str(path)], check=True)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


@pytest.fixture(scope="session")
def configured(dut_factory: Callable[..., DUT], extra_key: paramiko.PKey, dut: DUT) -> Configured:
    """One more boot, with every config.json key the image applies set to a checkable value."""
    public = f"{extra_key.get_name()} {extra_key.get_base64()} extra"
    config = {**CONFIGURED, "os": {"sshKeys": [public]}}
    device = dut_factory(
        "configured",
        config_overrides=config,
        boot_files={f"/system-connections/{CONNECTION_NAME}.nmconnection": CONNECTION_FILE},
    )
    return Configured(device, extra_key, config)
