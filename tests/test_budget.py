"""The host's boot slots (testbed.budget): flock locks shared by every testbed process, given
back when the holder lets go or dies, and a wait that ends at its timeout naming the holders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from testbed import budget
from testbed.boot import BootModel
from testbed.errors import ConfigError, InfraError
from testbed.profile import ConsoleSettings


def test_the_budget_is_one_booting_tcg_guest_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TESTBED_BOOT_SLOTS", raising=False)
    assert budget.cpu_budget(2) == 2 and budget.cpu_budget(1) == 1
    assert budget.cpu_budget(8, kvm=True, guest_cpus=2) == 4
    assert budget.boot_slots("tcg", 2) == budget.cpu_budget()
    assert "host cores, tcg" in budget.describe("tcg", 2)
    monkeypatch.setenv("TESTBED_BOOT_SLOTS", "3")
    assert budget.boot_slots("tcg", 2) == 3 and "TESTBED_BOOT_SLOTS" in budget.describe("tcg", 2)
    monkeypatch.setenv("TESTBED_BOOT_SLOTS", "two")
    with pytest.raises(ConfigError, match="TESTBED_BOOT_SLOTS='two'"):
        budget.boot_slots("tcg", 2)


def test_a_guest_past_the_budget_waits_for_a_slot_and_names_the_holders(tmp_path: Path) -> None:
    first = budget.acquire("dut (power on)", 2, 0, tmp_path)
    second = budget.acquire("configured (power on)", 2, 0, tmp_path)
    assert first is not None and second is not None
    with pytest.raises(InfraError) as err:
        budget.acquire("twin (power on)", 2, 0.5, tmp_path)
    assert "no boot slot within 0.5s" in str(err.value)
    assert "dut (power on)" in str(err.value) and "configured (power on)" in str(err.value)
    # Given back while the third waits: the third gets it.
    got: list[budget.Slot | None] = []
    waiter = threading.Thread(target=lambda: got.append(budget.acquire("twin", 2, 30, tmp_path)))
    waiter.start()
    first.release()
    first.release()  # twice is harmless
    waiter.join(30)
    assert got and got[0] is not None and got[0].path == first.path
    assert budget.acquire("none", 0, 0, tmp_path) is None  # no budget: nothing held


def test_a_slot_of_a_process_killed_with_sigkill_is_free_at_once(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from testbed import budget; "
         f"s = budget.acquire('holder', 1, 0, Path({str(tmp_path)!r})); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(InfraError, match=rf"holder \(pid {holder.pid}\)"):
            budget.acquire("mine", 1, 0, tmp_path)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        slot = budget.acquire("mine", 1, 0, tmp_path)
        assert slot is not None
        slot.release()
    finally:
        holder.kill()
        holder.wait(10)


def test_the_boot_model_tells_its_watchers_when_a_boot_is_over() -> None:
    """The boot slot is given back at the login prompt, at SSH ready, at a restore and at off."""
    heard: list[str] = []
    model = BootModel("d", ConsoleSettings())
    model.watchers.append(heard.append)
    model.powered_on("cold", 0.0, "tcg")
    model.on_console_line("[    0.000000] Linux version 6.1.0")
    model.on_console_line("testbed-ref login: ")
    record = model.current
    assert record is not None
    model.ssh_ready(record, "127.0.0.1:2222")
    model.restoring()
    model.off("power cut")
    assert heard == ["power on", "kernel", "login", "ssh ready", "restore", "off"]
