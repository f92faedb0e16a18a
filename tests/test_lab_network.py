"""The farm's lab network on its own (no device): services answer in a private namespace, an mDNS
query finds a responder there, nothing outlives a killed owner, and no privilege is a ConfigError."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.lab import network as lab
from testbed.lab.network import LabNetwork
from testbed.util import wait_until
from tests.conftest import REPO, require_tools


@pytest.fixture(scope="module")
def lab_tools() -> None:
    require_tools("ip", "nsenter", "dnsmasq")
    try:
        lab.find_chronyd()
    except ConfigError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {exc}")
        pytest.skip(str(exc))
    if os.geteuid() != 0:
        message = "the lab network needs root (a network namespace and a tap)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)


@pytest.fixture
def farm(lab_tools: None) -> Iterator[LabNetwork]:
    with LabNetwork() as network:
        yield network


def test_farm_services_answer_inside_their_own_namespace(farm: LabNetwork) -> None:
    assert farm.farm_resolve(lab.FARM_NAME) == [farm.farm_answer]
    assert farm.farm_resolve(lab.FARM_NAME.replace("farm-check", "unknown")) == []
    assert farm.ntp_stratum(lab.FARM) == lab.FARM_STRATUM
    assert farm.ns_fd is not None
    assert os.fstat(farm.ns_fd).st_ino != os.stat("/proc/self/ns/net").st_ino
    # Nothing is routed out of the namespace: only the lab subnet itself.
    routes = farm.ip("-4", "route").strip().splitlines()
    assert len(routes) == 1 and routes[0].startswith(str(lab.SUBNET)), routes


def test_taps_join_the_lab_bridge(farm: LabNetwork) -> None:
    first, second = farm.attach(), farm.attach()
    members = farm.ip("-br", "link", "show", "master", lab.BRIDGE)
    assert first.tap in members and second.tap in members
    assert first.mac != second.mac
    # The tap is not in this process's namespace.
    assert first.tap not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout


def _responder(farm: LabNetwork, name: str, address: str) -> threading.Thread:
    """A minimal mDNS responder on the lab network answering one legacy unicast query for ``name``."""
    sock = farm.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("224.0.0.251", 5353))
    mreq = socket.inet_aton("224.0.0.251") + socket.inet_aton(lab.FARM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.settimeout(10)

    def serve() -> None:
        with sock:
            data, peer = sock.recvfrom(9000)
            end = data.index(b"\0", 12) + 5
            question = data[12:end]
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 120, 4) + socket.inet_aton(address)
            header = struct.pack("!HHHHHH", int.from_bytes(data[:2], "big"), 0x8400, 1, 1, 0, 0)
            sock.sendto(header + question + answer, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_mdns_query_from_the_farm_finds_a_responder_on_the_lab_network(farm: LabNetwork) -> None:
    thread = _responder(farm, "device.local", "192.168.250.150")
    assert farm.mdns_resolve("device.local", timeout=5) == ["192.168.250.150"]
    thread.join(5)


def test_mdns_query_without_responder_returns_nothing(farm: LabNetwork) -> None:
    assert farm.mdns_resolve("nobody.local", timeout=0.5) == []


OWNER = """
import json, os, sys
from testbed.lab.network import LabNetwork
lab = LabNetwork().start()
lab.attach()
print(json.dumps({"pids": [p.pid for p in lab.services.values()], "ns": os.fstat(lab.ns_fd).st_ino}), flush=True)
sys.stdin.read()
"""


def _processes_in_net_ns(inode: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "net") == f"net:[{inode}]":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_nothing_outlives_a_killed_owner(lab_tools: None) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        started = json.loads(owner.stdout.readline())
        assert started["pids"] and _processes_in_net_ns(started["ns"])
    finally:
        owner.kill()
        owner.wait()

    def gone() -> bool:
        alive = [pid for pid in started["pids"] if Path(f"/proc/{pid}").exists()]
        return not alive and not _processes_in_net_ns(started["ns"])

    wait_until(gone, 10, "the farm's services and namespace to go with their killed owner")


def test_without_privilege_the_lab_is_a_config_error(lab_tools: None) -> None:
    # An unprivileged user with every tool at hand: creating the namespace is what fails.
    work = Path(tempfile.mkdtemp(prefix="testbed-lab-unprivileged-"))
    try:
        work.chmod(0o777)
        sbin = work / "cache" / lab.HOST_TOOLS / "usr" / "sbin"
        sbin.mkdir(parents=True)
        shutil.copy2(lab.find_chronyd(), sbin / "chronyd")
        for path in (work / "cache", work / "cache" / lab.HOST_TOOLS):
            path.chmod(0o777)
        probe = "from testbed.lab.network import LabNetwork\nLabNetwork().start()\n"
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", sys.executable, "-c", probe],
            cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**os.environ, "TESTBED_CACHE": str(work / "cache"), "TESTBED_RUNTIME_DIR": str(work),
                 "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert done.returncode != 0
    assert "ConfigError" in done.stderr and "CAP_SYS_ADMIN" in done.stderr, done.stderr[-2000:]
