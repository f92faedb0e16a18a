"""Networking: NetworkManager with an address and a default route, connection files from the boot
partition, link loss and recovery, and the device's name over mDNS in development mode."""

from __future__ import annotations

import pytest

from suites.conftest import CONNECTION_NAME, Configured
from testbed.dut import DUT
from testbed.util import wait_until


def test_networkmanager_has_an_address_and_a_default_route(dut: DUT) -> None:
    state = dut.run("nmcli -t -f STATE general").stdout.strip()
    address = dut.run("ip -4 -o addr show scope global").stdout.strip()
    route = dut.run("ip -4 route show default").stdout.strip()
    assert state == "connected" and address and route, (
        f"expected NetworkManager connected with an IPv4 address and a default route; "
        f"state {state!r}, addresses {address!r}, default route {route!r}"
    )


def test_connection_file_from_boot_partition_is_applied(configured: Configured) -> None:
    dut = configured.dut
    listed = dut.run("nmcli -t -f NAME connection show").stdout.split()
    stored = dut.run(f"ls /etc/NetworkManager/system-connections/ | grep -c {CONNECTION_NAME}").stdout.strip()
    assert CONNECTION_NAME in listed, (
        f"a connection file dropped into resin-boot/system-connections must reach NetworkManager; "
        f"`nmcli connection show` lists {listed}, copies in /etc/NetworkManager/system-connections: {stored}"
    )


def test_link_down_and_up_recovers(dut: DUT, request: pytest.FixtureRequest) -> None:
    if not hasattr(dut.machine, "set_link"):
        pytest.skip(f"{dut.machine.kind}: testbed cannot switch this device's network link (QEMU's set_link only)")
    dut = request.getfixturevalue("fresh_dut")
    dut.machine.set_link(False)
    dut.record_note("QMP set_link net0 down", "link down")
    try:
        if dut.development_mode:
            # The console still works without a network: watch NetworkManager notice the loss.
            def lost() -> bool:
                return "connected" not in dut.console.run("nmcli -t -f STATE general").stdout.split()

            wait_until(lost, 60, "NetworkManager to see the link go down", interval=0.5)
    finally:
        dut.machine.set_link(True)
        dut.record_note("QMP set_link net0 up", "link up")

    def back() -> bool:
        try:
            return bool(dut.run("ip -4 route show default", timeout=10).stdout.strip())
        except Exception:  # noqa: BLE001 - SSH may need a moment to come back
            dut.ssh.close()
            return False

    wait_until(
        back, dut.profile.timeouts.restore_to_ssh, "a default route again after the link came back", interval=0.5
    )
    state = dut.run("nmcli -t -f STATE general").stdout.strip()
    assert state == "connected", f"after the link came back NetworkManager says {state!r}"


def test_hostname_is_announced_over_mdns_in_development_mode(dut: DUT) -> None:
    name = dut.run("hostname", check=True).stdout.strip() + ".local"
    active = dut.run("systemctl is-active avahi-daemon").stdout.strip()
    resolved = dut.run(
        f"busctl -- call org.freedesktop.Avahi / org.freedesktop.Avahi.Server ResolveHostName iisiu -1 0 {name} 0 0"
    )
    if dut.development_mode:
        assert active == "active" and resolved.exit_code == 0, (
            f"development mode must announce {name} over mDNS: avahi-daemon is {active}; "
            f"resolving {name} through avahi gave: {(resolved.stdout + resolved.stderr).strip()}"
        )
    else:
        assert active != "active", f"production mode must not announce {name}: avahi-daemon is {active}"
