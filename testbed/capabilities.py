"""What a check asks of a device beyond the core: one helper that skips with a reason.

``require(dut.link, "link control", dut)`` returns the capability, or skips the check with a
reason naming the capability and the device (a board cannot pull its own cable; QEMU can).
The capabilities themselves are Protocols in ``testbed.machines.base``.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import pytest

T = TypeVar("T")


class _Device(Protocol):
    name: str

    @property
    def machine(self) -> _Machine: ...


class _Machine(Protocol):
    kind: str


def require(capability: T | None, what: str, device: _Device) -> T:
    """``capability``, or a skip that says which device lacks which capability."""
    if capability is None:
        pytest.skip(f"{device.name} ({device.machine.kind} machine) has no {what} capability")
    return capability
