"""A certification plan: a later mode's run takes the verdicts of the mode-independent checks from
the first mode's report (``--inherit``) instead of running them again, and its own report is
still complete: every check, the inherited ones marked with a link to their evidence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_plugin import _isolated, write_image  # noqa: F401 - _isolated is an autouse fixture

pytest_plugins = ["pytester"]

# What every check file here starts with: each check notes in $RAN that it ran.
PREAMBLE = """
    import os
    import signal
    import pytest
    from testbed.errors import InfraError

    def _ran(name):
        with open(os.environ["RAN"], "a") as f:
            f.write(name + "\\n")
"""

CHECKS = PREAMBLE + """

    @pytest.mark.mode_independent
    def test_same_in_every_mode(image_under_test):
        _ran("same")

    @pytest.mark.mode_independent
    def test_same_and_failing(image_under_test):
        _ran("failing")
        assert False, "the layout is wrong"

    @pytest.mark.mode_independent
    def test_same_but_the_lab_failed(image_under_test):
        _ran("lab")
        if os.environ.get("LAB_BROKEN"):
            raise InfraError("the lab was down")

    def test_depends_on_the_mode(image_under_test):
        _ran("mode")
"""


# The plugin tests' tiny raw image and isolation (cache in the test's directory, the plugin
# loaded through its entry point, no CI=true).
_image = write_image


def _run(pytester: pytest.Pytester, reports: str, *args: str, lab_broken: bool = False) -> tuple[int, list[str]]:
    ran = pytester.path / f"ran-{reports}.txt"
    os.environ["RAN"] = str(ran)
    if lab_broken:
        os.environ["LAB_BROKEN"] = "1"
    try:
        result = pytester.runpytest_subprocess(
            "--image", str(_image(pytester.path / "disk.img")), "--report-dir", str(pytester.path / reports),
            "-p", "no:cacheprovider", *args, timeout=60,
        )  # fmt: skip
    finally:
        os.environ.pop("LAB_BROKEN", None)
    return int(result.ret), (ran.read_text().split() if ran.exists() else [])


def _report(pytester: pytest.Pytester, reports: str) -> tuple[Path, dict[str, Any]]:
    (path,) = [p for p in (pytester.path / reports).glob("*/*/report.json") if p.parent.name != "latest"]
    return path, json.loads(path.read_text())


def test_a_later_mode_inherits_the_mode_independent_verdicts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_checks=textwrap.dedent(CHECKS))
    code, ran = _run(pytester, "first", "--mode", "development", lab_broken=True)
    assert code == 1 and sorted(ran) == ["failing", "lab", "mode", "same"]
    first_path, first = _report(pytester, "first")
    assert first["facts"]["mode"] == "development"

    code, ran = _run(pytester, "later", "--mode", "production", "--inherit", str(first_path))
    # Only the mode-dependent check runs again, and the one whose first run was a lab fault.
    assert sorted(ran) == ["lab", "mode"]
    assert code == 1, "an inherited failure is this mode's failure too"
    later_path, later = _report(pytester, "later")
    tests = {t["nodeid"].rsplit("::", 1)[1]: t for t in later["tests"]}
    assert sorted(tests) == ["test_depends_on_the_mode", "test_same_and_failing", "test_same_but_the_lab_failed",
                             "test_same_in_every_mode"]  # fmt: skip
    assert later["counts"] == {"passed": 3, "failed": 1, "error": 0, "skipped": 0}
    assert tests["test_same_and_failing"]["outcome"] == "failed"
    assert "the layout is wrong" in tests["test_same_and_failing"]["message"]
    for name in ("test_same_in_every_mode", "test_same_and_failing"):
        inherited = tests[name]["inherited"]
        assert inherited["mode"] == "development" and inherited["run_id"] == first["run_id"]
        assert (later_path.parent / inherited["report"]).resolve() == first_path.resolve()
        assert tests[name]["evidence"] == []  # it is in the first run's report
    assert not tests["test_same_but_the_lab_failed"]["inherited"]
    assert not tests["test_depends_on_the_mode"]["inherited"]

    html = (later_path.parent / "report.html").read_text()
    link = os.path.relpath(first_path.parent / "report.html", later_path.parent)
    assert f'href="{link}"' in html and "Inherited" in html


@pytest.mark.parametrize("content", [None, "not json", '{"tests": 3}'])
def test_an_unusable_inherit_report_is_one_line_and_exit_4(pytester: pytest.Pytester, content: str | None) -> None:
    pytester.makepyfile(test_checks=textwrap.dedent(CHECKS))
    source = pytester.path / "first.json"
    if content is not None:
        source.write_text(content)
    result = pytester.runpytest_subprocess(
        "--image", str(_image(pytester.path / "disk.img")), "--report-dir", str(pytester.path / "r"),
        "--inherit", str(source), timeout=60,
    )  # fmt: skip
    assert result.ret == 4
    lines = [line for line in result.errlines + result.outlines if "--inherit" in line]
    assert len(lines) == 1 and "first mode" in lines[0], lines
    assert "Traceback" not in "\n".join(result.errlines + result.outlines)


# Two modes side by side, as certify runs them: the first mode's check waits (a FIFO) until the
# later mode's own check has run, so the later run can only have the first's verdicts by
# waiting for it to end.
SIDE_BY_SIDE = PREAMBLE + """

    @pytest.mark.mode_independent
    def test_same_in_every_mode(image_under_test):
        _ran("same")

    @pytest.mark.mode_independent
    def test_same_but_the_lab_failed(image_under_test):
        _ran("lab")
        if os.environ.get("FIRST"):
            raise InfraError("the lab was down")

    def test_depends_on_the_mode(image_under_test):
        _ran("mode")
        if os.environ.get("FIRST"):
            with open(os.environ["FIFO"]) as fifo:  # until the later run's own check writes
                assert fifo.read() == "the later mode ran"
            if os.environ.get("DIE"):
                os.kill(os.getpid(), signal.SIGKILL)
        else:
            with open(os.environ["FIFO"], "w") as fifo:
                fifo.write("the later mode ran")
"""


def _side_by_side(pytester: pytest.Pytester, die: bool) -> tuple[int, list[str], list[str], str, Path]:
    from test_plugin import DEVICE

    from testbed import plan

    pytester.makepyfile(test_checks=textwrap.dedent(SIDE_BY_SIDE))
    fifo = pytester.path / "fifo"
    os.mkfifo(fifo)
    disk = str(_image(pytester.path / "disk.img"))
    reports = pytester.path / "reports"
    first_dir = reports / DEVICE / "first-run"
    base = [sys.executable, "-m", "pytest", "--image", disk, "--report-dir", str(reports), "-p", "no:cacheprovider"]
    env = {**os.environ, "FIFO": str(fifo)}
    held = plan.hold_run(first_dir)  # what certify does before it starts the first mode
    try:
        first = subprocess.Popen(
            [*base, "--mode", "development", "--run-id", "first-run"], cwd=pytester.path, pass_fds=(held,),
            env={**env, "FIRST": "1", "RAN": str(pytester.path / "ran-first"), **({"DIE": "1"} if die else {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        os.close(held)
    later = subprocess.run(
        [*base, "--mode", "production", "--run-id", "later-run", "--inherit", str(first_dir / "report.json"),
         "--inherit-wait"],
        cwd=pytester.path, env={**env, "RAN": str(pytester.path / "ran-later")}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert first.wait(timeout=60) == (-9 if die else 75)
    ran_first = (pytester.path / "ran-first").read_text().split()
    ran_later = (pytester.path / "ran-later").read_text().split()
    return later.returncode, ran_first, ran_later, later.stdout, reports / DEVICE / "later-run" / "report.json"


def test_side_by_side_a_later_mode_waits_for_the_first_and_inherits(pytester: pytest.Pytester) -> None:
    code, ran_first, ran_later, out, report_path = _side_by_side(pytester, die=False)
    assert sorted(ran_first) == ["lab", "mode", "same"]
    # Its own check first (while the first run still ran), then the one the first run could not
    # give a verdict for (a lab fault there); the other is inherited.
    assert ran_later == ["mode", "lab"], out
    assert code == 0, out
    assert "waiting for the first mode's run to end" in out and "1 verdicts inherited" in out
    tests = {t["nodeid"].rsplit("::", 1)[1]: t for t in json.loads(report_path.read_text())["tests"]}
    assert tests["test_same_in_every_mode"]["inherited"]["run_id"] == "first-run"
    assert tests["test_same_in_every_mode"]["outcome"] == "passed"
    assert not tests["test_same_but_the_lab_failed"]["inherited"]
    assert tests["test_same_but_the_lab_failed"]["outcome"] == "passed"


def test_side_by_side_a_first_mode_killed_leaves_its_checks_to_the_later(pytester: pytest.Pytester) -> None:
    code, ran_first, ran_later, out, report_path = _side_by_side(pytester, die=True)
    assert sorted(ran_first) == ["lab", "mode", "same"]
    assert ran_later == ["mode", "same", "lab"], out
    assert "wrote no report" in out and code == 0, out
    tests = json.loads(report_path.read_text())["tests"]
    assert len(tests) == 3 and not any(t["inherited"] for t in tests)
