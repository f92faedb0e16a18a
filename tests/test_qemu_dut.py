"""The DUT on a real QEMU boot of the reference image: SSH, console, evidence, snapshots, reboots."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from testbed.boot import BootState
from testbed.dut import DUT
from testbed.errors import DutError, InfraError
from testbed.util import wait_until

pytestmark = pytest.mark.usefixtures("qemu_tools")


def test_ssh_and_console_both_run_commands(dut: DUT) -> None:
    over_ssh = dut.run("echo out; echo err >&2; exit 3")
    assert (over_ssh.exit_code, over_ssh.stdout, over_ssh.stderr) == (3, "out\n", "err\n")
    assert over_ssh.transport == "ssh" and over_ssh.duration_s > 0
    over_serial = dut.console.run("cat /proc/sys/kernel/random/boot_id")
    assert over_serial.exit_code == 0
    assert over_serial.stdout.strip() == dut.boot_id()


def test_check_raises_a_dut_error_naming_the_command(dut: DUT) -> None:
    with pytest.raises(DutError, match="ls /no/such/path"):
        dut.run("ls /no/such/path", check=True)


def test_snapshot_restore_undoes_changes(dut: DUT) -> None:
    dut.run("touch /tmp/changed-after-snapshot", check=True)
    boot = dut.restore("ready")
    assert boot.kind == "restore" and boot.ssh_ready_s is not None
    assert dut.run("test -e /tmp/changed-after-snapshot").exit_code == 1


def test_reboot_gives_a_new_boot(dut: DUT) -> None:
    before = dut.boot_id()
    record = dut.reboot()
    assert record.kind == "reboot"
    assert dut.boot_id() != before
    # The guest's virtio NIC told QEMU it came up: the SSH probes of this boot waited for that.
    assert dut.machine.network_up() is True


def test_power_cycle_gives_a_new_boot_on_the_same_disk(dut: DUT) -> None:
    dut.run("echo kept > /mnt/data/power-cycle-marker && sync", check=True)
    before = dut.boot_id()
    dut.power_cycle()
    assert dut.boot_id() != before
    assert dut.run("cat /mnt/data/power-cycle-marker").stdout == "kept\n"
    dut.restore("ready")


def test_a_guest_power_off_stays_off_until_power_returns(dut: DUT) -> None:
    # A reset restarts QEMU (see test_reboot_gives_a_new_boot); a power-off must not.
    log = dut.console_log.path
    restarts = log.read_text(errors="replace").count("QEMU restarted")
    dut.run("systemd-run --on-active=300ms --timer-property=AccuracySec=10ms --no-block systemctl poweroff", check=True)
    wait_until(
        lambda: not dut.machine.is_on(), dut.profile.timeouts.shutdown, "QEMU to exit after the guest powered off"
    )
    assert log.read_text(errors="replace").count("QEMU restarted") == restarts, "a guest power-off restarted QEMU"
    with pytest.raises(InfraError, match="QEMU exited"):
        dut.machine.check_alive()
    dut.restore("ready")
    assert dut.run("true").ok


def test_a_twin_starts_from_a_copy_of_the_device_and_its_snapshots(dut: DUT, dut_factory: Callable[..., DUT]) -> None:
    dut.restore("ready")
    dut.run("echo copied > /mnt/data/twin-marker && sync", check=True)
    dut.save_snapshot("twin-source")
    twin = dut_factory("twin", twin_of=dut)
    assert twin.state == BootState.OFF and not twin.machine.is_on()
    # The copy is the twin's own: what the device does from now on does not reach it.
    dut.run("rm /mnt/data/twin-marker && echo later > /mnt/data/after-the-copy && sync", check=True)
    boot = twin.restore("twin-source")
    assert boot.kind == "restore"
    assert twin.endpoint("ssh") != dut.endpoint("ssh")
    assert twin.run("cat /mnt/data/twin-marker").stdout == "copied\n"
    assert twin.run("test -e /mnt/data/after-the-copy").exit_code == 1
    twin.run("echo twin > /mnt/data/written-by-the-twin && sync", check=True)
    assert dut.run("test -e /mnt/data/written-by-the-twin").exit_code == 1
    assert dut.run("cat /mnt/data/after-the-copy").stdout == "later\n"
    with pytest.raises(ValueError, match="already powered on"):
        dut.copy_to(twin)
    twin.power.cut()
    dut.restore("ready")
