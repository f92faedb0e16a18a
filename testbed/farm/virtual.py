"""A labgrid farm on this machine: a real coordinator, a real exporter, boards on QEMU.

What a rack of boards behind labgrid has, and what stands in for it here:

* the coordinator: ``labgrid-coordinator`` on 127.0.0.1 (never its default ``[::]``), in a
  private directory (it keeps ``places.yaml`` in its working directory);
* an exporter host: ``labgrid-exporter`` publishing each board's resources. Its serial
  ports go through ser2net, which testbed's wrapper (``testbed.farm.ser2net_loopback``,
  first on the exporter's PATH) keeps on loopback;
* a board: the virtual bench (``testbed.machines.virtual_bench``: QEMU behind a pty serial
  adapter, a loop block device as its SD card, sshd behind a loopback port forward),
  exported as ``RawSerialPort`` (the pty), ``NetworkPowerPort`` (model ``simplerest``, a
  PDU on loopback that starts and kills QEMU) and ``NetworkService`` (where sshd answers);
* the place: created in the coordinator with a match on the board's resource group and
  tags (``board=virtual``, ``farm=virtual``), plus ``testbed_flash``: the block device
  that is the board's SD card on the exporter host (see ``testbed.machines.remote``).

Every process (coordinator, exporter, ser2net through the wrapper, QEMU) dies with the
farm's owner; ``close()`` removes everything it made.
"""

from __future__ import annotations

import http.server
import os
import queue
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError, InfraError
from testbed.farm.coordinator import Coordinator
from testbed.machines.virtual_bench import VirtualBench
from testbed.profile import Profile
from testbed.util import OwnedProcess, free_port, private_dir, wait_until

START_TIMEOUT_S = 30.0


def labgrid_tool(name: str) -> str:
    """A labgrid program: beside this Python (its virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / name
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found: pip install 'labgrid>=26' (into the environment that runs testbed)")
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LabgridCoordinator:
    """``labgrid-coordinator`` on 127.0.0.1:``port`` in a private directory."""

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir or private_dir("testbed-lgc-")
        self._own_dir = workdir is None
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        self.address = f"127.0.0.1:{self.port}"
        self.proc: OwnedProcess | None = None
        self.start()

    def start(self) -> None:
        self.proc = OwnedProcess(
            [labgrid_tool("labgrid-coordinator"), "-l", self.address],
            cwd=self.workdir,
            stderr_path=self.workdir / "coordinator.log",
        )
        proc = self.proc

        def abort() -> None:
            if not proc.alive():
                raise InfraError(f"labgrid-coordinator exited at start: {proc.stderr_tail()}")

        wait_until(
            lambda: _port_open(self.port), START_TIMEOUT_S, f"labgrid-coordinator on {self.address}", abort=abort
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class HttpPdu:
    """A network PDU of the kind labgrid's ``simplerest`` model switches: ``GET
    /relay/{index}/{0|1}`` switches an outlet, ``GET /relay/{index}`` answers ``1`` or ``0``.

    Switching runs on one worker thread that lives as long as the PDU (QEMU dies with the
    thread that started it). ``broken`` makes every request fail with 503, as a PDU that lost
    its outlets does.
    """

    def __init__(self, outlets: dict[int, Any]) -> None:
        self.outlets = outlets  # index -> callable(on: bool)
        self.state = dict.fromkeys(outlets, False)
        self.broken = False
        self.requests: list[str] = []
        self._jobs: queue.SimpleQueue[tuple[int, bool, queue.SimpleQueue[BaseException | None]] | None] = (
            queue.SimpleQueue()
        )
        self._worker = threading.Thread(target=self._work, name="http-pdu worker", daemon=True)
        self._worker.start()
        pdu = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                pdu.requests.append(self.path)
                code, body = pdu._handle(self.path)
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._serve = threading.Thread(target=self.server.serve_forever, name="http-pdu", daemon=True)
        self._serve.start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/relay/{{index}}/{{value}}"

    def _handle(self, path: str) -> tuple[int, str]:
        if self.broken:
            return 503, "outlets unavailable\n"
        parts = [p for p in path.split("/") if p]
        if len(parts) not in (2, 3) or parts[0] != "relay" or not parts[1].isdigit():
            return 404, "no such outlet\n"
        index = int(parts[1])
        if index not in self.outlets:
            return 404, "no such outlet\n"
        if len(parts) == 2:
            return 200, "1" if self.state[index] else "0"
        if parts[2] not in ("0", "1"):
            return 400, "value must be 0 or 1\n"
        on = parts[2] == "1"
        done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._jobs.put((index, on, done))
        error = done.get()
        if error is not None:
            return 500, f"switching outlet {index} failed: {error}\n"
        self.state[index] = on
        return 200, parts[2]

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            index, on, done = job
            try:
                self.outlets[index](on)
                done.put(None)
            except BaseException as exc:  # noqa: BLE001 - reported to the HTTP client
                done.put(exc)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._jobs.put(None)
        self._worker.join(10)


class VirtualPlace:
    """One board of the virtual farm: a virtual bench switched by an outlet of the farm's PDU."""

    def __init__(self, name: str, profile: Profile) -> None:
        self.name = name
        self.group = name
        self.bench = VirtualBench(profile, relay=False)
        self.outlet = 1

    @property
    def serial_tty(self) -> str:
        assert self.bench.adapter is not None
        return self.bench.adapter.tty

    @property
    def disk(self) -> str:
        assert self.bench.disk is not None
        return str(self.bench.disk.path)

    def close(self) -> None:
        self.bench.close()


class VirtualFarm:
    """A coordinator, one exporter and ``count`` virtual boards as places ``{prefix}-1``...

    ``coordinator``: use a running one instead of starting one. ``exporter_name``: the name
    the exporter registers under.
    """

    def __init__(
        self,
        profile: Profile,
        count: int = 1,
        *,
        prefix: str = "virtual",
        coordinator: LabgridCoordinator | None = None,
        exporter_name: str = "virtual-rack",
        tags: dict[str, str] | None = None,
    ) -> None:
        self.profile = profile
        self.workdir = private_dir("testbed-farm-")
        self.places: list[VirtualPlace] = []
        self.coordinator: LabgridCoordinator | None = coordinator
        self._own_coordinator = coordinator is None
        self.exporter: OwnedProcess | None = None
        self.exporter_name = exporter_name
        self.pdus: list[HttpPdu] = []
        try:
            if self.coordinator is None:
                self.coordinator = LabgridCoordinator(workdir=self.workdir / "coordinator")
            for i in range(1, count + 1):
                place = VirtualPlace(f"{prefix}-{i}", profile)
                self.places.append(place)
                pdu = HttpPdu({place.outlet: place.bench.switch})
                self.pdus.append(pdu)
            self._write_exporter_config()
            with Coordinator(self.address) as coord:
                self.start_exporter(coord)
                for place, pdu in zip(self.places, self.pdus, strict=True):
                    coord.create_place(
                        place.name,
                        [f"{exporter_name}/{place.group}/*"],
                        {
                            "board": "virtual",
                            "farm": "virtual",
                            "arch": profile.arch,
                            "testbed_flash": place.disk,
                            **(tags or {}),
                        },
                        comment=f"virtual board on QEMU, PDU http://127.0.0.1:{pdu.port}",
                    )
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        assert self.coordinator is not None
        return self.coordinator.address

    def _write_exporter_config(self) -> None:
        lines = ["## the virtual farm's boards (written by testbed.farm.virtual)"]
        for place, pdu in zip(self.places, self.pdus, strict=True):
            host, ssh_port = place.bench.endpoint("ssh")
            lines += [
                f"{place.group}:",
                "  RawSerialPort:",
                f"    port: {place.serial_tty}",
                "    speed: 115200",
                "  NetworkPowerPort:",
                "    model: simplerest",
                f"    host: '{pdu.url()}'",
                f"    index: {place.outlet}",
                "  NetworkService:",
                f"    address: {host}",
                f"    port: {ssh_port}",
                f"    username: {self.profile.ssh.user}",
            ]
        (self.workdir / "exporter.yaml").write_text("\n".join(lines) + "\n")
        bindir = self.workdir / "bin"
        bindir.mkdir(exist_ok=True)
        wrapper = bindir / "ser2net"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m testbed.farm.ser2net_loopback "$@"\n')
        wrapper.chmod(0o755)

    def start_exporter(self, coord: Coordinator | None = None) -> None:
        env = dict(os.environ)
        env["PATH"] = f"{self.workdir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["TESTBED_SER2NET_WRAPPER_DIR"] = str(self.workdir / "bin")
        env["PYTHONUNBUFFERED"] = "1"
        self.exporter = OwnedProcess(
            [
                labgrid_tool("labgrid-exporter"),
                "-c", self.address,
                "-n", self.exporter_name,
                "--hostname", "127.0.0.1",
                str(self.workdir / "exporter.yaml"),
            ],
            cwd=self.workdir,
            env=env,
            stderr_path=self.workdir / "exporter.log",
        )  # fmt: skip
        exporter = self.exporter

        def published() -> bool:
            if not exporter.alive():
                raise InfraError(
                    f"labgrid-exporter exited at start (code {exporter.proc.returncode}): {exporter.stderr_tail()}"
                )
            assert session is not None
            groups = session.exporter_resources().get(self.exporter_name, {})
            return all(
                place.group in groups and all(r["avail"] for r in groups[place.group].values()) for place in self.places
            )

        session = coord or Coordinator(self.address)
        try:
            wait_until(published, START_TIMEOUT_S, f"labgrid-exporter {self.exporter_name} publishing its boards")
        finally:
            if coord is None:
                session.close()

    def stop_exporter(self) -> None:
        if self.exporter is not None:
            self.exporter.kill()
            self.exporter = None

    def restart_exporter(self) -> None:
        self.stop_exporter()
        self.start_exporter()

    def place(self, name: str) -> VirtualPlace:
        return next(p for p in self.places if p.name == name)

    def close(self) -> None:
        self.stop_exporter()
        for pdu in self.pdus:
            pdu.close()
        for place in self.places:
            place.close()
        if self.coordinator is not None and self._own_coordinator:
            self.coordinator.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> VirtualFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
