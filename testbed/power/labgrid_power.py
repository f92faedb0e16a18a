"""Power through a labgrid power resource, switched by labgrid's own driver.

A place of a labgrid farm exports its board's power switch as a resource, e.g.
``NetworkPowerPort`` (a PDU: ``model`` names labgrid's backend, ``host`` its address or URL,
``index`` the outlet). This driver builds a labgrid target holding that resource and
labgrid's ``NetworkPowerDriver``, and switches through it: the PDU protocols are labgrid's,
not testbed's. The remote machine (``testbed.machines.remote``) fills the spec from the
place; a profile may also name a PDU directly::

    power: {driver: labgrid-network, model: simplerest, host: 'http://pdu:9999/relay/{index}/{value}', index: 1}

Every call has a timeout (some labgrid backends wait forever on a silent PDU): a PDU that
does not answer, or answers with an error, is the lab's fault (InfraError).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from testbed.errors import ConfigError, InfraError
from testbed.power.base import DEFAULT_OFF_SECONDS, Switch, check_off_seconds


@dataclass
class LabgridNetworkPower(Switch):
    """A PDU outlet through labgrid's NetworkPowerDriver."""

    model: str
    host: str
    index: int | str = 0
    timeout: float = 20.0
    verify: bool = True
    off_seconds: float = DEFAULT_OFF_SECONDS

    def __post_init__(self) -> None:
        check_off_seconds(self.off_seconds)
        try:
            from labgrid import Target
            from labgrid.driver import NetworkPowerDriver
            from labgrid.resource import NetworkPowerPort
        except ImportError as exc:
            raise ConfigError(
                f"power driver 'labgrid-network' needs labgrid: pip install 'labgrid>=26' ({exc})"
            ) from None
        self._target = Target("testbed-power")
        try:
            NetworkPowerPort(self._target, name=None, model=self.model, host=self.host, index=str(self.index))
            self._driver: Any = NetworkPowerDriver(self._target, name=None)
            self._target.activate(self._driver)
        except Exception as exc:  # noqa: BLE001 - labgrid rejects a model it lacks with its own errors
            raise ConfigError(f"power driver 'labgrid-network' (model {self.model}, host {self.host}): {exc}") from None

    def where(self) -> str:
        return f"labgrid power {self.model} {self.host.format(index=self.index, value='')} outlet {self.index}"

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                box["error"] = exc

        worker = threading.Thread(target=body, name=f"labgrid power {what}", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise InfraError(f"{self.where()}: no answer within {self.timeout:g}s to power {what}")
        if "error" in box:
            raise InfraError(f"{self.where()}: power {what} failed: {box['error']}")
        return box.get("value")

    def state(self) -> bool:
        return bool(self._call(self._driver.get, "get"))

    def _switch(self, on: bool) -> None:
        word = "on" if on else "off"
        self._call(self._driver.on if on else self._driver.off, word)
        if self.verify and self.state() != on:
            raise InfraError(f"{self.where()}: switched {word}, but the PDU reports it {'off' if on else 'on'}")

    def on(self) -> None:
        self._switch(True)

    def off(self) -> None:
        self._switch(False)

    def close(self) -> None:
        try:
            self._target.deactivate(self._driver)
        except Exception:  # noqa: BLE001 - closing a driver whose PDU is gone
            pass
