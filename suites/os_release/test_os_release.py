"""os-release: the keys a device must publish, and SLUG/MACHINE matching the device profile."""

from __future__ import annotations

import shlex

import pytest

from testbed.dut import DUT
from testbed.profile import Profile

# The same in every mode: a certification runs these once (testbed.plan) and its other modes inherit them.
pytestmark = pytest.mark.mode_independent


@pytest.fixture(scope="module")
def os_release(dut: DUT) -> dict[str, str]:
    text = dut.run("cat /etc/os-release", check=True).stdout
    values = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            parts = shlex.split(value) or [""]
            values[key] = parts[0]
    return values


def test_required_keys_are_present(dut: DUT, os_release: dict[str, str], device_profile: Profile) -> None:
    dut.run("cat /etc/os-release")  # evidence for this check
    missing = [k for k in device_profile.os.os_release_keys if not os_release.get(k)]
    assert not missing, f"/etc/os-release lacks (or leaves empty) {missing}; it has {sorted(os_release)}"


def test_slug_and_machine_match_the_profile(dut: DUT, os_release: dict[str, str], device_profile: Profile) -> None:
    dut.run("grep -E '^(SLUG|MACHINE)=' /etc/os-release")
    found = {"SLUG": os_release.get("SLUG"), "MACHINE": os_release.get("MACHINE")}
    expected = {"SLUG": device_profile.os.slug, "MACHINE": device_profile.os.machine}
    assert found == expected, f"expected {expected} in /etc/os-release, found {found}"


def test_version_is_consistent(dut: DUT, os_release: dict[str, str]) -> None:
    dut.run("grep -E '^(VERSION|VERSION_ID|PRETTY_NAME)=' /etc/os-release")
    version_id = os_release.get("VERSION_ID", "")
    assert version_id and version_id in os_release.get("PRETTY_NAME", ""), (
        f"expected PRETTY_NAME to name VERSION_ID {version_id!r}, found {os_release.get('PRETTY_NAME')!r}"
    )


def test_issue_names_the_os(dut: DUT, os_release: dict[str, str]) -> None:
    issue = dut.run("cat /etc/issue", check=True).stdout
    name = os_release.get("NAME", "")
    assert name and name in issue, f"/etc/issue must name the OS ({name!r} from /etc/os-release), it says {issue!r}"
