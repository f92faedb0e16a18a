"""The boot model and its detector, fed the console of a recorded run (no QEMU).

The console log of a run (tests/data/reports/qemu-x86_64/...) is replayed line by line at the
times it was written: testbed's own marker lines stand for what the DUT tells the model
(power on, restore, SSH ready, power cut), every other line goes to the model as the console
reader would hand it over. The stages found must be the ones that run's report holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from testbed.boot import BootModel, BootState, BootTransitionError
from testbed.profile import ConsoleSettings, load_profile

RUN = Path(__file__).parent / "data" / "reports" / "qemu-x86_64" / "20261101T214958Z-5e6f"
LINE = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\.(\d+) \+\s*[-0-9.]+\] ?(.*)$")


class Clock:
    """The replay's "now": the wall time of the line being replayed, in seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def replay(model: BootModel, clock: Clock, console_log: Path) -> None:
    for raw in console_log.read_text().splitlines():
        m = LINE.match(raw)
        assert m, raw
        hh, mm, ss, frac, text = m.groups()
        clock.now = int(hh) * 3600 + int(mm) * 60 + int(ss) + float(f"0.{frac}")
        marker = re.fullmatch(r"==== testbed: (.*) ====", text)
        if marker is None:
            model.on_console_line(text)
        elif marker.group(1).startswith("power on"):
            model.powered_on("cold" if not model.boots else "power-cycle", clock.now, "tcg")
        elif marker.group(1).startswith("restored snapshot"):
            model.restoring()
        elif marker.group(1).startswith("ssh ready"):
            record = model.current
            assert record is not None
            model.ssh_ready(record, "127.0.0.1:2222")
        elif marker.group(1) == "power cut":
            model.off("power cut")


def test_the_stages_of_a_recorded_run_are_found_again() -> None:
    clock = Clock()
    heard: list[str] = []
    model = BootModel(
        "qemu-x86_64", load_profile("qemu-x86_64").console, lambda stage, _s, _d: heard.append(stage), clock
    )
    replay(model, clock, RUN / "console.log")
    expected = json.loads((RUN / "report.json").read_text())["timings"]["boots"]
    got = [b.as_dict() for b in model.boots]
    assert [b["kind"] for b in got] == [b["kind"] for b in expected]
    for mine, theirs in zip(got, expected, strict=True):
        # "reset" is a machine event (QEMU restarted), not a console line.
        want = [(s["stage"], s["at_s"]) for s in theirs["stages"] if s["stage"] != "reset"]
        assert [(s["stage"], pytest.approx(s["at_s"], abs=0.002)) for s in mine["stages"]] == want, mine["kind"]
        assert mine["ended_by"] == theirs["ended_by"]
    assert model.state == BootState.OFF
    assert model.kernel_starts == 3
    assert heard[:7] == ["power on", "firmware", "bootloader", "kernel", "userspace", "login", "ssh ready"]


def test_a_reboot_asked_of_the_os_ignores_the_shutdown_and_counts_from_the_request() -> None:
    clock = Clock()
    model = BootModel("d", ConsoleSettings(), clock=clock)
    model.powered_on("cold", 0.0, "tcg")
    clock.now = 20.0
    model.ssh_ready(model.boots[-1], "")
    model.rebooting()
    for t, line in (
        (20.5, "[  OK  ] Stopped target Multi-User System."),  # the old boot's userspace going down
        (21.0, "[   60.1] reboot: Restarting system"),
        (24.0, "BdsDxe: loading Boot0001"),
        (26.0, "[    0.000000] Linux version 6.1.0-26-amd64"),
    ):
        clock.now = t
        model.on_console_line(line)
    reboot = model.boots[-1]
    assert reboot.kind == "reboot" and len(model.boots) == 2
    assert [(s.stage, s.at_s) for s in reboot.stages] == [("firmware", 4.0), ("kernel", 6.0)]
    assert model.state == BootState.KERNEL


def test_a_device_that_resets_by_itself_starts_a_new_boot() -> None:
    clock = Clock()
    model = BootModel("d", ConsoleSettings(), clock=clock)
    model.powered_on("cold", 0.0, "tcg")
    for t, line in ((3.0, "BdsDxe: starting"), (5.0, "[    0.000000] Linux version 6.1"), (9.0, "Kernel panic")):
        clock.now = t
        model.on_console_line(line)
    # A booting kernel prints the firmware's name too: that is not a restart.
    model.on_console_line("[    0.000000] efi: EFI v2.70 by EDK II")
    assert len(model.boots) == 1
    clock.now = 12.0
    model.on_machine_event("reset", "guest-reset")  # QEMU restarted on the same disks
    assert [b.kind for b in model.boots] == ["cold", "reboot"]
    assert model.boots[0].ended_by == "reboot" and model.boots[0].end_s == 12.0
    assert [s.stage for s in model.boots[1].stages] == ["reset"]


def test_transitions_outside_the_table_are_refused() -> None:
    model = BootModel("d", ConsoleSettings())
    with pytest.raises(BootTransitionError, match="off cannot go to ssh ready"):
        model._enter(BootState.SSH_READY)
    model.on_console_line("BdsDxe: loading")  # a powered-off device shows nothing: ignored
    assert model.boots == [] and model.state == BootState.OFF


def test_an_arm64_kernels_efi_stub_and_its_banner_are_one_boot() -> None:
    """An arm64 kernel's EFI stub says "Booting Linux Kernel..." a second before the kernel's own
    banner: one boot with one kernel stage, not a reboot (as on the aarch64 console of a run here)."""
    clock = Clock()
    model = BootModel("qemu-aarch64", load_profile("qemu-aarch64").console, clock=clock)
    model.powered_on("cold", 0.0, "tcg")
    for t, line in (
        (0.003, "UEFI firmware (version  built at 13:10:49 on Nov  5 2024)"),
        (5.986, "Welcome to GRUB!"),
        (6.888, "EFI stub: Booting Linux Kernel..."),
        (7.969, "[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x410fd083]"),
        (7.970, "[    0.000000] Linux version 6.1.0-57-cloud-arm64 (debian-kernel@lists.debian.org)"),
        (20.4, "Welcome to testbed reference OS 1.0.0!"),
    ):
        clock.now = t
        model.on_console_line(line)
    assert [b.kind for b in model.boots] == ["cold"]
    assert [s.stage for s in model.boots[0].stages] == ["firmware", "bootloader", "kernel", "userspace"]
    assert model.kernel_starts == 1
    # Past its kernel, the banner of a kernel is a new boot (a reset with no firmware lines).
    clock.now = 40.0
    model.on_console_line("[    0.000000] Linux version 6.1.0-57-cloud-arm64 (debian-kernel@lists.debian.org)")
    assert [b.kind for b in model.boots] == ["cold", "reboot"]
