"""The plugin's hooks, end to end and without QEMU: exit codes, report.json, junit.xml, ``latest``.

Each test writes a small test module into a pytester directory, runs pytest on it in a
subprocess (the exit code is the process's, as CI sees it) with ``--report-dir`` and a tiny
raw ``--image``, and reads what the run left. The checks use only the offline fixtures
(``image_under_test``, ``offline_evidence``), so nothing is booted.

The contract pinned here: exit 0 passed; 1 the device failed a check (or a test has a bug);
4 bad input; 75 a lab fault. In a run with several outcomes, 4 wins over 1, 1 over 75, 75 over 0.
"""

from __future__ import annotations

import hashlib
import json
import struct
import textwrap
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import testbed

pytest_plugins = ["pytester"]

DEVICE = "qemu-x86_64"  # the default profile
PROFILES = Path(__file__).resolve().parent.parent / "device_profiles"


# -- helpers --------------------------------------------------------------------------------
def write_image(path: Path, mib: int = 4) -> Path:
    """A raw disk of zeros with an MBR holding one Linux partition: enough for ``image_format``."""
    data = bytearray(mib << 20)
    sectors = len(data) // 512
    # status, CHS (unused), type 0x83, CHS (unused), first LBA, number of sectors
    struct.pack_into("<B3sB3sII", data, 446, 0x00, b"\0\0\0", 0x83, b"\0\0\0", 2048, sectors - 2048)
    data[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(autouse=True)
def _isolated(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sha256 cache goes to the test's directory; the plugin loads through its entry point.
    monkeypatch.setenv("TESTBED_CACHE", str(pytester.path / "cache"))
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("CI", raising=False)


@pytest.fixture
def image(pytester: pytest.Pytester) -> Path:
    return write_image(pytester.path / "disk.img")


def run_checks(pytester: pytest.Pytester, source: str, *args: str, image: Path | str | None = None) -> pytest.RunResult:
    """Write ``source`` as test_checks.py and run pytest on it with ``--report-dir reports`` (and ``--image``)."""
    pytester.makepyfile(test_checks=textwrap.dedent(source))
    options = ["--report-dir", str(pytester.path / "reports"), "-p", "no:cacheprovider"]
    if image is not None:
        options += ["--image", str(image)]
    return pytester.runpytest_subprocess(*options, *args, timeout=60)


def run_dir_of(pytester: pytest.Pytester) -> Path:
    """The one run directory the run wrote, under reports/<device>/."""
    runs = [p for p in (pytester.path / "reports" / DEVICE).iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(runs) == 1, runs
    return runs[0]


def load_report(pytester: pytest.Pytester) -> dict[str, Any]:
    """The report.json of the run's one run directory."""
    return json.loads((run_dir_of(pytester) / "report.json").read_text())


def load_junit(pytester: pytest.Pytester) -> ET.Element:
    return ET.parse(run_dir_of(pytester) / "junit.xml").getroot()


def record_of(report: dict[str, Any], name: str) -> dict[str, Any]:
    (record,) = [t for t in report["tests"] if t["nodeid"].endswith("::" + name)]
    return record


def case_of(junit: ET.Element, name: str) -> ET.Element:
    (case,) = [c for c in junit.iter("testcase") if c.get("name") == name]
    return case


def verdict_children(case: ET.Element) -> list[str]:
    return [child.tag for child in case if child.tag in ("failure", "error", "skipped")]


def output(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


# -- a passing check ----------------------------------------------------------------------------
PASSING = """
    def test_reads_image(image_under_test, offline_evidence):
        offline_evidence("what", "output")
        assert image_under_test.format == "raw"
"""


def test_passing_check(pytester: pytest.Pytester, image: Path) -> None:
    result = run_checks(pytester, PASSING, image=image)

    assert result.ret == 0, output(result)
    sha256 = hashlib.sha256(image.read_bytes()).hexdigest()
    report = load_report(pytester)
    assert report["device"] == DEVICE
    assert report["result"] == "passed"
    assert report["counts"] == {"passed": 1, "failed": 0, "error": 0, "skipped": 0}
    assert report["image"] == {"path": str(image), "sha256": sha256, "format": "raw"}
    assert report["testbed"]["version"] == testbed.__version__
    record = record_of(report, "test_reads_image")
    assert record["outcome"] == "passed"
    (evidence,) = record["evidence"]
    assert evidence["transport"] == "offline"
    assert evidence["command"] == "what"
    assert evidence["exit_code"] == 0
    assert evidence["stdout"] == "output"
    datetime.fromisoformat(evidence["started"])
    assert isinstance(evidence["duration_s"], int | float) and evidence["duration_s"] >= 0

    junit = load_junit(pytester)
    case = case_of(junit, "test_reads_image")
    assert verdict_children(case) == []
    system_out = case.findtext("system-out") or ""
    assert "what" in system_out and "output" in system_out
    props = {p.get("name"): p.get("value") for p in junit.iter("property")}
    assert props["device"] == DEVICE
    assert props["image"] == str(image)
    assert props["image_sha256"] == sha256
    assert props["testbed_version"] == testbed.__version__

    run_dir = run_dir_of(pytester)
    latest = run_dir.parent / "latest"
    assert latest.is_symlink()
    assert latest.resolve() == run_dir.resolve()
    assert "test_reads_image" in (run_dir / "report.html").read_text()

    assert report["schema"] == 2  # last: today's schema 1 must not hide the checks above


# -- failures and errors, one kind at a time ----------------------------------------------
@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("raise DutError('the device said no')", "dut"),
        ("assert 1 == 2, 'the device said no'", "assertion"),
        ("import pytest; pytest.fail('the device said no', pytrace=False)", "assertion"),
    ],
    ids=["DutError", "assert", "pytest.fail"],
)
def test_device_failure_is_exit_1(pytester: pytest.Pytester, image: Path, body: str, kind: str) -> None:
    result = run_checks(
        pytester,
        f"""
        from testbed.errors import DutError

        def test_check(image_under_test):
            {body}
        """,
        image=image,
    )

    assert result.ret == 1, output(result)
    report = load_report(pytester)
    assert report["result"] == "failed"
    assert report["counts"]["failed"] == 1
    record = record_of(report, "test_check")
    assert (record["outcome"], record["kind"]) == ("failed", kind)
    assert "the device said no" in record["message"]
    assert verdict_children(case_of(load_junit(pytester), "test_check")) == ["failure"]


def test_infra_error_is_exit_75(pytester: pytest.Pytester, image: Path) -> None:
    result = run_checks(
        pytester,
        """
        from testbed.errors import InfraError

        def test_check(image_under_test):
            raise InfraError("QEMU died")
        """,
        image=image,
    )

    assert result.ret == 75, output(result)
    report = load_report(pytester)
    assert report["result"] == "error"
    assert report["counts"]["error"] == 1
    record = record_of(report, "test_check")
    assert (record["outcome"], record["kind"]) == ("error", "infra")
    assert "QEMU died" in record["message"]
    case = case_of(load_junit(pytester), "test_check")
    assert verdict_children(case) == ["error"]
    assert case.find("error").get("type") == "infra"


def test_config_error_in_a_check_is_exit_4(pytester: pytest.Pytester, image: Path) -> None:
    result = run_checks(
        pytester,
        """
        from testbed.errors import ConfigError

        def test_check(image_under_test):
            raise ConfigError("the profile expects a partition the image cannot have")
        """,
        image=image,
    )

    assert result.ret == 4, output(result)
    record = record_of(load_report(pytester), "test_check")
    assert (record["outcome"], record["kind"]) == ("error", "config")
    case = case_of(load_junit(pytester), "test_check")
    assert verdict_children(case) == ["error"]
    assert case.find("error").get("type") == "config"


def test_bug_in_a_check_is_exit_1_not_a_lab_fault(pytester: pytest.Pytester, image: Path) -> None:
    result = run_checks(
        pytester,
        """
        def test_check(image_under_test):
            raise TypeError("a bug in the test")  # e.g. a wrong argument
        """,
        image=image,
    )

    assert result.ret == 1, output(result)
    report = load_report(pytester)
    record = record_of(report, "test_check")
    assert (record["outcome"], record["kind"]) == ("error", "test")
    assert report["counts"]["error"] == 1
    case = case_of(load_junit(pytester), "test_check")
    assert verdict_children(case) == ["error"]
    assert case.find("error").get("type") == "test"


CHECKS = {
    "config": "raise ConfigError('bad profile')",
    "failed": "raise DutError('device failed')",
    "infra": "raise InfraError('lab failed')",
    "passed": "pass",
}


@pytest.mark.parametrize(
    ("checks", "exit_code"),
    [
        (["config", "failed", "infra", "passed"], 4),
        (["failed", "infra", "passed"], 1),
        (["infra", "passed"], 75),
    ],
)
def test_exit_code_precedence(pytester: pytest.Pytester, image: Path, checks: list[str], exit_code: int) -> None:
    source = "from testbed.errors import ConfigError, DutError, InfraError\n"
    for name in checks:
        source += f"\ndef test_{name}(image_under_test):\n    {CHECKS[name]}\n"
    result = run_checks(pytester, source, image=image)

    assert result.ret == exit_code, output(result)
    outcomes = {t["nodeid"].rpartition("::")[2]: t["outcome"] for t in load_report(pytester)["tests"]}
    expected = {"config": "error", "failed": "failed", "infra": "error", "passed": "passed"}
    assert outcomes == {f"test_{name}": expected[name] for name in checks}


def test_infra_error_in_fixture_setup_is_exit_75(pytester: pytest.Pytester, image: Path) -> None:
    result = run_checks(
        pytester,
        """
        import pytest
        from testbed.errors import InfraError

        @pytest.fixture(scope="session")
        def lab(image_under_test):
            raise InfraError("the relay does not answer")

        def test_one(lab):
            pass

        def test_two(lab):
            pass
        """,
        image=image,
    )

    assert result.ret == 75, output(result)
    report = load_report(pytester)
    assert report["result"] == "error"
    for name in ("test_one", "test_two"):
        record = record_of(report, name)
        assert (record["outcome"], record["kind"]) == ("error", "infra"), name
        assert "the relay does not answer" in record["message"]
        case = case_of(load_junit(pytester), name)
        assert verdict_children(case) == ["error"]
        assert case.find("error").get("type") == "infra"


def test_skipped_check(pytester: pytest.Pytester, image: Path) -> None:
    result = run_checks(
        pytester,
        """
        import pytest

        def test_passes(image_under_test):
            pass

        def test_skips(image_under_test):
            pytest.skip("needs a second board")
        """,
        image=image,
    )

    assert result.ret == 0, output(result)
    report = load_report(pytester)
    assert report["result"] == "passed"
    assert report["counts"] == {"passed": 1, "failed": 0, "error": 0, "skipped": 1}
    assert record_of(report, "test_skips")["outcome"] == "skipped"
    junit = load_junit(pytester)
    assert verdict_children(case_of(junit, "test_skips")) == ["skipped"]
    assert "needs a second board" in case_of(junit, "test_skips").find("skipped").get("message")
    assert verdict_children(case_of(junit, "test_passes")) == []


# -- bad input: one line, no traceback, exit 4, no report -----------------------------------------
def assert_usage_error(pytester: pytest.Pytester, result: pytest.RunResult, *named: str) -> None:
    text = output(result)
    assert result.ret == 4, text
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if all(n in line for n in named)]
    assert len(lines) == 1, text
    assert not (pytester.path / "reports").exists()


def test_unknown_device_is_exit_4(pytester: pytest.Pytester, image: Path) -> None:
    result = run_checks(pytester, PASSING, "--device", "no-such-device", image=image)
    assert_usage_error(pytester, result, "no-such-device")


def test_missing_image_is_exit_4(pytester: pytest.Pytester) -> None:
    result = run_checks(pytester, PASSING, image="/no/such/file.img")
    assert_usage_error(pytester, result, "/no/such/file.img")


def test_misspelled_profile_key_is_exit_4(pytester: pytest.Pytester, image: Path) -> None:
    text = (PROFILES / f"{DEVICE}.yaml").read_text()
    assert "  memory_mib:" in text
    profile = pytester.path / "profiles" / f"{DEVICE}.yaml"
    profile.parent.mkdir()
    profile.write_text(text.replace("  memory_mib:", "  memroy_mib:"))

    result = run_checks(pytester, PASSING, "--device", str(profile), image=image)
    assert_usage_error(pytester, result, str(profile), "memroy_mib")


# -- no run opened: no report ----------------------------------------------------------------------
def test_run_without_testbed_fixtures_writes_no_report(pytester: pytest.Pytester, image: Path) -> None:
    result = run_checks(
        pytester,
        """
        def test_plain():
            assert False
        """,
        image=image,
    )

    assert result.ret == 1, output(result)  # as pytest would: a failed test, no testbed verdict
    assert not (pytester.path / "reports").exists()


def test_keep_on_failure_is_refused_under_ci(
    pytester: pytest.Pytester, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that would wait for a person must not hang a CI job."""
    monkeypatch.setenv("CI", "true")
    result = run_checks(pytester, PASSING, "--keep-on-failure", image=image)
    assert_usage_error(pytester, result, "--keep-on-failure", "CI=true")


def test_config_error_in_setup_is_said_once_and_ends_the_run(pytester: pytest.Pytester, image: Path) -> None:
    """A ConfigError while a check is set up (a fixture: a driver's missing package, a bundle
    that is not there) is the user's to fix: one line, exit 4, no check after it runs."""
    result = run_checks(
        pytester,
        """
        import pytest
        from testbed.errors import ConfigError

        @pytest.fixture(scope="session")
        def relay(image_under_test):
            raise ConfigError("power driver 'hid-relay' needs the 'hidapi' Python package: pip install hidapi")

        def test_one(relay):
            pass

        def test_two(relay):
            pass
        """,
        image=image,
    )

    text = output(result)
    assert result.ret == 4, text
    assert "Traceback" not in text
    assert [line for line in text.splitlines() if "hidapi" in line] == [
        "ERROR: power driver 'hid-relay' needs the 'hidapi' Python package: pip install hidapi"
    ], text
    record = record_of(load_report(pytester), "test_one")
    assert (record["outcome"], record["kind"]) == ("error", "config")


def test_an_error_in_a_checks_call_is_an_error_in_pytests_own_counts(pytester: pytest.Pytester, image: Path) -> None:
    """pytest's last line says what report.json says: a lab fault (or a bug in a check) raised
    while the check ran is an error, not a failure."""
    result = run_checks(
        pytester,
        """
        from testbed.errors import DutError, InfraError

        def test_lab(image_under_test):
            raise InfraError("QEMU exited (code -9)")

        def test_bug(image_under_test):
            raise TypeError("a bug in the check")

        def test_device(image_under_test):
            raise DutError("the device said no")

        def test_fine(image_under_test):
            pass
        """,
        image=image,
    )

    assert result.ret == 1, output(result)
    assert load_report(pytester)["counts"] == {"passed": 1, "failed": 1, "error": 2, "skipped": 0}
    result.assert_outcomes(passed=1, failed=1, errors=2)
    assert "ERROR test_checks.py::test_lab - " in output(result)
