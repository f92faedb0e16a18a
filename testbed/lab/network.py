"""The farm's own network services, on a lab network in a private network namespace.

A :class:`LabNetwork` is an anonymous network namespace held by an open file descriptor of
this process, with a bridge (``labbr0``, the farm at 192.168.250.1 and .2) and, per attached
device, a tap enslaved to that bridge whose file descriptor QEMU receives (``-netdev
tap,fd=N``). Inside the namespace run the farm's services, each an :class:`OwnedProcess`:

- dnsmasq: DHCP for the lab network (no router, no DNS server, no NTP server offered, so
  the device's default route stays on its user-mode NIC and only config.json points it at
  the farm), and the authority for ``testbed.lab`` (``farm-check.testbed.lab`` answers an
  address drawn per run);
- chronyd: an NTP server (``local stratum 8``) that never touches the host clock (``-x``).

The farm side asks questions from inside the namespace (DNS, NTP, an mDNS query for
``<hostname>.local``) with sockets created there. Nothing is routed out of the namespace:
the lab's traffic never leaves this machine.

No name is registered (no ``ip netns add``): the namespace lives as long as this process
holds its descriptor or a process runs in it. The services and QEMU die with the owner
(PR_SET_PDEATHSIG), so a ``kill -9`` of pytest leaves no namespace, bridge, tap or service
behind, and there is nothing stale to clean up.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from testbed.errors import ConfigError, InfraError
from testbed.util import OwnedProcess, cache_dir, private_dir, wait_until

T = TypeVar("T")

SUBNET = ipaddress.ip_network("192.168.250.0/24")
FARM = "192.168.250.1"
FARM_DNS_2 = "192.168.250.2"  # a second address of the farm DNS, for lists of servers
FARM_NAME = "farm-check.testbed.lab"
DHCP_RANGE = ("192.168.250.100", "192.168.250.199")
BRIDGE = "labbr0"
FARM_STRATUM = 8

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)

# Where ./run puts host tools taken from Debian packages without installing them (installing
# the chrony package would start a system-wide chronyd and replace systemd-timesyncd).
HOST_TOOLS = "host-tools"


def _fail_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def find_chronyd() -> str:
    """chronyd on PATH, in /usr/sbin, or unpacked by ./run into the cache; ConfigError otherwise."""
    candidates = [shutil.which("chronyd"), "/usr/sbin/chronyd", str(cache_dir() / HOST_TOOLS / "usr/sbin/chronyd")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise ConfigError(
        "chronyd (the farm's NTP server) is not available: `./run tests` unpacks it from the chrony "
        f"package into {cache_dir() / HOST_TOOLS} without installing a system service "
        f"(by hand: apt-get download chrony && dpkg-deb -x chrony_*.deb {cache_dir() / HOST_TOOLS})"
    )


def require_lab_tools() -> dict[str, str]:
    """Paths of the host tools the lab network needs, or a ConfigError that says how to get them."""
    tools: dict[str, str] = {}
    for name, package in (("ip", "iproute2"), ("nsenter", "util-linux"), ("dnsmasq", "dnsmasq-base")):
        found = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
        if not found:
            raise ConfigError(
                f"{name} is not installed: install the '{package}' package (apt-get install --no-install-recommends "
                f"{package}; dnsmasq-base is the binary alone, no system service)"
            )
        tools[name] = found
    tools["chronyd"] = find_chronyd()
    return tools


def _in_thread(ns_fd: int | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a short-lived thread that first enters (or, with None, creates) a network namespace.

    A network namespace belongs to a thread: the rest of this process stays where it is.
    Sockets and taps created by ``fn`` stay in the namespace they were created in.
    """
    box: dict[str, object] = {}

    def body() -> None:
        try:
            if ns_fd is None:
                if _libc.unshare(_CLONE_NEWNET) != 0:
                    _fail_errno("unshare(CLONE_NEWNET)")
            elif _libc.setns(ns_fd, _CLONE_NEWNET) != 0:
                _fail_errno("setns(CLONE_NEWNET)")
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=body, name="testbed-lab-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclass
class LabNic:
    """A device's NIC on the lab network: the tap's descriptor (for QEMU) and the guest MAC."""

    fd: int
    tap: str
    mac: str


def _dns_query(name: str, qtype: int = 1, txid: int | None = None, flags: int = 0x0100) -> tuple[int, bytes]:
    txid = secrets.randbelow(0x10000) if txid is None else txid
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return txid, struct.pack("!HHHHHH", txid, flags, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def _skip_name(data: bytes, off: int) -> int:
    while True:
        length = data[off]
        if length == 0:
            return off + 1
        if length & 0xC0 == 0xC0:
            return off + 2
        off += 1 + length


def _read_name(data: bytes, off: int) -> str:
    labels: list[str] = []
    for _ in range(64):
        length = data[off]
        if length == 0:
            break
        if length & 0xC0 == 0xC0:
            off = ((length & 0x3F) << 8) | data[off + 1]
            continue
        labels.append(data[off + 1 : off + 1 + length].decode(errors="replace"))
        off += 1 + length
    return ".".join(labels)


def parse_a_records(data: bytes) -> list[tuple[str, str]]:
    """(name, IPv4 address) of every A record in the answer and additional sections of a DNS message."""
    _txid, _flags, qd, an, ns, ar = struct.unpack("!HHHHHH", data[:12])
    off = 12
    for _ in range(qd):
        off = _skip_name(data, off) + 4
    found = []
    for _ in range(an + ns + ar):
        name = _read_name(data, off)
        off = _skip_name(data, off)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", data[off : off + 10])
        off += 10
        if rtype == 1 and rdlen == 4:
            found.append((name.lower(), socket.inet_ntoa(data[off : off + 4])))
        off += rdlen
    return found


class LabNetwork:
    """The farm's lab network and services; use as a context manager (or ``start()``/``close()``)."""

    def __init__(self, *, timeout: float = 20.0, workdir: Path | None = None) -> None:
        self.timeout = timeout
        self.workdir = workdir or private_dir("testbed-lab-")
        self.tools: dict[str, str] = {}
        self.ns_fd: int | None = None
        self.services: dict[str, OwnedProcess] = {}
        self.nics: list[LabNic] = []
        # An answer that exists only in this run's farm DNS: a stale cache or a resolver
        # outside the farm cannot produce it.
        self.farm_answer = f"198.18.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"

    # -- setup ---------------------------------------------------------------------------
    def start(self) -> LabNetwork:
        self.tools = require_lab_tools()
        try:
            self.ns_fd = _in_thread(None, lambda: os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except PermissionError as exc:
            raise ConfigError(
                f"creating the lab network namespace was refused ({exc}): the farm's network services need "
                "CAP_SYS_ADMIN and CAP_NET_ADMIN; run the tests as root (or in a container with those capabilities)"
            ) from None
        try:
            self.ip("link", "set", "lo", "up")
            self.ip("link", "add", BRIDGE, "type", "bridge")
            self.ip("addr", "add", f"{FARM}/{SUBNET.prefixlen}", "dev", BRIDGE)
            self.ip("addr", "add", f"{FARM_DNS_2}/{SUBNET.prefixlen}", "dev", BRIDGE)
            self.ip("link", "set", BRIDGE, "up")
            self._start_dnsmasq()
            self._start_chronyd()
            self._wait_services()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> LabNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _nsenter(self, argv: Sequence[str]) -> tuple[list[str], list[int]]:
        assert self.ns_fd is not None
        return [self.tools["nsenter"], f"--net=/proc/self/fd/{self.ns_fd}", "--", *argv], [self.ns_fd]

    def ip(self, *args: str) -> str:
        """Run ``ip`` inside the lab namespace; InfraError with its message when it fails."""
        argv, fds = self._nsenter([self.tools["ip"], *args])
        done = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise InfraError(f"lab network: `ip {' '.join(args)}` failed: {done.stderr.strip()}")
        return done.stdout

    def _service(self, name: str, argv: Sequence[str]) -> None:
        full, fds = self._nsenter(argv)
        self.services[name] = OwnedProcess(full, pass_fds=fds, stderr_path=self.workdir / f"{name}.log")

    def _start_dnsmasq(self) -> None:
        low, high = DHCP_RANGE
        self._service(
            "dnsmasq",
            [
                self.tools["dnsmasq"], "--keep-in-foreground", "--conf-file=/dev/null", "--log-facility=-",
                "--log-queries", "--log-dhcp", "--no-resolv", "--no-hosts", "--no-poll", "--pid-file=",
                # Root throughout: a change of user would clear PR_SET_PDEATHSIG, and the
                # service must die with its owner.
                "--user=root", "--group=root",
                f"--interface={BRIDGE}", "--bind-interfaces", "--except-interface=lo",
                "--local=/testbed.lab/", f"--host-record={FARM_NAME},{self.farm_answer}",
                f"--dhcp-range={low},{high},255.255.255.0,12h", "--dhcp-authoritative",
                # No router, DNS server or NTP server for the device: its default route stays on
                # the user-mode NIC, and only config.json can point it at the farm.
                "--dhcp-option=option:router", "--dhcp-option=option:dns-server",
                f"--dhcp-leasefile={self.workdir / 'dnsmasq.leases'}",
            ],
        )  # fmt: skip

    def _start_chronyd(self) -> None:
        conf = self.workdir / "chronyd.conf"
        conf.write_text(
            "# testbed farm NTP server: serves this host's clock, never changes it (-x)\n"
            f"local stratum {FARM_STRATUM}\n"
            f"allow {SUBNET}\n"
            f"bindaddress {FARM}\n"
            "cmdport 0\n"
            "bindcmdaddress /\n"
            f"pidfile {self.workdir / 'chronyd.pid'}\n"
            "driftfile /dev/null\n"
        )
        # -u root: no change of user, which would clear PR_SET_PDEATHSIG (see dnsmasq).
        self._service("chronyd", [self.tools["chronyd"], "-d", "-x", "-u", "root", "-f", str(conf)])

    def _wait_services(self) -> None:
        def answered() -> bool:
            for name, proc in self.services.items():
                if not proc.alive():
                    raise InfraError(f"the farm's {name} exited: {proc.stderr_tail()}")
            try:
                return self.farm_resolve(FARM_NAME, timeout=0.5) == [self.farm_answer] and bool(
                    self.ntp_stratum(FARM, timeout=0.5)
                )
            except OSError:
                return False

        wait_until(answered, self.timeout, "the farm's dnsmasq and chronyd to answer on the lab network")

    # -- devices ---------------------------------------------------------------------------
    def attach(self) -> LabNic:
        """A new tap on the lab bridge for one device's second NIC; the descriptor goes to QEMU."""
        index = len(self.nics)

        def make_tap() -> tuple[int, str]:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            ifr = struct.pack("16sH", f"labtap{index}".encode(), _IFF_TAP | _IFF_NO_PI)
            try:
                got = fcntl.ioctl(fd, _TUNSETIFF, ifr)
            except OSError:
                os.close(fd)
                raise
            return fd, got[:16].rstrip(b"\0").decode()

        try:
            fd, tap = _in_thread(self.ns_fd, make_tap)
        except OSError as exc:
            raise InfraError(
                f"lab network: cannot create a tap for a device's second NIC ({exc}): this host needs /dev/net/tun "
                "(modprobe tun; in a container, pass the device /dev/net/tun) and CAP_NET_ADMIN"
            ) from None
        self.ip("link", "set", tap, "master", BRIDGE)
        self.ip("link", "set", tap, "up")
        nic = LabNic(fd=fd, tap=tap, mac=f"52:54:00:fa:00:{index + 1:02x}")
        self.nics.append(nic)
        return nic

    # -- questions from the farm's side ----------------------------------------------------
    def socket(self, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket inside the lab namespace."""
        assert self.ns_fd is not None, "the lab network is not started"
        return _in_thread(self.ns_fd, lambda: socket.socket(socket.AF_INET, kind))

    def farm_resolve(self, name: str, timeout: float = 2.0) -> list[str]:
        """Ask the farm's DNS itself (a self-check of the farm, not of the device)."""
        with self.socket() as sock:
            sock.settimeout(timeout)
            txid, query = _dns_query(name)
            sock.sendto(query, (FARM, 53))
            data, _ = sock.recvfrom(4096)
        return [addr for _n, addr in parse_a_records(data)]

    def ntp_stratum(self, server: str, timeout: float = 2.0) -> int:
        """Ask an NTP server on the lab network for the time; return its stratum (0 if unsynchronised)."""
        with self.socket() as sock:
            sock.settimeout(timeout)
            packet = bytearray(48)
            packet[0] = (0 << 6) | (4 << 3) | 3  # no leap warning, version 4, client
            sock.sendto(bytes(packet), (server, 123))
            data, _ = sock.recvfrom(512)
        leap, stratum = data[0] >> 6, data[1]
        return 0 if leap == 3 or stratum in (0, 16) else stratum

    def mdns_resolve(self, name: str, timeout: float) -> list[str]:
        """Ask the lab network for ``name`` (e.g. ``<hostname>.local``) over multicast DNS.

        A standard mDNS query, as a second host's resolver sends it: from port 5353 to
        224.0.0.251:5353 out of the bridge, answered by multicast to the same group (or by
        unicast to the farm). Repeated each second; returns the IPv4 addresses answered for
        ``name`` within ``timeout`` seconds (empty: no answer).
        """
        want = name.rstrip(".").lower()
        with self.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", 5353))
            group = socket.inet_aton("224.0.0.251")
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group + socket.inet_aton(FARM))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(FARM))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
            _txid, query = _dns_query(want, txid=0, flags=0)
            deadline = time.monotonic() + timeout
            resend = 0.0
            found: list[str] = []
            while not found:
                now = time.monotonic()
                if now >= deadline:
                    break
                if now >= resend:
                    sock.sendto(query, ("224.0.0.251", 5353))
                    resend = now + 1.0
                sock.settimeout(max(0.05, min(resend, deadline) - now))
                try:
                    data, _ = sock.recvfrom(9000)
                except TimeoutError:
                    continue
                try:
                    if data[2] & 0x80:  # a response, not another host's query
                        found = [addr for n, addr in parse_a_records(data) if n == want]
                except (IndexError, struct.error):
                    continue  # not a DNS message we can read
        return found

    def service_log(self, name: str, lines: int = 40, grep: str = "") -> str:
        """The last lines of a farm service's log (dnsmasq logs each query and DHCP exchange)."""
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        text = [line for line in path.read_text(errors="replace").splitlines() if grep in line]
        return "\n".join(text[-lines:])

    def leases(self) -> str:
        path = self.workdir / "dnsmasq.leases"
        return path.read_text() if path.exists() else ""

    # -- end -------------------------------------------------------------------------------
    def close(self) -> None:
        for proc in self.services.values():
            proc.kill()
        self.services.clear()
        for nic in self.nics:
            try:
                os.close(nic.fd)
            except OSError:
                pass
        self.nics.clear()
        if self.ns_fd is not None:
            os.close(self.ns_fd)
            self.ns_fd = None
        shutil.rmtree(self.workdir, ignore_errors=True)
