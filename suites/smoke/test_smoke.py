"""Smoke: the device boots, answers SSH on 22222, says what it is, and has its partitions."""

from __future__ import annotations

from testbed.dut import DUT
from testbed.profile import Profile


def test_boots_and_the_serial_console_shows_it(dut: DUT) -> None:
    """Development mode: a root shell on the serial console. Production: no getty, so the
    console must at least show the kernel starting."""
    if dut.development_mode:
        result = dut.console.run("uname -sr; cat /proc/sys/kernel/random/boot_id")
        assert result.exit_code == 0, f"a command on the serial console failed: {result.stdout}"
        assert result.stdout.startswith("Linux "), f"expected `uname -sr` to print Linux ..., got {result.stdout!r}"
    else:
        log = dut.console_log.path.read_text(errors="replace")
        dut.record_note(
            f"search {dut.console_log.path.name} for the kernel banner", "found" if "Linux version" in log else "absent"
        )
        assert "Linux version" in log, "the serial console never showed the kernel starting ('Linux version ...')"


def test_ssh_answers_on_22222(dut: DUT, device_profile: Profile) -> None:
    result = dut.run("echo ssh-ok; id -un")
    assert result.exit_code == 0
    assert result.stdout.split() == ["ssh-ok", device_profile.ssh.user], (
        f"expected `echo ssh-ok; id -un` over SSH on port {device_profile.ssh.port} to print ssh-ok and "
        f"{device_profile.ssh.user}, got {result.stdout!r}"
    )


def test_os_release_is_there(dut: DUT) -> None:
    result = dut.run("cat /etc/os-release")
    assert result.exit_code == 0, f"/etc/os-release is missing: {result.stderr.strip()}"
    keys = {line.split("=", 1)[0] for line in result.stdout.splitlines() if "=" in line}
    missing = {"NAME", "VERSION_ID", "PRETTY_NAME"} - keys
    assert not missing, f"/etc/os-release lacks {sorted(missing)}; it has {sorted(keys)}"


def test_partitions_are_found_by_label(dut: DUT, device_profile: Profile) -> None:
    expected = [p.label for p in device_profile.layout.partitions]
    result = dut.run("ls -1 /dev/disk/by-label/")
    found = set(result.stdout.split())
    missing = [label for label in expected if label not in found]
    assert not missing, (
        f"expected partitions labelled {expected} under /dev/disk/by-label, missing {missing}; "
        f"`ls -1 /dev/disk/by-label/` showed {sorted(found)}"
    )
