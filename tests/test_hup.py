"""The hup suite on the reference image and its update bundle: a whole run as a user starts it
(pytest in a subprocess), which must pass, with the power-cut trials reported; and the proofs
that its rollback checks fail on defective images (GRUB that never falls back, a health check
that never fires).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import reference
from tests.test_defects import HUP_DEFECTS, check_defect

REPO = Path(__file__).resolve().parent.parent
TRIALS = 2

pytestmark = pytest.mark.usefixtures("qemu_tools")


def test_hup_suite_passes_on_the_reference_image(tmp_path: Path) -> None:
    reference.build()
    bundle = reference.build_bundle()
    reports = tmp_path / "reports"
    env = {**os.environ, "TESTBED_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "suites/hup", "--report-dir", str(reports),
         "--hup-power-cuts", str(TRIALS)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=3000,
    )  # fmt: skip
    assert done.returncode == 0, f"the hup suite failed on the reference image:\n{done.stdout[-4000:]}"
    run_dir = next(reports.glob("*/latest"))
    report = json.loads((run_dir / "report.json").read_text())
    outcomes = {t["nodeid"].rsplit("::", 1)[1]: t["outcome"] for t in report["tests"]}
    assert outcomes == {
        "test_update_runs_the_new_root_and_keeps_data": "passed",
        "test_rollback_when_the_new_root_is_unhealthy": "passed",
        "test_rollback_when_the_new_root_does_not_boot": "passed",
        "test_update_after_a_rollback": "passed",
        "test_power_cuts_never_brick_the_device": "passed",
    }
    cuts = next(t for t in report["tests"] if t["nodeid"].endswith("test_power_cuts_never_brick_the_device"))
    notes = [e["command"] + " -> " + e["stdout"] for e in cuts["evidence"] if e["command"].startswith("power-cut")]
    assert len([n for n in notes if re.match(r"power-cut trial \d+/", n)]) == TRIALS, notes
    summary = next(n for n in notes if n.startswith("power-cut trials:"))
    ended = sum(int(n) for n in re.findall(r"(\d+) ended on resin-root[AB]", summary))
    assert ended == TRIALS, summary
    # The trials ran on a twin of the hup device, with its own console log.
    assert "on qemu-x86_64-hup-cuts" in summary, summary
    assert "power on" in (run_dir / "console-hup-cuts.log").read_text(errors="replace")
    assert bundle.is_file() and oct(bundle.stat().st_mode & 0o777) == "0o444"


@pytest.mark.parametrize("name", list(HUP_DEFECTS))
def test_hup_suite_fails_the_check_that_matches_the_defect(name: str, tmp_path: Path) -> None:
    check_defect(HUP_DEFECTS[name], name, reference.build(), tmp_path)
