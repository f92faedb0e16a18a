"""Fault checks on the virtual bench, run in the same session as the smoke suite.

Not collected on its own (the name does not start with ``test_``): ``tests/test_board.py``
runs ``python -m testbed smoke --device virtual-board -- tests/bench_checks.py``, so the
smoke suite and these checks share one boot of the virtual board. They need the bench
(its pty serial adapter and relay emulator) and skip on any other device.
"""

from __future__ import annotations

import pytest

from testbed.dut import DUT
from testbed.errors import InfraError
from testbed.machines.virtual_bench import VirtualBench, VirtualBoardMachine
from testbed.power.serial_relay import frame
from testbed.util import wait_until


def _bench(dut: DUT) -> VirtualBench:
    if not isinstance(dut.machine, VirtualBoardMachine):
        pytest.skip("needs the virtual bench (--device virtual-board)")
    return dut.machine.bench


def test_serial_adapter_pulled_out_mid_run_is_an_infra_error(dut: DUT) -> None:
    bench = _bench(dut)
    assert dut.console.run("echo before").stdout == "before\n"
    bench.adapter.unplug()
    with pytest.raises(InfraError) as err:
        dut.console.run("echo after", timeout=20)
    message = str(err.value)
    assert "serial adapter" in message and "last console lines" in message, message
    console = dut.machine.console
    assert console is not None
    wait_until(lambda: console.closed, 10, "the console reader to see the adapter gone")
    with pytest.raises(InfraError, match="serial adapter .* failed while reading"):
        dut.machine.check_alive()
    # Plugged in again (a new /dev/pts behind the same link, as a by-id link after re-plugging).
    bench.adapter.replug()


def test_power_cut_through_the_relay_and_the_board_comes_back(dut: DUT) -> None:
    bench = _bench(dut)
    dut.run("echo kept > /mnt/data/relay-marker && sync", check=True)
    before = dut.boot_id()
    seen = len(bench.relay.frames)
    boot = dut.power_cycle()
    # Exactly the LCUS frames a real module gets: channel 1 off, channel 1 on.
    assert bench.relay.frames[seen:] == [frame(1, False), frame(1, True)]
    assert boot.kind == "power-cycle" and boot.ssh_ready_s is not None
    assert dut.boot_id() != before
    assert dut.run("cat /mnt/data/relay-marker").stdout == "kept\n"
    # The serial console works again, on the re-plugged adapter.
    assert dut.console.run("echo back").stdout == "back\n"
