"""The warm-device store: entries keyed by everything a first boot depends on, complete or not
there at all (a save killed half-way is never used), and kept within a size limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testbed.warm import WarmStore, warm_key

BASE = {"image_sha256": "a" * 64, "profile": {"name": "qemu-x86_64", "cpus": 2}, "config": {"developmentMode": True},
        "accel": "tcg"}  # fmt: skip


def _files(tmp_path: Path, size: int = 4096) -> dict[str, Path]:
    disk, vars_ = tmp_path / "disk.qcow2", tmp_path / "vars.qcow2"
    disk.write_bytes(os.urandom(size))
    vars_.write_bytes(os.urandom(512))
    return {"disk.qcow2": disk, "vars.qcow2": vars_}


@pytest.mark.parametrize(
    "change",
    [
        {"image_sha256": "b" * 64},
        {"profile": {"name": "qemu-x86_64", "cpus": 1}},
        {"config": {"developmentMode": False}},
        {"config": {"developmentMode": True, "hostname": "other"}},
        {"accel": "kvm"},
    ],
)
def test_what_a_first_boot_depends_on_changes_the_key(change: dict[str, object]) -> None:
    assert warm_key(**{**BASE, **change}) != warm_key(**BASE)  # type: ignore[arg-type]
    assert warm_key(**BASE) == warm_key(**dict(BASE))  # type: ignore[arg-type]


def test_an_entry_is_given_back_as_it_was_saved(tmp_path: Path) -> None:
    store = WarmStore(tmp_path / "warm", limit_bytes=1 << 30)
    files = _files(tmp_path)
    store.save("k1", files, {"first_boot": {"ssh_ready_s": 21.0}})
    out = {name: tmp_path / f"out-{name}" for name in files}
    entry = store.take("k1", out)
    assert entry is not None and entry.meta["first_boot"] == {"ssh_ready_s": 21.0} and entry.created
    assert all(out[n].read_bytes() == files[n].read_bytes() for n in files)
    assert store.take("k2", out) is None


def test_least_recently_used_entries_go_first_beyond_the_limit(tmp_path: Path) -> None:
    store = WarmStore(tmp_path / "warm", limit_bytes=250_000)  # three entries of about 68 KiB on disk fit, four do not
    for key in ("old", "used", "new"):
        store.save(key, _files(tmp_path, 60 * 1024), {})
        os.utime(store.root / key / "meta.json", (1, {"old": 1000, "used": 2000, "new": 3000}[key]))
    store.take("old", {})  # used now: the most recent
    store.save("newest", _files(tmp_path, 60 * 1024), {})
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) == ["new", "newest", "old"]


def test_a_save_killed_half_way_is_never_used_and_is_swept(tmp_path: Path) -> None:
    """kill -9 of a run while it writes a warm device: no later run takes the partial entry, and
    the next save removes it (its owner is gone)."""
    root = tmp_path / "warm"
    files = _files(tmp_path)
    # The real save, held after its first file is on disk until the parent kills it.
    script = textwrap.dedent("""
        import json, sys, testbed.warm as w
        from pathlib import Path
        real = w._fsync
        def held(path):
            real(path)
            print("SAVING", flush=True)
            sys.stdin.read()
        w._fsync = held
        files = {name: Path(path) for name, path in json.loads(sys.argv[2]).items()}
        w.WarmStore(Path(sys.argv[1]), limit_bytes=1 << 30).save("k1", files, {})
    """)
    argv = [sys.executable, "-c", script, str(root), json.dumps({k: str(v) for k, v in files.items()})]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "SAVING"
        partials = [p for p in root.iterdir() if p.name.endswith(".partial")]
        assert partials, f"the save should be under way in a partial directory: {list(root.iterdir())}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    store = WarmStore(root, limit_bytes=1 << 30)
    assert store.take("k1", {}) is None, "a partial entry must never be used"
    assert not store.entries()
    store.save("k2", files, {})
    assert not [p for p in root.iterdir() if p.name.endswith(".partial")], "the dead run's partial must be swept"
    assert store.take("k2", {}) is not None


def test_a_live_runs_partial_is_kept(tmp_path: Path) -> None:
    store = WarmStore(tmp_path / "warm", limit_bytes=1 << 30)
    started = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    live = store.root / f".k1.{os.getpid()}-{started}.partial"
    live.mkdir(parents=True)
    store.save("k2", _files(tmp_path), {})
    assert live.is_dir()
