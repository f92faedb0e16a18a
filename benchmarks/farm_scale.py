"""Scale, simulated: a labgrid farm of many places, many clients, clients killed at random.

    python benchmarks/farm_scale.py [--places 50] [--clients 10] [--minutes 3] [--kill-every 15]
                                    [--ttl 8] [--margin 10] [--seed N] [--json]

What is real: a ``labgrid-coordinator`` on 127.0.0.1, the lease keeper of every job
(``testbed.farm.lease.PlaceLease``), the client processes, the kills (``SIGKILL``) and the
ptys. What is simulated: the boards. Each place's console is a pty whose far end answers
like a booted device (it echoes what is typed, answers ``echo WORD`` with ``WORD`` and
prints a prompt naming the place); its path is the place's ``sim_console`` tag. Only the
scheduling and the locking are under test.

The places come in board models of very different sizes (1, 1, 2, 3, 5, 8, ... places) and
each job asks for a model at random: the scarce models are contended, so jobs queue and a
lease whose keeper was killed must expire and be broken by the next job that needs it.

Each client (``--client``, a child process of the benchmark) loops: request a place by tags,
run a short job on its console (``echo TOKEN`` for one to three seconds, each answer
expected back), write a verdict, release. It appends one JSON object a line to a log of its
own (``requested``, ``started`` once the place is held, ``releasing`` once the job stopped
using it, ``done`` with the verdict and the times; ``time.time()``, one host, one clock). While they run, the benchmark kills a client
every ``--kill-every`` seconds on average and starts a new one in its place, alternating
two kinds of kill:

* ``client``: ``kill -9`` of the client alone. Its keeper gets SIGTERM from the kernel
  (PR_SET_PDEATHSIG) and releases the place at once.
* ``client+keeper``: ``kill -9`` of the client's process group (the client and its
  keeper). The lease's heartbeat stops; the next job that finds the place held with an
  expired lease breaks it (the keeper's ``broke`` event) and takes it.

At the end the clients are told to stop (each finishes its job), then three checks:

(a) exclusive: per place, the hold intervals of different jobs never overlap (a job holds
    from the moment its lease was granted to the moment it stopped using the console, or
    to its kill); the commands each console received come from the job holding it, never
    interleaved with another job's; a lease was only ever broken after its client was
    killed, and only after it expired.
(b) no leaked lock: while running, no place stayed held past its lease expiry (plus the
    margin) while a job waited for its model, none stayed held without a lease, and a
    place whose client alone was killed was free again within the ttl (its keeper let go,
    the lease did not have to expire); after the clients stopped, every place still held
    was held by a killed keeper, and all were free within ttl + margin (an ordinary
    acquire, the "next job", breaks the expired leases); no keeper or client is left.
(c) every job has a verdict: ``passed``, ``failed`` (with its reason) or ``killed``.

It prints jobs per minute, request to acquired place (median, p95), the kills of each kind,
the leases broken after expiry, the coordinator's memory (VmRSS of its process) and PASS or
FAIL for each check; the exit code is 1 if a check failed. ``--json`` prints the same as one
JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import random
import re
import select
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import termios
import threading
import time
import tty
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError, InfraError
from testbed.farm.keeper import HOLDER_TAG, LEASE_TAG
from testbed.farm.lease import PlaceLease
from testbed.util import OwnedProcess, private_dir, wait_until

FARM_TAG = "scale"
CONSOLE_TAG = "sim_console"
CONSOLE_TIMEOUT_S = 10.0  # one command's answer on a pty with nothing else on the line
SAMPLE_S = 1.0  # how often the benchmark reads every place's holder and lease
CLIENT_START_S = 30.0  # a new client process writing its first line
STOP_GRACE_S = 60.0  # beyond --wait: a stopping client finishing its job
KILL_CLIENT = "client"
KILL_GROUP = "client+keeper"
# A holder name PlaceLease gives a job: host/user-testbed-PID[-N], PID the client's.
HOLDER_PID = re.compile(r"-testbed-(\d+)(?:-\d+)?$")


def pace(seconds: float) -> None:
    """Pacing, not synchronization: a job holding its place for a while, the killer's pause
    between kills. Nothing is waited for."""
    threading.Event().wait(seconds)


def model_sizes(places: int) -> list[int]:
    """Places per board model: 1, 1, 2, 3, 5, 8, ... the last taking what is left."""
    sizes: list[int] = []
    a, b = 1, 1
    while sum(sizes) < places:
        sizes.append(min(a, places - sum(sizes)))
        a, b = b, a + b
    if len(sizes) > 1 and sizes[-1] < sizes[-2]:
        sizes[-2] += sizes.pop()
    return sizes


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def read_log(path: Path) -> list[dict[str, Any]]:
    """A client's JSON lines; a line cut short by a kill is skipped."""
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def holder_pid(holder: str | None) -> int | None:
    match = HOLDER_PID.search(holder or "")
    return int(match.group(1)) if match else None


def vm_kib(pid: int, key: str) -> int | None:
    """A ``/proc/PID/status`` figure in KiB (VmRSS, VmHWM); None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# -- the simulated consoles ------------------------------------------------------------------
class SimConsoles:
    """One pty per place whose far end answers like a booted device's shell.

    One selector thread serves all of them. The host end (``/dev/pts/N``, what a client
    opens, as it would open a serial adapter) is raw: the echo comes from the "device", as
    on a serial line. The benchmark keeps each host end open itself, so the device end
    never sees a hangup between two jobs. Every command line is recorded with the time the
    device read it (``commands``), for the checker.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.paths: dict[str, str] = {}
        self.commands: list[tuple[float, str, str]] = []  # (time, place, line)
        self._fds: list[int] = []
        self._lines: dict[int, bytearray] = {}
        self._place: dict[int, str] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            for name in names:
                device, host = os.openpty()
                self._fds += [device, host]
                tty.setraw(host)
                os.set_blocking(device, False)
                self.paths[name] = os.ttyname(host)
                self._place[device] = name
                self._lines[device] = bytearray()
                self._selector.register(device, selectors.EVENT_READ)
        except BaseException:
            self._close_fds()
            raise
        self._thread = threading.Thread(target=self._serve, name="simulated consoles", daemon=True)
        self._thread.start()

    @staticmethod
    def prompt(place: str) -> bytes:
        return f"root@{place}:~# ".encode()

    def _serve(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.fd == self._wake_r:
                    return
                try:
                    data = os.read(key.fd, 4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    self._selector.unregister(key.fd)
                    continue
                self._feed(key.fd, data)

    def _feed(self, fd: int, data: bytes) -> None:
        place = self._place[fd]
        line = self._lines[fd]
        out = bytearray()
        for byte in data:
            if byte in (0x0D, 0x0A):
                out += b"\r\n"
                text = line.decode(errors="replace").strip()
                line.clear()
                if text:
                    self.commands.append((time.time(), place, text))
                    out += self._answer(place, text)
                out += self.prompt(place)
            else:
                line.append(byte)
                out.append(byte)
        try:
            os.write(fd, bytes(out))
        except (BlockingIOError, OSError):
            pass  # nobody reads the line and its buffer is full: a UART drops bytes too

    @staticmethod
    def _answer(place: str, command: str) -> bytes:
        word, _, rest = command.partition(" ")
        if word == "echo":
            return rest.encode() + b"\r\n"
        if word == "hostname":
            return place.encode() + b"\r\n"
        return f"-sh: {word}: not found\r\n".encode()

    def _close_fds(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        self._selector.close()
        self._close_fds()
        os.close(self._wake_r)
        os.close(self._wake_w)


# -- a client ----------------------------------------------------------------------------------
class JobFailed(Exception):
    pass


class ClientLog:
    """JSON lines appended with one write each (O_APPEND): a kill never leaves half a line
    in the middle of the log, at worst a cut last one."""

    def __init__(self, path: Path, client: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.client = client

    def write(self, event: str, **fields: Any) -> None:
        os.write(self.fd, (json.dumps({"client": self.client, "event": event, **fields}) + "\n").encode())


def expect(fd: int, wanted: bytes, timeout: float, what: str) -> None:
    """Read the console until ``wanted`` has come; JobFailed naming ``what`` and the last
    output after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    seen = b""
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise JobFailed(f"timed out after {timeout:g}s waiting for {what}; last output {seen[-160:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise JobFailed(f"the console closed while waiting for {what}")
            seen += chunk


def console_job(lease: PlaceLease, client: str, job: int, hold: float, rng: random.Random) -> int:
    """The job: ``echo TOKEN`` on the place's console for ``hold`` seconds, each answer (and
    the prompt naming this place) expected back. Returns the number of commands run."""
    path = lease.info.tags.get(CONSOLE_TAG)
    if not path:
        raise JobFailed(f"place {lease.name} has no {CONSOLE_TAG} tag")
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        termios.tcflush(fd, termios.TCIOFLUSH)  # what a killed job left on the line
        prompt = SimConsoles.prompt(lease.name)
        end = time.monotonic() + hold
        count = 0
        while True:
            count += 1
            token = f"{client}.{job}.{count}.{rng.getrandbits(32):08x}"
            os.write(fd, f"echo {token}\r".encode())
            expect(
                fd, f"echo {token}\r\n{token}\r\n".encode() + prompt, CONSOLE_TIMEOUT_S, f"the answer to echo {token}"
            )
            lease.check()
            if time.monotonic() >= end:
                return count
            pace(rng.uniform(0.2, 0.5))  # the job's think time between commands
    finally:
        os.close(fd)


def client_main(args: argparse.Namespace) -> int:
    """One client: jobs until told to stop (a line or the end of stdin), each logged."""
    # Its own process group: the benchmark's client+keeper kill is kill -9 of this group.
    os.setpgid(0, 0)
    log = ClientLog(Path(args.log), args.name)
    stop = threading.Event()

    def listen() -> None:
        for _ in sys.stdin.buffer:
            break
        stop.set()

    threading.Thread(target=listen, name="stop listener", daemon=True).start()
    rng = random.Random(args.seed)
    models = args.models.split(",")
    log.write("ready", pid=os.getpid())
    job = 0
    while not stop.is_set():
        job += 1
        model = rng.choice(models)
        requested = time.time()
        log.write("requested", job=job, model=model, requested=requested)
        try:
            lease = PlaceLease(args.coordinator, tags=f"farm={FARM_TAG},model={model}", wait=args.wait, ttl=args.ttl)
        except (ConfigError, InfraError) as exc:
            log.write("done", job=job, model=model, requested=requested, verdict="failed", reason=str(exc),
                      ended=time.time())  # fmt: skip
            continue
        acquired = time.time()
        broke = [
            {"place": e.get("place"), "holder": e.get("holder"), "lease": e.get("lease")}
            for e in lease.events
            if e.get("event") == "broke"
        ]
        log.write("started", job=job, model=model, place=lease.name, holder=lease.holder, keeper=lease.proc.pid,
                  requested=requested, acquired=acquired, broke=broke)  # fmt: skip
        verdict, reason, commands = "passed", "", 0
        try:
            commands = console_job(lease, args.name, job, rng.uniform(args.hold_min, args.hold_max), rng)
        except (JobFailed, InfraError, OSError, termios.error) as exc:
            verdict, reason = "failed", str(exc)
        released = time.time()  # the job no longer drives the place from here on
        log.write("releasing", job=job, released=released)
        lease.release()
        log.write("done", job=job, model=model, place=lease.name, holder=lease.holder, requested=requested,
                  acquired=acquired, released=released, freed=time.time(), verdict=verdict, reason=reason,
                  commands=commands, ended=time.time())  # fmt: skip
    return 0


# -- the benchmark ----------------------------------------------------------------------------
@dataclass
class Options:
    places: int = 50
    clients: int = 10
    minutes: float = 3.0
    kill_every: float | None = 15.0  # mean seconds between kills; None: no kills
    ttl: float = 8.0
    margin: float = 10.0
    wait: float = 120.0
    hold_min: float = 1.0
    hold_max: float = 3.0
    seed: int | None = None
    keep: Path | None = None  # copy the clients' logs and the coordinator's log here


@dataclass
class Client:
    name: str
    proc: OwnedProcess
    log: Path
    started: float
    killed: float | None = None
    kill_kind: str | None = None
    exit_code: int | None = None
    hung: bool = False

    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Kill:
    time: float
    client: str
    pid: int
    kind: str
    state: str  # what the client's log said just before: holding PLACE / waiting / idle


@dataclass
class Check:
    ok: bool
    detail: str
    problems: list[str] = field(default_factory=list)


@dataclass
class Result:
    options: dict[str, Any]
    models: dict[str, int]
    duration_s: float
    jobs: dict[str, int]
    jobs_per_minute: float
    acquire_s: dict[str, float | int | None]
    kills: dict[str, int]
    kills_holding: dict[str, int]
    freed_after_client_kill_s: dict[str, float | None]
    broken_leases: dict[str, Any]
    coordinator_rss_mb: float | None
    coordinator_peak_rss_mb: float | None
    checks: dict[str, Check]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())


class Monitor:
    """Reads every place's holder and lease once a second, for the checker."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.samples: list[tuple[float, dict[str, tuple[str | None, str | None, str | None]]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farm monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                places = self.session.places()
                now = time.time()
                self.samples.append(
                    (now, {n: (p.acquired, p.tags.get(HOLDER_TAG), p.tags.get(LEASE_TAG)) for n, p in places.items()})
                )
            except InfraError as exc:
                self.errors.append(str(exc))
            self._stop.wait(SAMPLE_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(CONSOLE_TIMEOUT_S + 30)


class Farm:
    """The coordinator, the places and their consoles; clients started and killed."""

    def __init__(self, options: Options, workdir: Path) -> None:
        from testbed.farm.coordinator import Coordinator
        from testbed.farm.virtual import LabgridCoordinator

        self.options = options
        self.workdir = workdir
        self.rng = random.Random(options.seed)
        sizes = model_sizes(options.places)
        self.models: dict[str, int] = {f"m{i}": size for i, size in enumerate(sizes)}
        self.place_model: dict[str, str] = {}
        index = 0
        for model, size in self.models.items():
            for _ in range(size):
                index += 1
                self.place_model[f"sim-{index:03d}"] = model
        self.clients: list[Client] = []
        self.kills: list[Kill] = []
        self.crashes: list[str] = []
        self._serial = 0
        self.consoles: SimConsoles | None = None
        self.coordinator: Any = None
        self.session: Any = None
        try:
            (workdir / "clients").mkdir()
            self.consoles = SimConsoles(list(self.place_model))
            self.coordinator = LabgridCoordinator(workdir=workdir / "coordinator")
            self.session = Coordinator(self.coordinator.address)
            for place, model in self.place_model.items():
                # No match, no exporter: the coordinator grants a place without resources, and
                # the console is found through the tag.
                self.session.create_place(
                    place,
                    [],
                    {"board": "sim", "farm": FARM_TAG, "model": model, CONSOLE_TAG: self.consoles.paths[place]},
                    comment="simulated board: a pty answering like a booted device",
                )
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        return str(self.coordinator.address)

    def coordinator_pid(self) -> int:
        return int(self.coordinator.proc.pid)

    # -- clients ------------------------------------------------------------------------------
    def start_client(self) -> Client:
        """A new client process. Started from the main thread only: a child's death signal
        fires when the thread that started it ends."""
        self._serial += 1
        name = f"c{self._serial:03d}"
        log = self.workdir / "clients" / f"{name}.jsonl"
        o = self.options
        argv = [
            sys.executable, str(Path(__file__).resolve()), "--client",
            "--name", name, "--log", str(log), "--coordinator", self.address,
            "--models", ",".join(self.models), "--ttl", str(o.ttl), "--wait", str(o.wait),
            "--hold-min", str(o.hold_min), "--hold-max", str(o.hold_max),
            "--client-seed", str(self.rng.getrandbits(32)),
        ]  # fmt: skip
        proc = OwnedProcess(argv, stdin=subprocess.PIPE, stderr_path=self.workdir / "clients" / f"{name}.err")
        client = Client(name, proc, log, time.time())
        self.clients.append(client)
        return client

    def live(self) -> list[Client]:
        return [c for c in self.clients if c.killed is None and c.exit_code is None]

    def client_state(self, client: Client) -> str:
        lines = [e for e in read_log(client.log) if "job" in e]
        if not lines or lines[-1]["event"] == "done":
            return "idle"
        if lines[-1]["event"] == "started":
            return f"holding {lines[-1]['place']}"
        if lines[-1]["event"] == "releasing":
            return "releasing"
        return "waiting"

    def kill(self, kind: str) -> Kill | None:
        """kill -9 a client (``client``) or its process group (``client+keeper``); a new client
        takes its slot."""
        ready = [c for c in self.live() if any(e["event"] == "ready" for e in read_log(c.log))]
        if not ready:
            return None
        holding = [c for c in ready if self.client_state(c).startswith("holding")]
        # Mostly clients holding a place (the case the leases are for), sometimes any client.
        pool = holding if holding and self.rng.random() < 0.75 else ready
        victim = self.rng.choice(pool)
        state = self.client_state(victim)
        pid = victim.pid()
        if kind == KILL_GROUP:
            try:
                if os.getpgid(pid) != pid:
                    kind = KILL_CLIENT
            except ProcessLookupError:
                kind = KILL_CLIENT
        now = time.time()
        try:
            if kind == KILL_GROUP:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        victim.proc.wait(10)
        victim.killed, victim.kill_kind = now, kind
        victim.exit_code = victim.proc.proc.returncode
        record = Kill(now, victim.name, pid, kind, state)
        self.kills.append(record)
        self.start_client()
        return record

    def replace_crashed(self) -> None:
        for client in self.live():
            code = client.proc.proc.poll()
            if code is not None:
                client.exit_code = code
                self.crashes.append(f"client {client.name} exited with code {code}: {client.proc.stderr_tail(5)}")
                self.start_client()

    def stop_clients(self) -> None:
        """Tell every client to stop after its job; wait for them (--wait and a grace)."""
        live = self.live()
        for client in live:
            stdin = client.proc.proc.stdin
            if stdin is None:
                continue
            try:
                stdin.write(b"stop\n")
                stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + self.options.wait + STOP_GRACE_S
        for client in live:
            code = client.proc.wait(max(0.0, deadline - time.monotonic()))
            if code is None:
                client.hung = True
                client.proc.kill()
                code = client.proc.proc.returncode
                self.crashes.append(f"client {client.name} did not stop within --wait + {STOP_GRACE_S:g}s")
            elif code != 0:
                self.crashes.append(f"client {client.name} exited with code {code}: {client.proc.stderr_tail(5)}")
            client.exit_code = code

    def close(self) -> None:
        for client in self.clients:
            client.proc.kill()
            if client.proc.proc.stdin is not None:
                try:
                    client.proc.proc.stdin.close()
                except OSError:
                    pass
        if self.session is not None:
            self.session.close()
        if self.coordinator is not None:
            self.coordinator.close()
        if self.consoles is not None:
            self.consoles.close()


def leftover_processes(address: str, script: str) -> list[str]:
    """Keepers or clients of this farm still running (there must be none at the end)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv)
        if address in text and ("testbed.farm.keeper" in text or (script in text and "--client" in text)):
            found.append(f"pid {entry.name}: {text[:160]}")
    return found


def drain(address: str, held: list[str], options: Options) -> tuple[list[dict[str, Any]], list[str]]:
    """The "next job" for every place still held: an ordinary acquire by name (which breaks an
    expired lease) and a release. Returns the leases broken and the problems."""
    broken: list[dict[str, Any]] = []
    problems: list[str] = []

    def one(name: str) -> None:
        # Acquired and released in one worker thread: the keeper's death signal is tied to
        # the thread that started it.
        try:
            lease = PlaceLease(address, place=name, wait=options.ttl + options.margin, ttl=options.ttl)
        except (ConfigError, InfraError) as exc:
            problems.append(f"place {name} could not be taken within ttl + margin: {exc}")
            return
        broken.extend(
            {"place": e.get("place"), "holder": e.get("holder"), "lease": e.get("lease"), "time": time.time()}
            for e in lease.events
            if e.get("event") == "broke"
        )
        lease.release()

    if held:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, len(held))) as pool:
            list(pool.map(one, held))
    return broken, problems


def run(options: Options, progress: Any = None) -> Result:
    """The whole benchmark: farm up, clients running and killed, clients stopped, checks."""
    say = progress or (lambda text: None)
    workdir = private_dir("testbed-scale-")
    farm: Farm | None = None
    monitor: Monitor | None = None
    try:
        farm = Farm(options, workdir)
        say(f"farm up: {options.places} places in {len(farm.models)} models on {farm.address}")
        monitor = Monitor(farm.session)
        t_start = time.time()
        for _ in range(options.clients):
            farm.start_client()
        first = farm.clients[: options.clients]

        def started_badly() -> None:
            for client in first:
                if not client.proc.alive():
                    raise InfraError(
                        f"client {client.name} exited at start (code {client.proc.proc.returncode}): "
                        f"{client.proc.stderr_tail(10)}"
                    )

        wait_until(
            lambda: all(any(e["event"] == "ready" for e in read_log(c.log)) for c in first),
            CLIENT_START_S,
            f"{options.clients} clients starting",
            abort=started_badly,
        )
        deadline = time.monotonic() + options.minutes * 60
        kinds = [KILL_CLIENT, KILL_GROUP]
        self_rng = random.Random(farm.rng.getrandbits(32))
        every = options.kill_every or math.inf
        next_kill = time.monotonic() + self_rng.uniform(0.5, 1.5) * every
        while time.monotonic() < deadline:
            # Pacing: the killer's pause, cut into steps so a crashed client is replaced soon.
            pace(max(0.0, min(1.0, next_kill - time.monotonic(), deadline - time.monotonic())))
            farm.replace_crashed()
            if time.monotonic() >= next_kill and time.monotonic() < deadline:
                # The two kinds alternate, so every run has both.
                kill = farm.kill(kinds[len(farm.kills) % 2])
                if kill is not None:
                    say(f"killed {kill.client} ({kill.kind}, {kill.state})")
                next_kill = time.monotonic() + self_rng.uniform(0.5, 1.5) * every
        t_stop = time.time()
        say(f"stopping {len(farm.live())} clients")
        farm.stop_clients()
        t_clients_gone = time.time()
        monitor.close()
        return check(farm, monitor, options, t_start, t_stop, t_clients_gone, say)
    finally:
        if monitor is not None:
            monitor.close()
        if farm is not None:
            farm.close()
        if options.keep is not None:
            options.keep.mkdir(parents=True, exist_ok=True)
            shutil.copytree(workdir, options.keep / workdir.name, ignore=shutil.ignore_patterns("places.yaml"))
        shutil.rmtree(workdir, ignore_errors=True)


def check(
    farm: Farm, monitor: Monitor, options: Options, t_start: float, t_stop: float, t_gone: float, say: Any
) -> Result:
    margin, ttl = options.margin, options.ttl
    clients = {c.name: c for c in farm.clients}
    group_killed_pids = {k.pid: k for k in farm.kills if k.kind == KILL_GROUP}

    # -- the jobs, from the clients' logs ------------------------------------------------------
    jobs: dict[tuple[str, int], dict[str, Any]] = {}
    for client in farm.clients:
        for line in read_log(client.log):
            if "job" not in line:
                continue
            jobs.setdefault((client.name, line["job"]), {"client": client.name, "job": line["job"]}).update(line)
    missing: list[str] = []
    for key, job in jobs.items():
        if job["event"] == "done":
            continue
        client = clients[key[0]]
        last = max(j for (c, j) in jobs if c == key[0])
        if client.killed is not None and key[1] == last and not client.hung:
            job["verdict"] = "killed"
            job["killed"] = client.killed
        else:
            job["verdict"] = None
            missing.append(f"job {key[0]}.{key[1]} ({job['event']}, client exit code {client.exit_code})")
    verdicts = {v: sum(1 for j in jobs.values() if j.get("verdict") == v) for v in ("passed", "failed", "killed")}
    failures = [f"{c}.{n}: {j.get('reason')}" for (c, n), j in jobs.items() if j.get("verdict") == "failed"]
    minutes = (t_stop - t_start) / 60
    passed_in_window = sum(1 for j in jobs.values() if j.get("verdict") == "passed" and j["released"] <= t_stop)
    waits = [j["acquired"] - j["requested"] for j in jobs.values() if j.get("acquired") is not None]

    # -- (a) exclusive --------------------------------------------------------------------------
    problems_a: list[str] = []
    holds: dict[str, list[tuple[float, float, str]]] = {}
    for (c, n), job in jobs.items():
        if job.get("acquired") is None or not job.get("place"):
            continue
        end = job.get("released") or job["killed"]  # a job killed while releasing had stopped before
        holds.setdefault(job["place"], []).append((job["acquired"], end, f"{c}.{n}"))
    for place, intervals in holds.items():
        intervals.sort()
        for (s1, e1, j1), (s2, e2, j2) in zip(intervals, intervals[1:], strict=False):
            if s2 < e1:
                problems_a.append(
                    f"{place}: held by {j1} [{s1 - t_start:.2f}, {e1 - t_start:.2f}] and {j2} "
                    f"[{s2 - t_start:.2f}, {e2 - t_start:.2f}] at once"
                )
    assert farm.consoles is not None
    by_place: dict[str, list[tuple[float, str]]] = {}
    for t, place, line in farm.consoles.commands:
        by_place.setdefault(place, []).append((t, line))
    for place, commands in by_place.items():
        seen: list[str] = []
        for t, line in sorted(commands):
            token = line.partition(" ")[2]
            parts = token.split(".")
            if len(parts) != 4 or not parts[1].isdigit():
                problems_a.append(f"{place}: a command from nobody's job: {line!r}")
                continue
            name = f"{parts[0]}.{parts[1]}"
            job = jobs.get((parts[0], int(parts[1])))
            if job is None or job.get("place") != place:
                problems_a.append(f"{place}: command {line!r} from {name}, which did not hold it")
                continue
            if t < job["acquired"] or t > job.get("released", math.inf):
                problems_a.append(f"{place}: command {line!r} from {name} outside its hold")
            if seen and seen[-1] != name:
                if name in seen:
                    problems_a.append(f"{place}: commands of {name} interleaved with {seen[-1]}'s")
                seen.append(name)
            elif not seen:
                seen.append(name)
    breaks_by_clients: list[dict[str, Any]] = []
    for job in jobs.values():
        for broke in job.get("broke") or []:
            breaks_by_clients.append({**broke, "time": job["acquired"], "requested": job["requested"]})

    clients_by_pid = {c.pid(): c for c in farm.clients}
    problems_b: list[str] = []

    def check_break(broke: dict[str, Any]) -> None:
        place, holder = broke["place"], broke.get("holder")
        client = clients_by_pid.get(holder_pid(holder) or -1)
        if client is None:
            problems_a.append(f"{place}: the lease of {holder}, no client of this run, was broken")
        elif client.killed is None or broke["time"] < client.killed:
            if broke["time"] < t_stop:
                problems_a.append(f"{place}: the lease of {holder} was broken while its client {client.name} ran")
            else:
                problems_b.append(f"{place}: {holder} held it after its client {client.name} stopped")
        elif client.kill_kind == KILL_CLIENT:
            problems_b.append(
                f"{place}: the keeper of {client.name} (killed alone) did not let go: its lease had to expire"
            )
        try:
            if broke["time"] < float(broke.get("lease") or "nan"):
                problems_a.append(f"{place}: the lease of {holder} was broken before it expired")
        except ValueError:
            problems_a.append(f"{place}: broken lease {broke.get('lease')!r} is not a time")

    for broke in breaks_by_clients:
        check_break(broke)

    # -- (b) no leaked lock ---------------------------------------------------------------------
    waiting_jobs: dict[str, list[tuple[float, float]]] = {}
    for job in jobs.values():
        end = job.get("acquired") or job.get("killed") or job.get("ended") or math.inf
        waiting_jobs.setdefault(job["model"], []).append((job["requested"], end))
    stale_reported: set[tuple[str, str]] = set()
    unleased_since: dict[str, tuple[str, float]] = {}
    for t, state in monitor.samples:
        for place, (acquired, tag_holder, lease) in state.items():
            if not acquired:
                unleased_since.pop(place, None)
                continue
            if tag_holder != acquired:
                since = unleased_since.setdefault(place, (acquired, t))
                if since[0] != acquired:
                    unleased_since[place] = (acquired, t)
                elif t - since[1] > margin and (place, acquired) not in stale_reported:
                    stale_reported.add((place, acquired))
                    problems_b.append(f"{place}: held by {acquired} without a lease for {t - since[1]:.0f}s")
                continue
            unleased_since.pop(place, None)
            try:
                expiry = float(lease or "")
            except ValueError:
                continue
            if t - expiry <= margin or (place, acquired) in stale_reported:
                continue
            for requested, end in waiting_jobs.get(farm.place_model[place], []):
                if requested <= t - margin and end > t:
                    stale_reported.add((place, acquired))
                    problems_b.append(
                        f"{place}: held by {acquired} {t - expiry:.0f}s past its lease while a job waited "
                        f"{t - requested:.0f}s for model {farm.place_model[place]}"
                    )
                    break
    freed_after_client_kill: list[float] = []
    for kill in farm.kills:
        job = next((j for j in jobs.values() if j["client"] == kill.client and j.get("verdict") == "killed"), None)
        if job is None or job["event"] != "started" or kill.kind != KILL_CLIENT:
            continue
        place, holder = job["place"], job["holder"]
        freed = next((t for t, s in monitor.samples if t >= kill.time and s[place][0] != holder), None)
        if freed is None:
            problems_b.append(f"{place}: still held by {holder} at the end, after its client alone was killed")
            continue
        freed_after_client_kill.append(freed - kill.time)
        # The keeper lets go at once; freed only after the ttl would be the lease expiring instead.
        if freed - kill.time > ttl:
            problems_b.append(f"{place}: held {freed - kill.time:.1f}s after its client alone was killed")
    places = farm.session.places()
    held = {name: p.acquired for name, p in places.items() if p.acquired}
    for name, holder in held.items():
        pid = holder_pid(holder)
        if pid not in group_killed_pids:
            problems_b.append(f"{name}: still held by {holder} after every client stopped (not a killed keeper)")
    say(f"clients stopped; {len(held)} places still held (keepers killed): taking them as the next job would")
    drain_broken, drain_problems = drain(farm.address, sorted(held), options)
    problems_b += drain_problems
    for broke in drain_broken:
        check_break(broke)
    free_after: float | None = None
    try:
        wait_until(
            lambda: not any(p.acquired for p in farm.session.places().values()),
            max(0.0, t_gone + ttl + margin - time.time()),
            "every place free after the clients stopped",
        )
        free_after = time.time() - t_gone
    except InfraError:
        still = {n: p.acquired for n, p in farm.session.places().items() if p.acquired}
        problems_b.append(f"places still held {ttl + margin:g}s after the clients stopped: {still}")
    script = str(Path(__file__).resolve())
    try:
        wait_until(lambda: not leftover_processes(farm.address, script), margin, "keepers and clients exiting")
    except InfraError:
        problems_b += [f"left running: {p}" for p in leftover_processes(farm.address, script)]
    rss = vm_kib(farm.coordinator_pid(), "VmRSS")
    hwm = vm_kib(farm.coordinator_pid(), "VmHWM")

    # -- (c) verdicts ---------------------------------------------------------------------------
    problems_c = missing + list(farm.crashes)

    kills_by_kind = {kind: sum(1 for k in farm.kills if k.kind == kind) for kind in (KILL_CLIENT, KILL_GROUP)}
    holding_by_kind = {
        kind: sum(1 for k in farm.kills if k.kind == kind and any(
            j["client"] == k.client and j.get("verdict") == "killed" and j["event"] == "started"
            for j in jobs.values()
        ))
        for kind in (KILL_CLIENT, KILL_GROUP)
    }  # fmt: skip
    late = [b["time"] - max(float(b["lease"]), b["requested"]) for b in breaks_by_clients if b.get("lease")]
    commands = len(farm.consoles.commands)
    checks = {
        "exclusive": Check(
            not problems_a,
            f"{sum(len(v) for v in holds.values())} holds, {commands} console commands, "
            f"{len(breaks_by_clients) + len(drain_broken)} broken leases checked",
            problems_a,
        ),
        "no_leaked_lock": Check(
            not problems_b,
            f"{len(monitor.samples)} samples; {len(held)} places held by killed keepers when the clients stopped, "
            + (f"all free {free_after:.1f}s after" if free_after is not None else "not all freed"),
            problems_b,
        ),
        "verdicts": Check(
            not problems_c,
            f"{len(jobs)} jobs: " + ", ".join(f"{n} {v}" for v, n in verdicts.items()) + f", {len(missing)} without",
            problems_c,
        ),
    }
    return Result(
        options=asdict(options),
        models=farm.models,
        duration_s=t_stop - t_start,
        jobs={**verdicts, "requested": len(jobs), "without_verdict": len(missing)},
        jobs_per_minute=passed_in_window / minutes if minutes > 0 else 0.0,
        acquire_s={
            "median": statistics.median(waits) if waits else None,
            "p95": percentile(waits, 95),
            "max": max(waits) if waits else None,
            "n": len(waits),
        },
        kills=kills_by_kind,
        kills_holding=holding_by_kind,
        freed_after_client_kill_s={
            "median": statistics.median(freed_after_client_kill) if freed_after_client_kill else None,
            "max": max(freed_after_client_kill) if freed_after_client_kill else None,
        },
        broken_leases={
            "by_jobs": len(breaks_by_clients),
            "at_end": len(drain_broken),
            "late_median_s": statistics.median(late) if late else None,
        },
        coordinator_rss_mb=rss / 1024 if rss is not None else None,
        coordinator_peak_rss_mb=hwm / 1024 if hwm is not None else None,
        checks=checks,
        failures=failures + [f"monitor: {e}" for e in monitor.errors[:5]],
    )


def _s(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}s"


def report(result: Result) -> str:
    o = result.options
    a, f, b = result.acquire_s, result.freed_after_client_kill_s, result.broken_leases
    lines = [
        f"farm scale: {o['places']} places in {len(result.models)} models "
        f"({', '.join(str(n) for n in result.models.values())}), {o['clients']} clients, "
        f"{result.duration_s / 60:.1f} min, "
        + (f"a kill every ~{o['kill_every']:g}s" if o["kill_every"] else "no kills")
        + f", lease ttl {o['ttl']:g}s",
        f"jobs: {result.jobs['passed']} passed, {result.jobs['failed']} failed, {result.jobs['killed']} killed "
        f"(of {result.jobs['requested']}); {result.jobs_per_minute:.1f} jobs/minute",
        f"request -> acquired place: median {_s(a['median'])}, p95 {_s(a['p95'])}, max {_s(a['max'])} (n={a['n']})",
        f"kills: {result.kills[KILL_CLIENT]} client only ({result.kills_holding[KILL_CLIENT]} holding a place, "
        f"freed after median {_s(f['median'])}, max {_s(f['max'])}), {result.kills[KILL_GROUP]} client+keeper "
        f"({result.kills_holding[KILL_GROUP]} holding a place)",
        f"leases broken after expiry: {b['by_jobs']} by the next job (median {_s(b['late_median_s'])} after "
        f"expiry or request), {b['at_end']} at the end",
        "coordinator memory: "
        + (
            f"{result.coordinator_rss_mb:.1f} MB RSS (peak {result.coordinator_peak_rss_mb:.1f} MB)"
            if result.coordinator_rss_mb is not None and result.coordinator_peak_rss_mb is not None
            else "n/a"
        ),
    ]
    for name, check_ in result.checks.items():
        lines.append(f"check {name}: {'PASS' if check_.ok else 'FAIL'} ({check_.detail})")
        lines += [f"    {p}" for p in check_.problems[:20]]
        if len(check_.problems) > 20:
            lines.append(f"    ... {len(check_.problems) - 20} more problems")
    if result.failures:
        lines.append("failed jobs:")
        lines += [f"    {x}" for x in result.failures[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--places", type=int, default=50)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--kill-every", type=float, default=15.0, help="mean seconds between kills (0: no kills)")
    parser.add_argument("--ttl", type=float, default=8.0, help="the jobs' lease ttl in seconds")
    parser.add_argument("--margin", type=float, default=10.0, help="seconds a lease may stay past its expiry")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds a job queues for a place")
    parser.add_argument("--hold-min", type=float, default=1.0)
    parser.add_argument("--hold-max", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep the clients' logs under this directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--verbose", action="store_true", help="print the kills as they happen (stderr)")
    # One client (started by the benchmark itself).
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--client-seed", type=int, dest="client_seed", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        args.seed = args.client_seed
        return client_main(args)
    if args.places < 1 or args.clients < 1:
        parser.error("--places and --clients must be at least 1")
    options = Options(
        places=args.places, clients=args.clients, minutes=args.minutes,
        kill_every=args.kill_every if args.kill_every > 0 else None, ttl=args.ttl, margin=args.margin,
        wait=args.wait, hold_min=args.hold_min, hold_max=args.hold_max, seed=args.seed, keep=args.keep,
    )  # fmt: skip

    def progress(text: str) -> None:
        if args.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    try:
        result = run(options, progress)
    except (ConfigError, InfraError) as exc:
        print(f"farm scale: {exc}", file=sys.stderr)
        return 4 if isinstance(exc, ConfigError) else 75
    if args.json:
        print(json.dumps({**asdict(result), "ok": result.ok}, indent=2, default=str))
    else:
        print(report(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
