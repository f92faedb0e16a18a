"""Warm devices: a device as it was right after its first boot, kept between runs.

A run that boots the session's device saves its disks (with the ``ready`` snapshot: RAM,
disks and firmware variables) here; the next run of the same image on the same profile, with
the same config.json, accelerator and testbed, restores that snapshot instead of booting
(about a second instead of a cold boot). ``--cold`` (or ``TESTBED_COLD=1``) never uses one.

The key covers everything a first boot depends on: the image's sha256, the whole profile, the
config.json testbed wrote into the boot partition (the mode, the farm's key), the accelerator
and testbed's own code. A changed image, profile, mode or testbed is a new key: it is never
served from an old device.

Entries are written as ``.<key>.<owner>.partial`` and renamed to ``<key>`` once complete (the
metadata last), so a run killed in the middle of a save leaves a partial directory that no run
uses and that the next save or purge removes once its owner is gone. The store keeps at most
``limit`` bytes: the least recently used entries go first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed.util import cache_dir

DEFAULT_LIMIT_GIB = 8.0
PARTIAL = ".partial"
META = "meta.json"
_PACKAGE = Path(__file__).resolve().parent
_version: str | None = None


def testbed_version() -> str:
    """A digest of testbed's own code (every module of the package): a changed testbed is a
    new key even where its version number did not change."""
    global _version
    if _version is None:
        digest = hashlib.sha256()
        for path in sorted(_PACKAGE.rglob("*.py")):
            digest.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
        _version = digest.hexdigest()[:16]
    return _version


def warm_key(*, image_sha256: str, profile: dict[str, Any], config: dict[str, Any], accel: str) -> str:
    """The key of a warm device: everything its first boot depended on."""
    material = {"image": image_sha256, "profile": profile, "config": config, "accel": accel,
                "testbed": testbed_version()}  # fmt: skip
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _owner_tag() -> str:
    """This process as an owner that cannot be mistaken for a later process with the same PID."""
    return f"{os.getpid()}-{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(tag: str) -> bool:
    pid, _, start = tag.partition("-")
    return pid.isdigit() and _start_time(int(pid)) == start != ""


@dataclass(frozen=True)
class WarmDevice:
    """One complete entry: its directory (the machine's disk files and ``meta.json``)."""

    path: Path
    meta: dict[str, Any]

    @property
    def created(self) -> str:
        return str(self.meta.get("created", ""))

    def file(self, name: str) -> Path:
        return self.path / name


class WarmStore:
    def __init__(self, root: Path | None = None, limit_bytes: int | None = None) -> None:
        self.root = root or Path(os.environ.get("TESTBED_WARM_DIR") or cache_dir() / "warm")
        if limit_bytes is None:
            limit_bytes = int(float(os.environ.get("TESTBED_WARM_LIMIT_GIB", DEFAULT_LIMIT_GIB)) * (1 << 30))
        self.limit_bytes = limit_bytes

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One run at a time copies into, out of or purges the store."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def entries(self) -> list[WarmDevice]:
        """Complete entries, least recently used first."""
        found = []
        for path in self.root.glob("*"):
            if path.name.startswith(".") or not (path / META).is_file():
                continue
            try:
                found.append(WarmDevice(path, json.loads((path / META).read_text())))
            except (OSError, ValueError):
                continue  # unreadable: not an entry anyone can use; purged by size like the rest
        return sorted(found, key=lambda e: (e.path / META).stat().st_mtime)

    def take(self, key: str, into: dict[str, Path]) -> WarmDevice | None:
        """Copy entry ``key``'s files to ``into`` (name -> destination); None if there is none."""
        with self._locked():
            path = self.root / key
            if not (path / META).is_file():
                return None
            entry = WarmDevice(path, json.loads((path / META).read_text()))
            for name, destination in into.items():
                shutil.copyfile(entry.file(name), destination)
            os.utime(path / META)  # most recently used
            return entry

    def save(self, key: str, files: dict[str, Path], meta: dict[str, Any]) -> WarmDevice | None:
        """Keep ``files`` (name -> source) and ``meta`` as entry ``key``; then purge to the limit.
        An entry that exists already is kept as it is (another run saved it first)."""
        if self.limit_bytes <= 0:
            return None
        with self._locked():
            self._sweep()
            final = self.root / key
            if (final / META).is_file():
                return WarmDevice(final, json.loads((final / META).read_text()))
            partial = self.root / f".{key}.{_owner_tag()}{PARTIAL}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            try:
                for name, source in files.items():
                    shutil.copyfile(source, partial / name)
                    _fsync(partial / name)
                record = {**meta, "key": key, "created": datetime.now(UTC).isoformat(timespec="seconds")}
                (partial / META).write_text(json.dumps(record, indent=1, default=str))
                _fsync(partial / META)
                _fsync(partial)
                if final.exists():  # an entry without its metadata: never complete, never used
                    shutil.rmtree(final)
                os.rename(partial, final)
                _fsync(self.root)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            self._purge(keep=key)
            return WarmDevice(final, record)

    def _sweep(self) -> None:
        """Remove partial saves whose owner is gone (a run killed while saving)."""
        for path in self.root.glob(f".*{PARTIAL}"):
            tag = path.name[: -len(PARTIAL)].rsplit(".", 1)[-1]
            if not _owner_alive(tag):
                shutil.rmtree(path, ignore_errors=True)

    def _purge(self, keep: str = "") -> None:
        entries = self.entries()
        sizes = {e.path: _size(e.path) for e in entries}
        total = sum(sizes.values())
        for entry in entries:
            if total <= self.limit_bytes:
                break
            if entry.path.name == keep:
                continue
            trash = entry.path.with_name(f".{entry.path.name}.{_owner_tag()}.trash{PARTIAL}")
            os.rename(entry.path, trash)  # gone for every reader at once, then deleted
            shutil.rmtree(trash, ignore_errors=True)
            total -= sizes[entry.path]

    def purge(self) -> None:
        with self._locked():
            self._sweep()
            self._purge()


def _size(path: Path) -> int:
    """Bytes on disk (qcow2 files are sparse)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def age(entry: WarmDevice) -> str:
    """How old the entry is, for the report's line ("restored from a warm device of ...")."""
    try:
        created = datetime.fromisoformat(entry.created)
    except ValueError:
        return entry.created or "an unknown date"
    minutes = (time.time() - created.timestamp()) / 60
    return f"{entry.created} ({minutes:.0f} min ago)"
