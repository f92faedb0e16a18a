"""A labgrid coordinator session usable from ordinary (synchronous) code.

labgrid's ``ClientSession`` is asyncio code: its message pump must keep running for the
coordinator's place and resource updates (and gRPC's keepalives) to be handled. Here it
runs in an event loop on a thread of its own; every call is a coroutine submitted to that
loop and waited for with a named timeout. One session per process (labgrid's coordinator
handles one stream per client process best).

Errors say whose fault they are: an unreachable coordinator is the lab's (InfraError, exit
75), a place that does not exist or lacks a resource is the user's (ConfigError, exit 4).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import getpass
import logging
import os
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from testbed.errors import ConfigError, InfraError

T = TypeVar("T")

DEFAULT_PORT = 20408
CONNECT_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 20.0


def coordinator_address(explicit: str | None = None) -> str:
    """The coordinator to use: ``explicit`` (an option or the profile), else ``LG_COORDINATOR``
    as labgrid users set it. ConfigError when neither names one."""
    address = explicit or os.environ.get("LG_COORDINATOR", "")
    if not address:
        raise ConfigError(
            "no labgrid coordinator named: set LG_COORDINATOR=HOST:PORT (as for labgrid-client), "
            "or board.coordinator in the device profile, or pass --coordinator"
        )
    return address


def default_identity() -> tuple[str, str]:
    """(host, user) labgrid shows as a place's holder."""
    return os.environ.get("LG_HOSTNAME", socket.gethostname()), os.environ.get("LG_USERNAME", getpass.getuser())


@dataclass
class PlaceInfo:
    """What testbed reads of one labgrid place."""

    name: str
    tags: dict[str, str]
    acquired: str | None
    matches: list[str]
    comment: str = ""
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    exporters: list[str] = field(default_factory=list)
    changed: float = 0.0  # the coordinator's time of the place's last change (acquire, release, tags)


class Coordinator:
    """One client session with a labgrid coordinator, on a loop thread of its own.

    ``user`` overrides the user half of the ``host/user`` name the coordinator records as
    a place's holder (testbed gives each run its own, so that two runs of one user on one
    host are two holders, as they are two runs).
    """

    def __init__(self, address: str, *, user: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> None:
        try:
            from labgrid.remote.client import ClientSession
        except ImportError as exc:
            raise ConfigError(
                f"labgrid is not installed ({exc}): pip install 'labgrid>=26' to use places of a labgrid farm"
            ) from None
        self.address = address if ":" in address else f"{address}:{DEFAULT_PORT}"
        host, default_user = default_identity()
        self.host = host
        self.user = user or default_user
        self.name = f"{self.host}/{self.user}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"labgrid session {self.address}", daemon=True)
        self._thread.start()
        self.session: Any = None
        # labgrid logs why a connection failed (gRPC's words) instead of raising it: keep it for
        # the one line this says, rather than a second line on stderr.
        heard = _Recorder()
        root = logging.getLogger()
        root.addHandler(heard)
        try:
            self.session = self.call(self._start(ClientSession), timeout, "connecting")
        except InfraError as exc:
            self.close()
            why = heard.last or str(exc).split(": ", 1)[-1]
            raise InfraError(
                f"labgrid coordinator {self.address} is unreachable ({why}); "
                "is labgrid-coordinator running there? (LG_COORDINATOR, --coordinator or board.coordinator)"
            ) from None
        except BaseException:
            self.close()
            raise
        finally:
            root.removeHandler(heard)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _start(self, session_class: Any) -> Any:
        args = argparse.Namespace(allow_unmatched=False, kick=False)
        session = session_class(self.address, self.loop, args=args)
        await self._own_connection(session)
        session.gethostname = lambda: self.host
        session.getuser = lambda: self.user
        try:
            await session.start()
        except BaseException:
            await _quietly(session.stop())
            await _quietly(session.close())
            raise
        return session

    @staticmethod
    async def _own_connection(session: Any) -> None:
        """Give the session a TCP connection of its own. gRPC shares one connection between the
        channels of a process that have the same target and options, and the coordinator tells
        its clients apart by that connection's address: a second session of one process (or a
        new one while the coordinator still tears down the last) would be taken for the first,
        and the coordinator's stream handler fails. The channel options are labgrid's own."""
        import grpc  # type: ignore[import-untyped]
        from labgrid.remote.generated import labgrid_coordinator_pb2_grpc

        old = session.channel
        session.channel = grpc.aio.insecure_channel(
            target=session.address,
            options=[
                ("grpc.keepalive_time_ms", 7500),
                ("grpc.keepalive_timeout_ms", 10000),
                ("grpc.http2.ping_timeout_ms", 10000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        session.stub = labgrid_coordinator_pb2_grpc.CoordinatorStub(session.channel)
        await old.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        """Run ``coro`` on the session's loop; InfraError naming the coordinator and ``what``
        when it fails at the gRPC level or takes longer than ``timeout``."""
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        try:
            return future.result(timeout + 5)
        except (TimeoutError, concurrent.futures.TimeoutError):
            future.cancel()
            raise InfraError(
                f"labgrid coordinator {self.address}: no answer within {timeout:g}s while {what}; "
                "is labgrid-coordinator running there and reachable?"
            ) from None
        except (ConfigError, InfraError):
            raise
        except Exception as exc:  # noqa: BLE001 - labgrid and gRPC raise their own classes
            detail = getattr(exc, "details", None)
            text = detail() if callable(detail) else str(exc)
            raise InfraError(
                f"labgrid coordinator {self.address}: {what} failed: {text or type(exc).__name__}"
            ) from None

    # -- reading ------------------------------------------------------------------------
    async def _refresh(self) -> None:
        if not await self.session.sync_with_coordinator():
            raise InfraError(f"labgrid coordinator {self.address}: the session was lost")

    def places(self) -> dict[str, PlaceInfo]:
        """Every place the coordinator has now."""

        async def read() -> dict[str, PlaceInfo]:
            await self._refresh()
            return {name: self._info(place) for name, place in self.session.places.items()}

        return self.call(read(), CALL_TIMEOUT_S, "listing places")

    def place(self, name: str) -> PlaceInfo:
        places = self.places()
        if name not in places:
            known = ", ".join(sorted(places)) or "none"
            raise ConfigError(
                f"labgrid place '{name}' does not exist on coordinator {self.address} (places: {known}); "
                f"check --place / board.place, or create it with labgrid-client -p {name} create"
            )
        return places[name]

    def _info(self, place: Any) -> PlaceInfo:
        resources: dict[str, dict[str, Any]] = {}
        exporters: list[str] = []
        for path in place.acquired_resources:
            exporter, group, cls, rname = path
            match = place.getmatch(path)
            name = match.rename if match is not None and match.rename else rname
            try:
                entry = self.session.resources[exporter][group][rname]
            except KeyError:
                continue
            resources[name] = {"cls": cls, "params": dict(entry.args), "avail": entry.avail, "exporter": exporter}
            if exporter not in exporters:
                exporters.append(exporter)
        return PlaceInfo(
            name=place.name,
            tags=dict(place.tags),
            acquired=place.acquired,
            matches=[str(m) for m in place.matches],
            comment=place.comment,
            resources=resources,
            exporters=exporters,
            changed=float(place.changed or 0.0),
        )

    def exporter_resources(self) -> dict[str, dict[str, dict[str, Any]]]:
        """exporter -> group -> resource name -> {cls, avail}: what the exporters publish now."""

        async def read() -> dict[str, dict[str, dict[str, Any]]]:
            await self._refresh()
            out: dict[str, dict[str, dict[str, Any]]] = {}
            for exporter, groups in self.session.resources.items():
                for group, resources in groups.items():
                    for rname, entry in resources.items():
                        out.setdefault(exporter, {}).setdefault(group, {})[rname] = {
                            "cls": entry.cls,
                            "avail": entry.avail,
                        }
            return out

        return self.call(read(), CALL_TIMEOUT_S, "listing resources")

    def matched_resources(self, name: str) -> dict[str, str]:
        """resource path -> class, of what the exporters publish now that place ``name``'s
        matches take (labgrid's own matching), whether or not the place is acquired."""

        async def read() -> dict[str, str]:
            await self._refresh()
            place = self.session.places[name]
            out: dict[str, str] = {}
            for exporter, groups in self.session.resources.items():
                for group, resources in groups.items():
                    for rname, entry in resources.items():
                        if place.hasmatch((exporter, group, entry.cls, rname)):
                            out[f"{exporter}/{group}/{entry.cls}/{rname}"] = entry.cls
            return out

        return self.call(read(), CALL_TIMEOUT_S, f"reading the resources of place {name}")

    # -- changing -----------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """Lock ``name`` for this session's holder name. The coordinator decides atomically:
        a place someone holds raises ``PlaceHeld`` naming the holder."""
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2

        async def go() -> None:
            await self._refresh()
            place = self.session.places.get(name)
            if place is None:
                raise ConfigError(f"labgrid place '{name}' does not exist on coordinator {self.address}")
            if place.acquired:
                raise PlaceHeld(name, place.acquired)
            try:
                await self.session.stub.AcquirePlace(pb2.AcquirePlaceRequest(placename=name))
            except Exception as exc:  # noqa: BLE001 - grpc.aio.AioRpcError
                await self._refresh()
                holder = self.session.places[name].acquired if name in self.session.places else None
                if holder and holder != self.name:
                    raise PlaceHeld(name, holder) from None
                raise InfraError(
                    f"labgrid coordinator {self.address}: acquiring place {name} failed: {_details(exc)}"
                ) from None
            await self._refresh()

        self.call(go(), CALL_TIMEOUT_S, f"acquiring place {name}")

    def release(self, name: str, *, fromuser: str | None = None) -> None:
        """Unlock ``name``. With ``fromuser`` only if that holder still holds it (atomic in the
        coordinator: a lease broken by two runs at once is broken once, and a place someone
        acquired meanwhile is left alone)."""
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2

        async def go() -> None:
            request = pb2.ReleasePlaceRequest(placename=name)
            if fromuser is not None:
                request.fromuser = fromuser
            await self.session.stub.ReleasePlace(request)
            await self._refresh()

        self.call(go(), CALL_TIMEOUT_S, f"releasing place {name}")

    def set_tags(self, name: str, tags: dict[str, str]) -> None:
        """Set (or, with an empty value, remove) tags of place ``name``."""
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2

        async def go() -> None:
            await self.session.stub.SetPlaceTags(pb2.SetPlaceTagsRequest(placename=name, tags=tags))
            await self._refresh()

        self.call(go(), CALL_TIMEOUT_S, f"setting tags of place {name}")

    def create_place(self, name: str, patterns: list[str], tags: dict[str, str], comment: str = "") -> None:
        """Create place ``name`` matching ``patterns`` (``exporter/group/*``) with ``tags``: the
        lab side of a farm (``labgrid-client create``, ``add-match``, ``set-tags``, ``set-comment``)."""
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2

        async def go() -> None:
            await self.session.stub.AddPlace(pb2.AddPlaceRequest(name=name))
            for pattern in patterns:
                await self.session.stub.AddPlaceMatch(pb2.AddPlaceMatchRequest(placename=name, pattern=pattern))
            if tags:
                await self.session.stub.SetPlaceTags(pb2.SetPlaceTagsRequest(placename=name, tags=tags))
            if comment:
                await self.session.stub.SetPlaceComment(pb2.SetPlaceCommentRequest(placename=name, comment=comment))
            await self._refresh()

        self.call(go(), CALL_TIMEOUT_S, f"creating place {name}")

    def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            try:
                self.call(_stop(session), 5, "closing the session")
            except InfraError:
                pass
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage().removeprefix("coordinator is unavailable: ")


class PlaceHeld(InfraError):
    """The place is locked by someone else (the lab is busy: exit 75 if the run cannot wait)."""

    def __init__(self, place: str, holder: str) -> None:
        super().__init__(f"labgrid place {place} is held by {holder}")
        self.place = place
        self.holder = holder


async def _stop(session: Any) -> None:
    await _quietly(session.stop())
    await _quietly(session.close())


async def _quietly(coro: Coroutine[Any, Any, Any]) -> None:
    try:
        await coro
    except Exception:  # noqa: BLE001 - shutting down a session that may be broken already
        pass


def _details(exc: BaseException) -> str:
    detail = getattr(exc, "details", None)
    return str(detail() if callable(detail) else exc)
