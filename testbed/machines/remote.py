"""A board of a labgrid farm: a place reserved through labgrid's coordinator, driven as a board.

The profile (or ``--place``) names the place: ``board.place: rpi4-07`` or ``board.place:
tags:board=rpi4,farm=night`` (any place with those tags that is in service). The run
holds it through a lease (``testbed.farm.lease``: released however the run ends; a lease
whose keeper died expires), and takes the board's ports from the place's resources:

* the serial console: the exported serial port (``NetworkSerialPort``, served by ser2net on
  the exporter), opened by pyserial as ``rfc2217://HOST:PORT?ign_set_control``;
* power: the exported power resource (``NetworkPowerPort``), switched by labgrid's own
  ``NetworkPowerDriver`` (``testbed.power.labgrid_power``);
* sshd: the exported ``NetworkService`` (address and port), else the profile's
  ``board.ssh``, else ``<hostname>.local``;
* the boot medium: the profile's ``board.flash`` if it names one, else the place's
  ``testbed_flash`` tag: a block device on the exporter host, used when this run *is* on
  the exporter host (a CI runner beside its boards); else the board boots what it holds.

From there the Board machine's code runs unchanged: the same console, flasher and power
calls as a board on a desk. The report's facts name the place, the exporter and the
coordinator.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from testbed.console import ConsoleLog
from testbed.errors import ConfigError, InfraError
from testbed.farm.coordinator import PlaceInfo, coordinator_address
from testbed.farm.lease import PlaceLease
from testbed.machines.board import BoardMachine
from testbed.profile import BoardSettings, BoardSshSettings, Profile, SerialSettings

SERIAL_CLASSES = ("NetworkSerialPort",)
POWER_CLASSES = ("NetworkPowerPort",)


def check_host(profile: Profile) -> None:
    """Before anything boots: labgrid is installed, the coordinator answers (InfraError), the
    place exists or the tags match one (ConfigError), and a named place's matches take a
    serial console and a power resource from what its exporters publish now (ConfigError;
    an exporter that is not connected is the lab's, found when the run acquires the place)."""
    from testbed.farm.coordinator import Coordinator
    from testbed.farm.keeper import candidates, parse_tags

    board = profile.board
    assert board is not None and board.place
    try:
        import labgrid  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"device {profile.name} uses a labgrid place: pip install 'labgrid>=26' ({exc})") from None
    address = coordinator_address(board.coordinator)
    spec = board.place
    with Coordinator(address) as coord:
        places = coord.places()
        if spec.startswith("tags:"):
            candidates(places, None, parse_tags(spec[5:]), coord.address)
            return
        place = candidates(places, spec, {}, coord.address)[0]
        matched = coord.matched_resources(place.name)
    exporters = {m.split("/")[0] for m in place.matches}
    if not matched or not any(path.split("/")[0] in exporters for path in matched):
        return  # its exporter is away: a lab fault when the run acquires the place
    classes = set(matched.values())
    have = ", ".join(sorted(matched)) or "nothing"
    for needed, what in ((SERIAL_CLASSES, "serial console"), (POWER_CLASSES, "power switch")):
        if not classes.intersection(needed):
            raise ConfigError(
                f"labgrid place {place.name} has no {what} resource ({'/'.join(needed)}) among its matched "
                f"resources ({have}); add it to the exporter and labgrid-client -p {place.name} add-match it"
            )


def _local_host(host: str) -> bool:
    if host in ("127.0.0.1", "::1", "localhost"):
        return True
    names = {socket.gethostname(), socket.getfqdn()}
    return host in names


def settings_from_place(profile: Profile, place: PlaceInfo, coordinator: str) -> BoardSettings:
    """The board settings that the place's resources give (ConfigError for a resource the
    place lacks, InfraError for one its exporter does not offer now)."""
    board = profile.board
    assert board is not None
    by_class: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, resource in place.resources.items():
        by_class.setdefault(resource["cls"], (name, resource))
        if not resource.get("avail", True):
            raise InfraError(
                f"labgrid place {place.name}: resource {name} ({resource['cls']}) of exporter "
                f"{resource.get('exporter')} is not available now (unplugged, or the exporter lost it)"
            )
    if not place.resources:
        exporters = sorted({m.split("/")[0] for m in place.matches})
        raise InfraError(
            f"labgrid place {place.name} has no resources on coordinator {coordinator}: its exporter "
            f"({', '.join(exporters) or 'none matched'}) is not connected, or its matches find nothing"
        )
    have = ", ".join(f"{n} ({r['cls']})" for n, r in place.resources.items())

    serial = next((by_class[c] for c in SERIAL_CLASSES if c in by_class), None)
    if serial is None:
        raise ConfigError(
            f"labgrid place {place.name} has no serial console resource (a RawSerialPort or USBSerialPort "
            f"exported as {'/'.join(SERIAL_CLASSES)}); it has: {have}; add one to its exporter and match it"
        )
    params = serial[1]["params"]
    scheme = "socket" if params.get("protocol") == "raw" else "rfc2217"
    query = "?ign_set_control" if scheme == "rfc2217" else ""
    serial_settings = SerialSettings(
        url=f"{scheme}://{params['host']}:{params['port']}{query}", baudrate=int(params.get("speed") or 115200)
    )

    power = next((by_class[c] for c in POWER_CLASSES if c in by_class), None)
    if power is None:
        raise ConfigError(
            f"labgrid place {place.name} has no power resource testbed can switch "
            f"({'/'.join(POWER_CLASSES)}); it has: {have}; add the PDU outlet to its exporter and match it"
        )
    pp = power[1]["params"]
    power_spec: dict[str, Any] = {
        "driver": "labgrid-network",
        "model": pp["model"],
        "host": pp["host"],
        "index": pp.get("index", 0),
    }
    if board.power and board.power.get("driver") == "labgrid-network" and "off_seconds" in board.power:
        power_spec["off_seconds"] = board.power["off_seconds"]
    else:
        power_spec["off_seconds"] = 1.0

    ssh = board.ssh
    service = by_class.get("NetworkService")
    if service is not None:
        sp = service[1]["params"]
        ssh = BoardSshSettings(host=sp["address"], port=int(sp.get("port") or 22))

    flash = board.flash
    medium = place.tags.get("testbed_flash")
    if flash is None and medium:
        # Where the exporter's resources are served: a serial server's host, a PDU URL's host.
        exporter_hosts = {
            urlsplit(str(h)).hostname if "://" in str(h) else str(h)
            for h in (r["params"].get("host") for r in place.resources.values())
            if h
        }
        if exporter_hosts and all(h and _local_host(h) for h in exporter_hosts):
            flash = {"driver": "blockdev", "device": medium}
    return board.model_copy(
        update={"serial": serial_settings, "power": power_spec, "ssh": ssh, "flash": flash, "bench": "none"}
    )


class RemoteBoardMachine(BoardMachine):
    """A board behind a labgrid place, held by a lease for the machine's life."""

    def __init__(self, profile: Profile, image: Path, console_log: ConsoleLog, image_format: str = "raw") -> None:
        board = profile.board
        assert board is not None and board.place
        self.coordinator = coordinator_address(board.coordinator)
        spec = board.place
        by_tags = spec.startswith("tags:")

        def heard(event: dict[str, Any]) -> None:
            if event.get("event") == "waiting":
                console_log.mark(f"waiting for labgrid place {spec}: held ({'; '.join(event.get('held', []))})")
            elif event.get("event") == "broke":
                console_log.mark(
                    f"labgrid place {event.get('place')}: the lease of {event.get('holder')} expired; released it"
                )

        self.lease = PlaceLease(
            self.coordinator,
            place=None if by_tags else spec,
            tags=spec.removeprefix("tags:") if by_tags else None,
            wait=board.lock_wait,
            ttl=board.lease_seconds,
            on_event=heard,
            avoid=list(board.avoid_places),
        )
        try:
            console_log.mark(f"acquired labgrid place {self.lease.name} on {self.coordinator} as {self.lease.holder}")
            settings = settings_from_place(profile, self.lease.info, self.coordinator)
            super().__init__(
                profile, image, console_log, image_format, settings, ("board", f"labgrid place {self.lease.name}")
            )
        except BaseException:
            self.lease.release()
            raise

    def check_alive(self) -> None:
        self.lease.check()
        super().check_alive()

    def facts(self) -> dict[str, Any]:
        return {**super().facts(), "machine": "labgrid place", **self.lease.facts()}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.lease.release()
