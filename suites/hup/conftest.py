"""The hup suite's device: booted with the update bundle attached, snapshotted before and after
an update is written, so that each test starts from a known point in a second or two."""

from __future__ import annotations

import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.dut import DUT
from testbed.errors import ConfigError, DutError
from testbed.profile import Profile
from testbed.util import wait_until

STATE = "/mnt/state"
BREADCRUMBS = ("rollback-health-breadcrumb", "rollback-altboot-breadcrumb")
TRIGGERED = ("rollback-health-triggered", "rollback-altboot-triggered")
# The health check runs 3 times, 2 s apart, before it rolls back: a broken root is given up in
# seconds, not the image's default minutes.
HEALTH_VARIABLES = "COUNT=3\nTIMEOUT=2\n"
INACTIVE = "/mnt/sysroot/inactive"
CANARY = "/mnt/data/hup-canary"  # written before the update, checked after it
# Free the page cache, then fill all but 64 MiB of the free memory with zeros once.
SCRUB_FREE_MEMORY = (
    "sync && echo 3 > /proc/sys/vm/drop_caches && "
    "mib=$(( $(sed -n 's/^MemFree: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo) / 1024 - 64 )) && "
    "if [ $mib -gt 0 ]; then dd if=/dev/zero of=/dev/null bs=${mib}M count=1 status=none; fi"
)


@pytest.fixture(scope="session")
def hup_bundle(pytestconfig: pytest.Config, testbed_state) -> Path:
    """The update bundle: ``--hup-bundle``, else the reference recipe built as a newer version."""
    option = pytestconfig.getoption("--hup-bundle")
    if option:
        path = Path(option).expanduser()
        if not path.is_file():
            raise ConfigError(f"--hup-bundle {option}: no such file (give a root filesystem image, ext4)")
        return path.resolve()
    if pytestconfig.getoption("--image"):
        raise ConfigError(
            "the hup suite needs an update bundle for --image: give one with --hup-bundle PATH "
            "(the new root filesystem, ext4)"
        )
    from testbed import reference

    return reference.build_bundle(log=testbed_state._say)


@dataclass
class Hup:
    """The hup suite's device and what the tests need to know about it."""

    dut: DUT
    bundle: Path
    old_root: str = ""
    old_version: str = ""
    new_version: str = ""
    update_s: float = 0.0
    first_boot_s: float = 0.0
    rolled_back: bool = False  # the device has just rolled back (left so by a test)

    bundle_device: str = ""  # where the device reads the bundle

    def fresh(self, snapshot: str = "hup-ready") -> DUT:
        self.dut.restore(snapshot)
        return self.dut

    def update(self) -> str:
        """Write the bundle with hostapp-update; return the version now on the inactive root."""
        self.dut.run(f"hostapp-update -f {shlex.quote(self.bundle_device)}", timeout=600, check=True)
        return self.version(f"{INACTIVE}/usr/lib/os-release")

    def version(self, path: str = "/etc/os-release") -> str:
        out = self.dut.run(f'. {shlex.quote(path)} && echo "$VERSION_ID"', check=True).stdout.strip()
        if not out:
            raise DutError(f"{path} on {self.dut.name} has no VERSION_ID")
        return out

    def other_root(self, root: str) -> str:
        return {"resin-rootA": "resin-rootB", "resin-rootB": "resin-rootA"}[root]

    def break_inactive(self, command: str) -> None:
        """Damage the freshly written root (mounted read-only at /mnt/sysroot/inactive)."""
        self.dut.run(
            f"mount -o remount,rw {INACTIVE} && ({command}) && sync && mount -o remount,ro {INACTIVE}",
            check=True,
        )

    def state_files(self) -> set[str]:
        out = self.dut.run(f"ls -1 {STATE}", check=True).stdout
        return {name for name in out.split() if name.startswith("rollback-")}

    def wait_committed(self) -> None:
        """Wait until the health check committed the running root (breadcrumbs gone)."""
        timeout = self.dut.profile.timeouts.health_commit
        check = " || ".join(f"test -e {STATE}/{name}" for name in BREADCRUMBS)
        wait_until(
            lambda: self.dut.run(f"! ({check})").ok,
            timeout,
            f"the update on {self.dut.name} to be committed (rollback breadcrumbs removed by the health check)",
            interval=2.0,
            max_interval=2.0,
        )


@pytest.fixture(scope="session")
def hup(dut_factory: Callable[..., DUT], hup_bundle: Path, device_profile: Profile) -> Hup:
    if device_profile.kind == "qemu":
        # Attached as a read-only disk, like a USB stick: nothing to copy.
        device = dut_factory("hup", media={"bundle": hup_bundle})
        state = Hup(device, hup_bundle, bundle_device=device.media_device("bundle"))
    else:
        # A board gets it over SSH, once: the snapshots below are a QEMU device's.
        device = dut_factory("hup")
        device.upload(hup_bundle, "/mnt/data/hup-bundle.ext4")
        state = Hup(device, hup_bundle, bundle_device="/mnt/data/hup-bundle.ext4")
    device.run(f"printf {shlex.quote(HEALTH_VARIABLES)} > {STATE}/rollback-health-variables && sync", check=True)
    state.old_root = device.running_root()
    state.old_version = state.version()
    device.save_snapshot("hup-ready")
    return state


@pytest.fixture(scope="session")
def updated(hup: Hup) -> Hup:
    """``hup`` with a snapshot "hup-updated": the update written, not yet booted.

    Before the update a canary file and its checksum go to resin-data (``CANARY``): the
    update test checks them after the reboot into the new root.
    """
    device = hup.fresh()
    import time

    device.run(f"head -c 4M /dev/urandom > {CANARY} && sha256sum {CANARY} > {CANARY}.sha256 && sync", check=True)
    t0 = time.monotonic()
    hup.new_version = hup.update()
    hup.update_s = time.monotonic() - t0
    if hup.new_version == hup.old_version:
        raise ConfigError(
            f"the update bundle {hup.bundle} holds version {hup.new_version}, the same as the image: "
            "an update must change VERSION_ID"
        )
    # Writing the update filled the guest's page cache, and a snapshot stores every page of
    # RAM that is not zero: free that cache and zero the free memory (a buffer filled from
    # /dev/zero and released), so that restoring "hup-updated" loads a few hundred MB, not 1 GB.
    device.run(SCRUB_FREE_MEMORY, check=True)
    device.save_snapshot("hup-updated")
    return hup


@pytest.fixture(scope="session")
def trial_rng(pytestconfig: pytest.Config) -> tuple[random.Random, int]:
    seed = pytestconfig.getoption("--hup-seed")
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 32)
    return random.Random(seed), seed
