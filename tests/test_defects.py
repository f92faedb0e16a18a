"""Proof that the suites catch defects: each check fails on a copy of the reference image that has
the matching defect, with a message naming it, while the checks the defect does not touch pass.

A defective copy is a qcow2 overlay over the reference image, edited offline (debugfs and mtools
through qemu-io): the reference image itself is never written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed import image as img
from testbed import reference

REPO = Path(__file__).resolve().parent.parent
CONFIG_JSON_SCRIPT = "/usr/libexec/testbed/config-json"
NM_OOM_DROPIN = "/etc/systemd/system/NetworkManager.service.d/10-testbed.conf"

pytestmark = pytest.mark.usefixtures("qemu_tools")


def _replace(text: str, old: str, new: str, where: str) -> bytes:
    assert old in text, f"{where} no longer contains {old!r}: update this defect to the recipe"
    return text.replace(old, new).encode()


def root_file(path: str, old: str, new: str) -> Callable[[Path], None]:
    """A defect: a file of resin-rootA with every ``old`` replaced by ``new``."""

    def edit(overlay: Path) -> None:
        part = img.read_layout(overlay).by_label("resin-rootA")
        current = img.read_file_from_ext(overlay, part, path).decode()
        img.edit_ext4_in_overlay(overlay, part, {path: _replace(current, old, new, path)})

    return edit


def root_file_removed(path: str) -> Callable[[Path], None]:
    """A defect: ``path`` missing from resin-rootA (a tool the image lacks)."""

    def edit(overlay: Path) -> None:
        part = img.read_layout(overlay).by_label("resin-rootA")
        img.read_file_from_ext(overlay, part, path)  # there before: the defect is its absence
        img.edit_ext4_in_overlay(overlay, part, {path: None})

    return edit


def boot_file(path: str, old: str, new: str) -> Callable[[Path], None]:
    """A defect: a file of resin-boot with ``old`` replaced by ``new``."""

    def edit(overlay: Path) -> None:
        part = img.read_layout(overlay).by_label("resin-boot")
        text = img.read_file_from_fat(overlay, part, path).decode()
        img.write_files_to_fat_in_overlay(overlay, part, {path: _replace(text, old, new, path)})

    return edit


def relabel(label: str, new: str) -> Callable[[Path], None]:
    def edit(overlay: Path) -> None:
        part = img.read_layout(overlay).by_label(label)
        img.edit_ext4_in_overlay(overlay, part, {}, commands=(f"set_super_value volume_name {new}",))

    return edit


def bundle_file_removed(path: str) -> Callable[[Path], None]:
    """A defect of the update bundle (the new root): ``path`` removed from it."""

    def edit(bundle: Path) -> None:
        done = subprocess.run(["debugfs", "-w", "-R", f"rm {path}", str(bundle)], capture_output=True, text=True)
        check = subprocess.run(["debugfs", "-R", f"stat {path}", str(bundle)], capture_output=True, text=True)
        assert done.returncode == 0 and "not found" in check.stderr, f"could not remove {path}: {done.stderr}"

    return edit


def mbr_entries(edit_slots: Callable[[list[bytes], img.DiskLayout], None]) -> Callable[[Path], None]:
    """A defect of an MBR table: its four 16-byte primary entries rewritten by ``edit_slots``
    (given them and the layout read before), written back into sector 0 of the overlay."""

    def edit(overlay: Path) -> None:
        layout = img.read_layout(overlay)
        assert layout.table == "dos", f"{overlay} has a {layout.table} table, this defect is of an MBR"
        with img.open_source(overlay) as src:
            sector = bytearray(src.read(0, 512))
        slots = [bytes(sector[446 + 16 * i : 462 + 16 * i]) for i in range(4)]
        edit_slots(slots, layout)
        sector[446:510] = b"".join(slots)
        (overlay.parent / "mbr.bin").write_bytes(sector)
        done = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -q -s mbr.bin 0 512", str(overlay)],
            cwd=overlay.parent, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout + done.stderr

    return edit


def _swap_roots(slots: list[bytes], _layout: img.DiskLayout) -> None:
    """resin-rootB in slot 2 (p2) and resin-rootA in slot 3 (p3): the labels out of order."""
    slots[1], slots[2] = slots[2], slots[1]


def _state_as_primary(slots: list[bytes], layout: img.DiskLayout) -> None:
    """resin-state a primary partition (p4, type 0x83) where the extended container was: as a
    four-primary table allows, resin-data is then gone."""
    state = layout.by_label("resin-state")
    lba, count = state.start // 512, state.size // 512
    # status, CHS start (unused: LBA), type, CHS end, LBA start, sector count
    slots[3] = (
        b"\0" + b"\xfe\xff\xff" + b"\x83" + b"\xfe\xff\xff" + lba.to_bytes(4, "little") + count.to_bytes(4, "little")
    )


@dataclass
class Defect:
    edits: list[Callable[[Path], None]]
    run: list[str]  # suites and pytest options
    fails: dict[str, str]  # test name -> words its failure message must contain
    profile: dict[str, object] = field(default_factory=dict)  # profile keys to override
    bundle_edits: list[Callable[[Path], None]] = field(default_factory=list)  # on a copy of the update bundle
    device: str = "qemu-x86_64"  # the profile (its reference image: the profile's table)


DEFECTS = {
    "root-mounted-read-write": Defect(
        edits=[
            boot_file("/EFI/BOOT/grub.cfg", "rootfstype=ext4 ro", "rootfstype=ext4 rw"),
            root_file("/etc/fstab", "ext4    ro,noatime", "ext4    rw,noatime"),
            # and, on the same boot, an /etc/issue that names another OS (a file of the root
            # changed after the build: the fingerprint names it too)
            root_file("/etc/issue", "testbed reference OS", "Debian GNU/Linux 12"),
        ],
        run=["suites/rootfs", "suites/os_release", "-k", "not survive and not checked_at_boot"],
        fails={
            "test_root_is_mounted_read_only": "read-only",
            "test_writes_to_root_fail_with_erofs": "to fail on a read-only root",
            "test_no_writable_mount_of_the_root_device": "mounted writable",
            "test_issue_names_the_os": "/etc/issue must name the OS",
            "test_root_files_match_the_fingerprint": "/etc/issue: FAILED",
        },
    ),
    "partition-label-renamed": Defect(
        edits=[relabel("resin-data", "resin-dota")],
        run=["suites/layout", "-k", "not running and not mounts"],
        fails={
            "test_labels_in_order": "resin-dota",
            "test_partition_numbers": "resin-data is missing, expected as partition 5",
            "test_filesystem_types": "resin-data",
            "test_sizes_within_profile_bounds": "resin-data",
        },
    ),
    # A Raspberry Pi's MBR layout (resin-state and resin-data logical, p5 and p6), broken two ways.
    "mbr-labels-out-of-order": Defect(
        edits=[mbr_entries(_swap_roots)],
        run=["suites/layout", "-k", "not running and not mounts"],
        fails={
            "test_labels_in_order": "'resin-boot', 'resin-rootB', 'resin-rootA'",
            "test_partition_numbers": "resin-rootA is partition 3",
        },
        device="qemu-x86_64-mbr",
    ),
    "mbr-state-a-primary-partition": Defect(
        edits=[mbr_entries(_state_as_primary)],
        run=["suites/layout", "-k", "not running and not mounts"],
        fails={
            "test_labels_in_order": "found ['resin-boot', 'resin-rootA', 'resin-rootB', 'resin-state']",
            "test_partition_numbers": "resin-state is partition 4 (a primary partition), expected 5",
            "test_filesystem_types": "resin-data",
            "test_sizes_within_profile_bounds": "resin-data",
        },
        device="qemu-x86_64-mbr",
    ),
    "sshd-on-another-port": Defect(
        edits=[root_file("/etc/ssh/sshd_config.d/10-testbed.conf", "Port 22222", "Port 2222")],
        run=["suites/smoke"],
        fails={
            "test_boots_and_the_serial_console_shows_it": "22222",
            "test_ssh_answers_on_22222": "22222",
            "test_os_release_is_there": "22222",
            "test_partitions_are_found_by_label": "22222",
        },
        profile={"boot_to_ssh": 60},
    ),
    "production-allows-empty-password": Defect(
        edits=[
            root_file(CONFIG_JSON_SCRIPT, "PermitEmptyPasswords no", "PermitEmptyPasswords yes"),
            root_file(CONFIG_JSON_SCRIPT, "PasswordAuthentication no", "PasswordAuthentication yes"),
            root_file(CONFIG_JSON_SCRIPT, "PermitRootLogin prohibit-password", "PermitRootLogin yes"),
        ],
        run=["suites/modes", "--mode", "production"],
        fails={
            "test_passwordless_root_login_matches_mode": "production mode must refuse passwordless root",
            "test_sshd_offers_what_the_mode_allows": "permitemptypasswords no (is yes)",
        },
    ),
    # Two development-mode units started in production: the engine API and the serial getty.
    "engine-open-in-production": Defect(
        edits=[
            root_file(
                CONFIG_JSON_SCRIPT,
                'if [ "${mode}" = development ]; then',
                'systemctl start --no-block engine-tcp.socket serial-getty@ttyS0.service\n'
                'if [ "${mode}" = development ]; then',
            )
        ],
        run=["suites/modes", "--mode", "production"],
        fails={
            "test_engine_api_matches_mode": "production mode must not listen on 2375",
            "test_gettys_match_mode": "production mode must not run a getty; active: ['serial-getty@ttyS0.service']",
        },
    ),
    # Three defects of a production image on one boot: an sshd that also offers passwords (root
    # with an empty password is still refused, so the passwordless-login check passes), a
    # critical service left at the default OOM score, and a service out of its sandbox.
    "production-offers-passwords-and-unprotected-services": Defect(
        edits=[
            root_file(CONFIG_JSON_SCRIPT, "PasswordAuthentication no", "PasswordAuthentication yes"),
            root_file(CONFIG_JSON_SCRIPT, "PermitRootLogin prohibit-password", "PermitRootLogin yes"),
            root_file(NM_OOM_DROPIN, "OOMScoreAdjust=-900", "OOMScoreAdjust=0"),
            root_file(
                "/etc/systemd/system/dnsmasq.service", "PrivateTmp=yes\nProtectSystem=full\nProtectHome=yes\n", ""
            ),
        ],
        run=["suites/modes", "suites/services", "--mode", "production"],
        fails={
            "test_sshd_offers_what_the_mode_allows": "passwordauthentication no (is yes)",
            "test_critical_services_are_protected_from_the_oom_killer": "NetworkManager.service (PID",
            "test_sandboxed_services_run_in_their_own_mount_namespace": "dnsmasq.service (PID",
        },
    ),
    # A device that makes itself anew at every boot: a new SSH host key and a new machine-id
    # written over the ones on resin-state (the bind mounts are there, their content is new);
    # and an image without dumpe2fs, which the fsck check needs (the check must say so).
    "identity-made-anew-at-every-boot": Defect(
        edits=[
            root_file(
                CONFIG_JSON_SCRIPT,
                'mkdir -p "${RUNDIR}/sshd_config.d"',
                "rm -f /etc/ssh/hostkeys/ssh_host_ed25519_key*\n"
                "tr -d - < /proc/sys/kernel/random/uuid > /etc/machine-id\n"
                'mkdir -p "${RUNDIR}/sshd_config.d"',
            ),
            root_file_removed("/usr/sbin/dumpe2fs"),
        ],
        run=["suites/rootfs", "-k", "identity or checked_at_boot"],
        fails={
            "test_identity_survives_a_reboot": "SSH host key ssh-ed25519",
            "test_identity_survives_a_power_cut": "/etc/machine-id",
            "test_filesystems_checked_at_boot_come_back_clean": "lacks `dumpe2fs`",
        },
    ),
    # Five defects on one image, to keep the boots few (the session's device, the configured
    # one and the shared reboot): config.json's hostname ignored, the journal not persisted,
    # dnsServers "null" taken for a server name, a state path not bind-mounted, and a boot that
    # skips the filesystem checks. Each check must name its own defect; the checks none of them
    # touches must pass.
    "config-json-and-state-defects": Defect(
        edits=[
            root_file(CONFIG_JSON_SCRIPT, 'want="${cfg_hostname:-${DEFAULT_HOSTNAME}}"', 'want="${DEFAULT_HOSTNAME}"'),
            root_file(CONFIG_JSON_SCRIPT, 'if [ "${cfg_logging}" = true ]; then', "if false; then"),
            root_file(CONFIG_JSON_SCRIPT, "[ \"${cfg_dns}\" = null ] && cfg_dns=''", ": dnsServers null kept"),
            root_file("/etc/state-binds", "/var/lib/chrony\n", ""),
            boot_file("/EFI/BOOT/grub.cfg", "panic=2 tsc=reliable", "panic=2 fsck.mode=skip tsc=reliable"),
        ],
        run=[
            "suites/config",
            "suites/logging",
            "suites/rootfs",
            "-k",
            "before_boot or edits or journal or null or survive or bind_mounts or read_only or checked_at_boot",
        ],  # fmt: skip
        fails={
            "test_hostname_set_before_boot": "tb-configured",
            "test_edits_on_the_device_apply_after_a_reboot": "hostname",
            "test_persistent_journal_is_on_resin_data_within_limit": "/var/log/journal must come from resin-data",
            "test_persistent_journal_survives_a_reboot": "must keep earlier boots",
            "test_dns_servers_null_adds_no_server": 'dnsServers "null" must add no server',
            "test_persistent_paths_are_bind_mounts_from_resin_state": "/var/lib/chrony",
            "test_persistent_paths_survive_a_reboot": "/var/lib/chrony",
            "test_filesystems_checked_at_boot_come_back_clean": "resin-rootA was not checked at boot",
        },
    ),
    # Three defects of the farm checks on one image, to keep the boots few: each check must name
    # its own defect, and the lab check none of them touches (address, default route) must pass.
    "dns-ntp-ignored-avahi-in-production": Defect(
        edits=[
            root_file(CONFIG_JSON_SCRIPT, "printf 'server=%s\\n' \"${server}\"", ': "${server}"'),
            root_file(CONFIG_JSON_SCRIPT, "printf 'server %s iburst\\n' \"${server}\"", ': "${server}"'),
            root_file(
                CONFIG_JSON_SCRIPT,
                'if [ "${mode}" = development ]; then',
                'systemctl start --no-block avahi-daemon.service\nif [ "${mode}" = development ]; then',
            ),
        ],
        run=["suites/network", "--mode", "production", "-k", "farm or chrony"],
        fails={
            "test_farm_dns_name_resolves_through_the_devices_dnsmasq": "config.json dnsServers",
            "test_chrony_synchronises_with_the_farm_ntp_server": "config.json ntpServers",
            "test_hostname_answers_over_mdns_from_the_farm_in_development_mode": "production mode must not announce",
        },
        profile={"ntp_sync": 20},
    ),
}


# The hup suite's proofs, run by tests/test_hup.py (they need the update bundle).
HUP_DEFECTS = {
    "grub-never-falls-back": Defect(
        edits=[
            boot_file("/EFI/BOOT/grub.cfg", 'if [ "${bootcount}" -ge 2 ]; then', 'if [ "${bootcount}" -ge 99 ]; then')
        ],
        run=["suites/hup", "-k", "does_not_boot", "--hup-power-cuts", "0"],
        fails={"test_rollback_when_the_new_root_does_not_boot": "the kernel started 3 times"},
    ),
    "health-check-never-fires": Defect(
        edits=[],
        bundle_edits=[bundle_file_removed("/etc/systemd/system/multi-user.target.wants/rollback-health.service")],
        run=["suites/hup", "-k", "unhealthy", "--hup-power-cuts", "0"],
        fails={"test_rollback_when_the_new_root_is_unhealthy": "did not become ready over SSH"},
        # A good image is back on its old root in about two boots; this one never is.
        profile={"rollback": 160},
    ),
    # An update whose written root lost a file (a write cut short, a bad bundle).
    "updated-root-lost-a-file": Defect(
        edits=[],
        bundle_edits=[bundle_file_removed("/etc/issue")],
        run=["suites/hup", "-k", "keeps_data", "--hup-power-cuts", "0"],
        fails={"test_update_runs_the_new_root_and_keeps_data": "/etc/issue: FAILED open or read"},
    ),
}


@pytest.fixture(scope="module")
def reference_image() -> Path:
    return reference.build()


def _profile_with(tmp_path: Path, device: str, timeouts: dict[str, object]) -> Path:
    import yaml

    data = yaml.safe_load((REPO / "device_profiles" / f"{device}.yaml").read_text())
    data["name"] = f"{device}-defect"
    data["timeouts"].update(timeouts)
    path = tmp_path / f"{device}-defect.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", list(DEFECTS))
def test_suite_fails_the_check_that_matches_the_defect(name: str, reference_image: Path, tmp_path: Path) -> None:
    check_defect(DEFECTS[name], name, reference_image, tmp_path)


def check_defect(defect: Defect, name: str, reference_image: Path, tmp_path: Path) -> None:
    """Run the defect's suites on an overlay with its edits; its checks fail by name, the rest pass."""
    if defect.device != "qemu-x86_64":
        from testbed.profile import load_profile

        table = "mbr" if load_profile(defect.device).layout.table == "dos" else "gpt"
        reference_image = reference.build(reference.BuildOptions(table=table))
    overlay = tmp_path / f"{name}.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(reference_image), str(overlay)], check=True
    )
    for edit in defect.edits:
        edit(overlay)
    device = str(_profile_with(tmp_path, defect.device, defect.profile)) if defect.profile else defect.device
    extra: list[str] = []
    if "suites/hup" in defect.run:
        bundle = reference.build_bundle()
        if defect.bundle_edits:
            copy = tmp_path / "bundle.ext4"
            subprocess.run(["cp", "--sparse=always", str(bundle), str(copy)], check=True)
            copy.chmod(0o644)
            for edit in defect.bundle_edits:
                edit(copy)
            bundle = copy
        extra = ["--hup-bundle", str(bundle)]
    reports = tmp_path / "reports"
    env = {**os.environ, "TESTBED_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *defect.run]
        + ["--image", str(overlay), "--device", device, "--report-dir", str(reports), *extra],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=1500,
    )  # fmt: skip
    latest = next(reports.glob("*/latest"))
    report = json.loads((latest / "report.json").read_text())
    outcomes = {t["nodeid"].rsplit("::", 1)[1]: t for t in report["tests"]}
    assert done.returncode == 1, (
        f"a defective image must fail the run (exit 1), got {done.returncode}:\n{done.stdout[-3000:]}"
    )
    for test, words in defect.fails.items():
        record = next((r for n, r in outcomes.items() if n.split("[")[0] == test), None)
        assert record is not None, f"{test} did not run: {sorted(outcomes)}"
        assert record["outcome"] == "failed", f"{test} should fail on '{name}', it {record['outcome']}"
        assert words in record["message"], f"{test}'s message should name the defect ({words!r}): {record['message']}"
    unaffected = {n: r["outcome"] for n, r in outcomes.items() if n.split("[")[0] not in defect.fails}
    assert all(o == "passed" for o in unaffected.values()), f"checks the defect does not touch must pass: {unaffected}"
