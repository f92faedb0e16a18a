"""Shared helpers for the project's own tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


_REPORTS: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    # The project's tests keep their device reports out of the repository's reports/.
    if config.getoption("--report-dir", default="reports") == "reports":
        config.option.report_dir = tempfile.mkdtemp(prefix="testbed-test-reports-")
        _REPORTS.append(Path(config.option.report_dir))


_FAILED: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _FAILED.append(session.testsfailed)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # Kept for a look when a test failed (the terminal names it), else nothing stays in /tmp.
    for path in _REPORTS:
        if not any(_FAILED) or not path.is_dir() or not any(path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)


def require_tools(*tools: str) -> None:
    """Fail (in CI) or skip (elsewhere) when a host tool a test needs is absent.

    With CI=true a missing emulator must turn the run red, never green by skipping.
    """
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    message = f"needs {', '.join(missing)} on PATH (install with ./run, see README)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def qemu_tools() -> None:
    require_tools("qemu-system-x86_64", "qemu-img", "qemu-io", "mmdebstrap", "mcopy")
