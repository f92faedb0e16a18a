"""Fixtures shared by the suites: a second device booted with a config.json set before its first boot."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from testbed.dut import DUT
from testbed.lab import network as lab
from testbed.lab.network import LabNetwork

# DNS and NTP point at the farm's own servers on the lab network (testbed/lab/network.py), so the
# device's dnsmasq and chrony are checked end to end and never reach anything outside this machine.
CONFIGURED = {
    "hostname": "tb-configured",
    "dnsServers": f"{lab.FARM} {lab.FARM_DNS_2}",
    "ntpServers": lab.FARM,
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
UPLINK_NAME = "testbed-uplink"
# The user-mode NIC (QEMU's default MAC for the first NIC) without the DNS server QEMU's DHCP
# offers: the farm's servers from config.json are then the device's only upstream, so a name
# the farm serves resolves only if dnsServers was applied, and no query leaves the machine.
UPLINK_FILE = f"""[connection]
id={UPLINK_NAME}
type=ethernet
autoconnect=true

[ethernet]
mac-address=52:54:00:12:34:56

[ipv4]
method=auto
ignore-auto-dns=true

[ipv6]
method=auto
ignore-auto-dns=true
""".encode()


@dataclass
class Configured:
    """A device whose config.json was set before its first boot, and the extra key it lists.

    Its second NIC is on the farm's lab network (``lab``), whose DNS and NTP servers its
    config.json names.
    """

    dut: DUT
    extra_key: paramiko.PKey
    config: dict[str, object]
    lab: LabNetwork


@pytest.fixture(scope="session")
def extra_key(tmp_path_factory: pytest.TempPathFactory) -> paramiko.PKey:
    path = Path(tmp_path_factory.mktemp("keys")) / "extra"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "extra", "-f", str(path)], check=True)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


@pytest.fixture(scope="session")
def configured(lab_network: LabNetwork, dut_factory: Callable[..., DUT], extra_key: paramiko.PKey) -> Configured:
    """One more boot, with every config.json key the image applies set to a checkable value,
    and a second NIC on the farm's lab network.

    It does not need the session's ``dut``: a run of only these checks boots one device.
    """
    public = f"{extra_key.get_name()} {extra_key.get_base64()} extra"
    config = {**CONFIGURED, "os": {"sshKeys": [public]}}
    device = dut_factory(
        "configured",
        config_overrides=config,
        boot_files={
            f"/system-connections/{CONNECTION_NAME}.nmconnection": CONNECTION_FILE,
            f"/system-connections/{UPLINK_NAME}.nmconnection": UPLINK_FILE,
        },
        lab=lab_network,
    )
    return Configured(device, extra_key, config, lab_network)
