"""Other architectures and layouts on real QEMU: the aarch64 reference image on the virt machine, and
the reference image with a Raspberry Pi's MBR layout. Each runs the smoke and layout suites as a
user starts them (pytest in a subprocess); the reference images are built on demand (cached)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import image as img
from testbed import reference
from tests.conftest import require_tools

REPO = Path(__file__).resolve().parent.parent


def _run(device: str, reports: Path, *suites: str, timeout: float = 2400) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *suites, "--device", device, "--report-dir", str(reports), "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    return json.loads((reports / device / "latest" / "report.json").read_text())


@pytest.mark.qemu
def test_the_aarch64_reference_image_passes_smoke_and_layout_on_qemu_virt(qemu_tools: None, tmp_path: Path) -> None:
    require_tools("qemu-system-aarch64", "qemu-aarch64-static", "arch-test")
    image = reference.build(reference.BuildOptions(arch="aarch64"))
    manifest = json.loads((image.parent / "manifest.json").read_text())
    assert manifest["architecture"] == "arm64" and image.name == "testbed-ref-aarch64.img"
    report = _run("qemu-aarch64", tmp_path / "reports", "suites/smoke", "suites/layout")
    assert report["result"] == "passed" and report["image"]["path"] == str(image)
    facts = report["facts"]
    assert facts["accelerator"] == "tcg" and "foreign architecture" in facts.get("accelerator_note", "")
    assert facts["slug"] == "generic-aarch64" and facts["kernel"].endswith("-arm64")
    # One boot from power on to SSH (an arm64 kernel's EFI stub is not a reboot of its own).
    boots = report["timings"]["boots"]
    assert [b["kind"] for b in boots] == ["cold"] and boots[0]["ended_by"] == "ssh ready"
    assert report["timings"]["boot_to_ssh_s"] == boots[0]["ssh_ready_s"]


@pytest.mark.qemu
def test_the_mbr_reference_image_passes_smoke_and_layout_offline_and_booted(qemu_tools: None, tmp_path: Path) -> None:
    image = reference.build(reference.BuildOptions(table="mbr"))
    layout = img.read_layout(image)
    assert layout.table == "dos"
    numbers = {p.label: p.index for p in layout.partitions if p.label}
    assert numbers == {"resin-boot": 1, "resin-rootA": 2, "resin-rootB": 3, "resin-state": 5, "resin-data": 6}
    report = _run("qemu-x86_64-mbr", tmp_path / "reports", "suites/smoke", "suites/layout")
    assert report["result"] == "passed" and report["image"]["path"] == str(image)
    assert report["facts"]["partition_table"] == "dos"
