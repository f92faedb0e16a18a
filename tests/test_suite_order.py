"""The order the suites' checks run in (testbed/schedule.py): checks that need no device, then
those on ``configured``, then those on the session's ``dut``, then the reboot round; and the
round starts at the first check on ``dut`` only when all three kinds are in the run."""

from __future__ import annotations

import pytest

from testbed import schedule


class Item:
    """What the ordering reads of a collected check: its fixtures, its markers, its stash."""

    def __init__(self, name: str, fixtures: tuple[str, ...] = (), round_: bool = False) -> None:
        self.name = name
        self.fixturenames = list(fixtures)
        self._round = object() if round_ else None  # the marker: its presence is what counts
        self.stash = pytest.Stash()

    def get_closest_marker(self, name: str):
        return self._round if name == "reboot_round" else None

    def __repr__(self) -> str:
        return self.name


def order(items: list[Item]) -> list[str]:
    schedule.order(items)  # type: ignore[arg-type]
    return [item.name for item in items]


def starting(items: list[Item], fixture: str) -> list[str]:
    """The checks at which ``fixture`` is started before the check asks for it."""
    return [item.name for item in items if fixture in item.stash.get(schedule.START_HERE, ())]


def boots_start(items: list[Item]) -> list[str]:
    """Where both devices start booting (the round's start asks for ``configured`` too, first)."""
    return [name for name in starting(items, "configured") if name not in starts_round(items)]


def starts_round(items: list[Item]) -> list[str]:
    return starting(items, "reboot_round")


def test_groups_run_offline_configured_dut_then_the_round() -> None:
    items = [
        Item("config_before_boot", ("configured", "lab_network")),
        Item("edits_apply", ("reboot_round",), round_=True),
        Item("layout_offline", ("image_under_test",)),
        Item("rootfs_read_only", ("dut",)),
        Item("dns_null", ("fresh_dut", "dut")),
        Item("farm_dns", ("configured", "dut")),
        Item("journal_survives", ("reboot_round",), round_=True),
    ]
    assert order(items) == [
        "layout_offline",
        "config_before_boot",
        "farm_dns",
        "rootfs_read_only",
        "dns_null",
        "edits_apply",
        "journal_survives",
    ]
    # Both devices start booting at the first check on configured; the reboot round starts
    # when the checks on configured are done, before those on dut.
    assert boots_start(items) == ["config_before_boot"]
    assert starting(items, "dut_booting") == ["config_before_boot"]
    assert starts_round(items) == ["rootfs_read_only"]


@pytest.mark.parametrize(
    "names",
    [
        ("dut", "reboot_round"),  # no check on configured: nothing to overlap the reboot with
        ("configured", "reboot_round"),  # no check on dut
        ("configured", "dut"),  # no reboot round
    ],
)
def test_the_round_starts_early_only_beside_checks_on_both_devices(names: tuple[str, ...]) -> None:
    items = [Item(name, (name,), round_=name == "reboot_round") for name in names]
    order(items)
    assert starts_round(items) == []
    # The two boots start together whenever configured and another device are both used.
    assert boots_start(items) == (["configured"] if "configured" in names else [])
    assert starting(items, "dut_booting") == (["configured"] if {"configured", "dut"} <= set(names) else [])


def test_a_suite_with_its_own_device_runs_before_the_early_boots() -> None:
    items = [
        Item("dut_check", ("dut",)),
        Item("hup_update", ("updated",)),
        Item("config_check", ("configured",)),
    ]
    assert order(items) == ["hup_update", "config_check", "dut_check"]
    assert boots_start(items) == ["config_check"]
