"""The hup suite's device: booted with the update bundle attached, snapshotted before and after
an update is written, so that each test starts from a known point in a second or two."""

from __future__ import annotations

import dataclasses
import random
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed import events as ev
from testbed.dut import DUT
from testbed.errors import ConfigError, DutError
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

    arch = testbed_state.resolve_profile().arch
    options = reference.BuildOptions(version=reference.BUNDLE_VERSION, arch=arch)
    return reference.build_bundle(options, log=testbed_state.say)


@dataclass
class Hup:
    """The hup suite's device and what the tests need to know about it."""

    dut: DUT
    bundle: Path
    old_root: str = ""
    old_version: str = ""
    new_version: str = ""
    update_s: float = 0.0
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
def hup(dut_factory: Callable[..., DUT], hup_bundle: Path, device_capabilities: frozenset[str]) -> Hup:
    if "media" in device_capabilities:
        # Attached as a read-only disk, like a USB stick: nothing to copy.
        device = dut_factory("hup", media={"bundle": hup_bundle})
        state = Hup(device, hup_bundle, bundle_device=device.media_device("bundle"))
    else:
        # Without attached media (a board) it goes over SSH, once, to resin-data.
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


@dataclass
class PowerCutTrials:
    """The power-cut trials: each cuts the power at a random moment during ``hostapp-update``
    (odd trials) or during the first boot of the new root (even trials), then powers on and
    checks that the device comes back on a root whose version matches.

    On QEMU they run on a twin of the hup device (a copy of its disks and snapshots) in a
    thread, started as soon as "hup-updated" exists, while the other tests use the hup
    device; a cut's wait and a boot's idle moments overlap the other tests' work. On a board
    they run on the board itself, when their test asks for the result.
    """

    hup: Hup  # the trials' device, with what the suite learnt about the update
    trials: int
    seed: int
    rng: random.Random
    first_boot_s: float  # the window of a cut during the first boot of the new root
    ended: dict[str, int] = field(default_factory=dict)
    evidence: ev.Collector = field(default_factory=lambda: ev.Collector("power-cut trials"))
    error: BaseException | None = None
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Run the trials in a thread; their events are collected for ``finish``."""
        self.thread = threading.Thread(target=self._run_caught, name="hup-power-cuts", daemon=True)
        self.thread.start()

    def _run_caught(self) -> None:
        with ev.collecting(self.evidence):
            try:
                self.run()
            except BaseException as exc:  # noqa: BLE001 - handed to the test in finish()
                self.error = exc

    def finish(self) -> dict[str, int]:
        """Wait for the trials (or run them here); their events go to the running test; raise
        their failure; return how many trials ended on each root."""
        if self.thread is None:
            self.run()
        else:
            self.thread.join()
            collector = ev.current()
            if collector is not None:
                collector.extend(self.evidence.snapshot())
            if self.error is not None:
                raise self.error
        return self.ended

    def run(self) -> None:
        hup, trials, seed = self.hup, self.trials, self.seed
        for trial in range(1, trials + 1):
            if self.stop.is_set():
                raise DutError(f"power-cut trials stopped after {trial - 1} of {trials}: the session ended")
            phase = "during hostapp-update" if trial % 2 else "during the first boot of the new root"
            if trial % 2:
                d = hup.fresh("hup-ready")
                d.run(f"systemd-run --quiet --unit=hup-trial-{trial} hostapp-update -f {hup.bundle_device}", check=True)
                window = hup.update_s
            else:
                d = hup.fresh("hup-updated")
                d.start_reboot()
                window = self.first_boot_s
            cut_after = self.rng.uniform(0, window)
            # The random moment of the fault is the experiment itself, not a wait for some state.
            time.sleep(cut_after)
            d.power.cut()
            try:
                d.power.on(timeout=d.profile.timeouts.rollback, max_boots=3, tolerate_panics=True)
            except DutError as exc:
                raise DutError(
                    f"power-cut trial {trial}/{trials} (seed {seed}) on {d.name}: cut {cut_after:.1f}s {phase}, "
                    f"the device boots neither root: {exc}"
                ) from None
            root = d.running_root()
            version = hup.version()
            expected = hup.old_version if root == hup.old_root else hup.new_version
            assert version == expected, (
                f"power-cut trial {trial}/{trials} (seed {seed}): {root} runs version {version}, expected {expected}"
            )
            self.ended[root] = self.ended.get(root, 0) + 1
            d.record_note(
                f"power-cut trial {trial}/{trials}: cut {cut_after:.1f}s {phase}",
                f"came back on {root} (version {version})",
            )
        hup.dut.record_note(
            f"power-cut trials: {trials} (seed {seed}) on {hup.dut.name}",
            ", ".join(f"{count} ended on {root}" for root, count in sorted(self.ended.items())),
        )


@pytest.fixture(scope="session")
def power_cuts(updated: Hup, pytestconfig: pytest.Config, dut_factory: Callable[..., DUT]) -> Iterator[PowerCutTrials]:
    """The power-cut trials (``--hup-power-cuts``, ``--hup-seed``), started at once on QEMU."""
    trials = pytestconfig.getoption("--hup-power-cuts")
    seed = pytestconfig.getoption("--hup-seed")
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 32)
    device = updated.dut
    # A cut during the first boot of the new root lands anywhere up to the time the hup
    # device's own first boot took to reach SSH (the health check may still be running then).
    cold = next((b.ssh_ready_s for b in device.boots if b.ssh_ready_s), None)
    first_boot = cold or device.profile.timeouts.boot_to_ssh / 4
    twin = None
    if trials > 0 and device.snapshots is not None:
        twin = dut_factory("hup-cuts", twin_of=device)
    run = PowerCutTrials(
        dataclasses.replace(updated, dut=twin) if twin is not None else updated,
        trials,
        seed,
        random.Random(seed),
        first_boot,
    )
    if twin is not None:
        run.start()
    yield run
    run.stop.set()
    if run.thread is not None and run.thread.is_alive():
        run.hup.dut.power.cut()  # the session ends: the trial's next wait fails at once
        run.thread.join(timeout=60)


@pytest.fixture(autouse=True)
def _power_cuts_start_early(request: pytest.FixtureRequest) -> None:
    """Once "hup-updated" exists, start the power-cut trials if this run has their test."""
    if "updated" not in request.fixturenames or "power_cuts" in request.fixturenames:
        return
    if any("power_cuts" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("power_cuts")
