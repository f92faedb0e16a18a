"""Warm devices on QEMU: a second run of the same image restores the first run's device instead of
booting it, with the first boot's console and timeline in its report; a changed image or mode is
never served from it (a defect image boots cold and fails)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed import image as img
from testbed import reference

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("qemu_tools")


def _smoke(tmp_path: Path, name: str, image: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    reports = tmp_path / name
    env = {**os.environ, "TESTBED_WARM_DIR": str(tmp_path / "warm"), "TESTBED_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "suites/smoke", "--warm", "--image", str(image),
         "--report-dir", str(reports), *extra],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    (path,) = [p for p in reports.glob("*/*/report.json") if p.parent.name != "latest"]
    return done.returncode, json.loads(path.read_text()), (path.parent / "console.log").read_text()


def test_a_rerun_restores_the_warm_device_and_a_changed_image_boots_cold(tmp_path: Path) -> None:
    good = reference.build()
    code, first, _ = _smoke(tmp_path, "first", good)
    assert code == 0 and "warm_device" not in first["facts"], first["facts"]
    assert [b["kind"] for b in first["timings"]["boots"]][:1] == ["cold"]
    assert len([p for p in (tmp_path / "warm").iterdir() if not p.name.startswith(".")]) == 1

    code, again, console = _smoke(tmp_path, "again", good)
    assert code == 0, again["tests"]
    assert again["facts"]["warm_device"]["key"] == next(
        p.name for p in (tmp_path / "warm").iterdir() if not p.name.startswith(".")
    )
    kinds = [(b["kind"], bool(b.get("from_warm_device"))) for b in again["timings"]["boots"]]
    assert kinds == [("cold", True), ("restore", False)], kinds  # the first run's boot, then this run's restore
    assert "first boot, from the warm device of" in console and "Linux version" in console

    # The same image in another mode: another config.json, another key, a cold boot.
    code, production, _ = _smoke(tmp_path, "production", good, "--mode", "production")
    assert code == 0 and "warm_device" not in production["facts"]

    # A defect copy (no /usr/lib/os-release) is another image: it boots cold and fails.
    defect = tmp_path / "defect.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(good), str(defect)], check=True)
    img.edit_ext4_in_overlay(defect, img.read_layout(defect).by_label("resin-rootA"), {"/usr/lib/os-release": None})
    code, bad, _ = _smoke(tmp_path, "defect", defect)
    assert "warm_device" not in bad["facts"] and bad["timings"]["boots"][0]["kind"] == "cold"
    outcomes = {t["nodeid"].rsplit("::", 1)[1]: t["outcome"] for t in bad["tests"]}
    assert code == 1 and outcomes["test_os_release_is_there"] == "failed", outcomes
