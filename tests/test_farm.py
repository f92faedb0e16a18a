"""The farm on labgrid's coordinator, with real parts on loopback.

A real ``labgrid-coordinator`` and ``labgrid-exporter`` (its serial ports through a real
ser2net kept on loopback by testbed's wrapper), two boards on QEMU behind ptys and an HTTP
PDU that labgrid's ``NetworkPowerDriver`` switches: ``testbed.farm.virtual``. Leases are
held by the real keeper process; the holder is killed with ``kill -9`` for real.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import testbed.farm  # noqa: F401 - before labgrid: testbed's gRPC settings (testbed/farm/__init__.py)
from testbed.errors import ConfigError, InfraError
from testbed.util import free_port, wait_until

REPO = Path(__file__).resolve().parent.parent


def _require_farm_tools() -> None:
    """labgrid and ser2net: fail with CI=true when either is missing, skip elsewhere."""
    missing = []
    try:
        import labgrid  # noqa: F401
    except ImportError:
        missing.append("labgrid (pip install 'labgrid>=26')")
    from testbed.farm.ser2net_loopback import find_ser2net

    if find_ser2net() is None:
        missing.append("ser2net (./run unpacks it from Debian's package)")
    if not missing:
        return
    message = f"needs {', '.join(missing)}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def farm(qemu_tools: None):
    _require_farm_tools()
    from testbed.farm.virtual import VirtualFarm
    from testbed.profile import load_profile

    with VirtualFarm(load_profile("virtual-board"), 2, tags={"testbed_device": "virtual-board"}) as f:
        yield f


@pytest.fixture
def coord(farm):
    from testbed.farm.coordinator import Coordinator

    with Coordinator(farm.address, user="observer") as c:
        yield c


def _free(coord, name: str) -> bool:
    return coord.place(name).acquired is None


HOLDER = textwrap.dedent(
    """
    import sys
    from testbed.farm.lease import PlaceLease
    lease = PlaceLease(sys.argv[1], place=sys.argv[2], ttl=float(sys.argv[3]))
    print(lease.holder, lease.proc.pid, flush=True)
    sys.stdin.read()
    """
)


def _holder(farm, place: str, ttl: float, *, new_group: bool = False) -> tuple[subprocess.Popen[str], str, int]:
    """A run that holds ``place`` (through its own keeper) until killed: (process, holder, keeper pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, farm.address, place, str(ttl)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=new_group,
    )
    assert proc.stdout is not None
    holder, keeper = proc.stdout.readline().split()
    return proc, holder, int(keeper)


def _sockets_of(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append((inodes[fields[9]], _address(fields[1])))
    return found


def _address(hex_addr: str) -> str:
    """``/proc/net/tcp{,6}``'s local address (32-bit words in host order) as ``HOST:PORT``."""
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(packed)
    return f"{ip}:{int(port, 16)}" if ip.version == 4 else f"[{ip}]:{int(port, 16)}"


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def test_the_ser2net_wrapper_binds_labgrids_accepters_to_loopback() -> None:
    from testbed.farm.ser2net_loopback import rewrite

    argv = ["-d", "-n", "-Y", "connection: &con01#  accepter: telnet(rfc2217,mode=server),tcp,40123", "-Y", "x"]
    assert (
        rewrite(argv, "127.0.0.1")[3]
        == "connection: &con01#  accepter: telnet(rfc2217,mode=server),tcp,127.0.0.1,40123"
    )
    assert rewrite(["-v"], "127.0.0.1") == ["-v"]


def test_every_farm_service_listens_on_loopback_only(farm, coord) -> None:
    """The coordinator, the exporter, ser2net (one per exported port), the PDUs, and a powered
    board's QEMU port forwards: nothing listens on another address."""
    from testbed.farm.lease import PlaceLease

    # The exporter starts a ser2net for a serial port when its place is acquired.
    leases = [PlaceLease(farm.address, place=p.name) for p in farm.places]
    farm.places[0].bench.switch(True)  # a powered board: its QEMU's forwards listen too
    try:

        def listening() -> tuple[list[tuple[int, str]], dict[int, str]] | None:
            sockets = _sockets_of(_descendants(os.getpid()))
            names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid, _ in sockets}
            # QEMU opens its port forwards a moment after it starts.
            return (sockets, names) if any(n.startswith("qemu-system") for n in names.values()) else None

        sockets, names = wait_until(listening, 30, "the powered board's QEMU listening on its forwards")
        programs = set(names.values())
        assert {"labgrid-coordin", "ser2net"} <= programs, programs
        assert len([n for n in names.values() if n == "ser2net"]) >= 2  # one per board
        outside = [(names[pid], addr) for pid, addr in sockets if not _loopback(addr)]
        assert not outside, f"listening beyond loopback: {outside}"
    finally:
        farm.places[0].bench.switch(False)
        for lease in leases:
            lease.release()


def test_a_place_is_held_by_one_run_and_a_second_waits_for_it(farm, coord) -> None:
    from testbed.farm.lease import PlaceLease

    first = PlaceLease(farm.address, place="virtual-1", ttl=5)
    try:
        assert coord.place("virtual-1").acquired == first.holder
        with pytest.raises(InfraError, match=rf"virtual-1 is held \(virtual-1 by {first.holder}\)"):
            PlaceLease(farm.address, place="virtual-1", wait=0)
        got: dict[str, object] = {}
        waiting = threading.Event()

        def second() -> None:
            lease = PlaceLease(
                farm.address,
                place="virtual-1",
                wait=60,
                on_event=lambda e: waiting.set() if e.get("event") == "waiting" else None,
            )
            got["lease"], got["at"] = lease, time.monotonic()

        t = threading.Thread(target=second)
        t.start()
        assert waiting.wait(30), "the second request never said it waits"
        assert coord.place("virtual-1").acquired == first.holder  # still the first's
        released_at = time.monotonic()
        first.release()
        t.join(60)
        lease = got["lease"]
        assert got["at"] > released_at  # type: ignore[operator]
        assert lease.holder != first.holder  # type: ignore[attr-defined]
        assert coord.place("virtual-1").acquired == lease.holder  # type: ignore[attr-defined]
        lease.release()  # type: ignore[attr-defined]
    finally:
        first.release()
    assert _free(coord, "virtual-1")


def test_a_run_killed_with_kill_9_lets_go_of_its_place_at_once(farm, coord) -> None:
    """The keeper gets SIGTERM from the kernel when its run dies and releases the place."""
    proc, holder, keeper = _holder(farm, "virtual-1", ttl=30)
    assert coord.place("virtual-1").acquired == holder
    proc.kill()  # SIGKILL: no cleanup in the run
    proc.wait()
    # Well within the 30 s lease: the release came from the keeper, not from expiry.
    wait_until(lambda: _free(coord, "virtual-1"), 20, "virtual-1 released after its holder was killed")
    assert "testbed_holder" not in coord.place("virtual-1").tags
    wait_until(lambda: not os.path.exists(f"/proc/{keeper}"), 10, "the keeper gone")


def test_a_lease_whose_keeper_died_too_expires_and_a_live_one_is_never_broken(farm, coord) -> None:
    from testbed.farm.lease import PlaceLease

    ttl = 3.0
    proc, holder, keeper = _holder(farm, "virtual-2", ttl=ttl, new_group=True)
    try:
        # Alive: its heartbeat keeps the lease, so a request that waits 3 leases long is refused.
        with pytest.raises(InfraError, match=f"held .*{holder}"):
            PlaceLease(farm.address, place="virtual-2", wait=3 * ttl)
        assert coord.place("virtual-2").acquired == holder
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its keeper at once: nobody releases
        proc.wait()
    wait_until(lambda: not os.path.exists(f"/proc/{keeper}"), 10, "the keeper gone")
    assert coord.place("virtual-2").acquired == holder  # labgrid alone would keep it forever
    lease = PlaceLease(farm.address, place="virtual-2", wait=60)
    try:
        broke = [e for e in lease.events if e.get("event") == "broke"]
        assert broke and broke[0]["holder"] == holder
        assert coord.place("virtual-2").acquired == lease.holder
    finally:
        lease.release()
    assert _free(coord, "virtual-2")


def test_farm_reap_releases_expired_leases_and_leaves_live_ones(farm, coord) -> None:
    from testbed.farm.lease import PlaceLease

    proc, holder, _ = _holder(farm, "virtual-1", ttl=2, new_group=True)
    live = PlaceLease(farm.address, place="virtual-2", ttl=2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_until(
            lambda: float(coord.place("virtual-1").tags.get("testbed_lease", "0")) < time.time(),
            10,
            "the dead holder's lease running out",
        )
        out = subprocess.run(
            [sys.executable, "-m", "testbed", "farm", "--coordinator", farm.address, "reap"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"place virtual-1: released (the lease of {holder} expired)" in out
        assert "1 expired lease released" in out
        assert _free(coord, "virtual-1")
        assert coord.place("virtual-2").acquired == live.holder
    finally:
        live.release()


def test_an_unreachable_coordinator_is_a_lab_fault_in_one_line(farm) -> None:
    port = free_port()
    for argv in (
        ["farm", "--coordinator", f"127.0.0.1:{port}", "places"],
        ["smoke", "--device", "virtual-board", "--place", "virtual-1", "--coordinator", f"127.0.0.1:{port}"],
    ):
        proc = subprocess.run([sys.executable, "-m", "testbed", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 75, proc.stdout + proc.stderr
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "unreachable" in line]
        assert lines and f"labgrid coordinator 127.0.0.1:{port} is unreachable" in lines[0]


def test_a_wrong_place_or_one_without_a_resource_is_bad_input_before_any_boot(farm, coord) -> None:
    coord.create_place("no-console", [f"{farm.exporter_name}/virtual-2/NetworkService"], {"board": "broken"})
    for place, expected in (
        ("virtual-9", "labgrid place 'virtual-9' does not exist on coordinator"),
        ("tags:board=rpi9", "no labgrid place on coordinator"),
        ("no-console", "labgrid place no-console has no serial console resource"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "testbed", "smoke", "--device", "virtual-board", "--place", place,
             "--coordinator", farm.address],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 4, proc.stdout + proc.stderr
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR: ")]
        assert len(errors) == 1 and expected in errors[0], proc.stdout + proc.stderr
        assert "power on" not in proc.stdout


def test_a_bad_farm_file_is_one_line_naming_the_field(tmp_path: Path) -> None:
    from testbed.farm.run import load_farm

    cases = {
        "jobs: []\n": "'jobs'",
        "jobs:\n  - {name: a, devices: [qemu-x86_64], suits: [smoke]}\n": "'jobs.0.suits'",
        "jobs:\n  - {name: a, devices: [qemu-x86_64], suites: [smok]}\n": "unknown suite 'smok'",
        "jobs:\n  - {name: a, devices: [qemu-x86_64], modes: [debug]}\n": "mode 'debug'",
        "jobs: [\n": "not valid YAML",
    }
    for text, expected in cases.items():
        path = tmp_path / "farm.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=expected) as err:
            load_farm(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    proc = subprocess.run(
        [sys.executable, "-m", "testbed", "farm", "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 4 and "farm file not found" in proc.stderr


@pytest.mark.qemu
def test_health_checks_take_a_sick_place_out_of_service(farm, coord, tmp_path: Path) -> None:
    """virtual-1 passes the smoke suite through the remote path (acquire, console over RFC 2217,
    power through labgrid, SSH, release); virtual-2's PDU is dead: it is marked bad, requests by
    tags skip it, and --reset puts it back."""
    from testbed.farm.lease import PlaceLease

    farm.pdus[1].broken = True
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "testbed", "farm", "--coordinator", farm.address, "health", "virtual-1",
             "virtual-2", "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        farm.pdus[1].broken = False
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "place virtual-1: good" in proc.stdout, proc.stdout
    assert "place virtual-2: bad" in proc.stdout and "503" in proc.stdout, proc.stdout
    good, bad = coord.place("virtual-1").tags, coord.place("virtual-2").tags
    assert good["testbed_health"] == "good" and bad["testbed_health"] == "bad"
    assert "503" in bad["testbed_health_reason"] and bad["testbed_health_report"].endswith("report.html")
    assert _free(coord, "virtual-1") and _free(coord, "virtual-2")

    report = json.loads(Path(good["testbed_health_report"]).with_name("report.json").read_text())
    assert report["result"] == "passed" and report["counts"]["passed"] == 4
    facts = report["facts"]
    assert facts["machine"] == "labgrid place" and facts["place"] == "virtual-1"
    assert facts["coordinator"] == farm.address and facts["exporters"] == [farm.exporter_name]
    assert facts["serial"].startswith("rfc2217://127.0.0.1:") and facts["power"] == "labgrid-network"
    assert facts["flash"]["verified"] is True

    lease = PlaceLease(farm.address, tags="board=virtual")  # virtual-2 is free but bad
    try:
        assert lease.name == "virtual-1"
    finally:
        lease.release()
    subprocess.run(
        [sys.executable, "-m", "testbed", "farm", "--coordinator", farm.address, "health", "--reset", "virtual-2"],
        check=True, capture_output=True,
    )  # fmt: skip
    assert "testbed_health" not in coord.place("virtual-2").tags


@pytest.mark.qemu
def test_a_farm_night_retries_a_lab_fault_on_another_place(farm, coord, tmp_path: Path) -> None:
    """The exporter is restarted while the first attempt boots: its console is lost (a lab
    fault, exit 75); the retry runs on the other place and passes; the summary shows both."""
    now = f"{time.time():.0f}"
    for place in ("virtual-1", "virtual-2"):
        coord.set_tags(place, {"testbed_health": "good", "testbed_health_at": now})
    farm_file = tmp_path / "farm.yaml"
    farm_file.write_text(
        textwrap.dedent(
            f"""
            coordinator: {farm.address}
            report_dir: {tmp_path / "night"}
            retries: 1
            jobs:
              - name: boards
                devices: [{{profile: virtual-board, place: "tags:board=virtual"}}]
                modes: [development]
                suites: [smoke]
            """
        )
    )
    for pdu in farm.pdus:
        pdu.requests.clear()
    run = subprocess.Popen(
        [sys.executable, "-m", "testbed", "farm", "run", str(farm_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: any("/relay/1/1" in pdu.requests for pdu in farm.pdus), 300, "the first attempt powering a board on"
        )
        farm.restart_exporter()
        out, _ = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out
    summary = json.loads((tmp_path / "night" / "summary.json").read_text())
    (job,) = summary["jobs"]
    first, second = job["attempts"]
    assert first["verdict"] == "lab fault" and first["exit_code"] == 75
    assert first["retried_because"].startswith(f"lab fault on {first['place']}")
    assert second["verdict"] == "passed" and second["place"] not in (None, first["place"])
    assert job["verdict"] == "passed" and summary["exit_code"] == 0
    html = (tmp_path / "night" / "summary.html").read_text()
    assert "retried:" in html and first["place"] in html and second["place"] in html
    assert _free(coord, "virtual-1") and _free(coord, "virtual-2")


def test_no_farm_process_outlives_the_farm(qemu_tools: None) -> None:
    """Closing the farm (or its owner dying) takes the coordinator, exporter and ser2net along."""
    _require_farm_tools()
    from testbed.farm.virtual import VirtualFarm
    from testbed.profile import load_profile

    before = _descendants(os.getpid())
    from testbed.farm.lease import PlaceLease

    with VirtualFarm(load_profile("virtual-board"), 1, prefix="short-lived") as f:
        workdir = f.workdir
        lease = PlaceLease(f.address, place="short-lived-1")  # its ser2net runs while it is held
        pids = _descendants(os.getpid()) - before - {lease.proc.pid}
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in pids}
        lease.release()
        assert {"labgrid-coordin", "labgrid-exporte", "ser2net"} <= names, names
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 15, "the farm's processes gone")
    assert not workdir.exists()
