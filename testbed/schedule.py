"""The order checks run in, and the devices that start booting before a check needs them.

Declared by what a check uses, handled here only:

- group 0: checks that need no booted device (offline checks of the image first, then the
  suites that boot their own, e.g. the hup suite);
- group 1: checks on the suites' second device (the fixture named ``SECOND_DEVICE``);
- group 2: checks on the session's device (``dut``, ``fresh_dut``, ``dut_booting``);
- group 3: checks marked ``reboot_round`` (they share one reboot; last, so that their changes
  reach no other check).

With checks in both groups 1 and 2, both devices start booting at the first check of group 1
(one boot under TCG leaves part of two host cores idle); with groups 1, 2 and 3, the reboot
round (fixture ``REBOOT_ROUND``) starts at the first check of group 2, so that the second
device reboots while the session's device is checked.
"""

from __future__ import annotations

import pytest

SECOND_DEVICE = "configured"
REBOOT_ROUND = "reboot_round"
SESSION_DEVICE = {"dut", "fresh_dut", "dut_booting"}
DEVICE_FIXTURES = {*SESSION_DEVICE, "dut_factory", "lab_network", SECOND_DEVICE}

# Fixtures to start at a check, before the check itself asks for them.
START_HERE = pytest.StashKey[tuple[str, ...]]()


def group(item: pytest.Item) -> int:
    if item.get_closest_marker("reboot_round") is not None:
        return 3
    names = set(getattr(item, "fixturenames", ()))
    if SECOND_DEVICE in names:
        return 1
    return 2 if names & SESSION_DEVICE else 0


def order(items: list[pytest.Item]) -> None:
    """Sort ``items`` in place by group (offline checks first inside group 0) and mark where
    devices start early."""
    items.sort(key=lambda item: (group(item), bool(DEVICE_FIXTURES & set(getattr(item, "fixturenames", ())))))
    groups = [group(item) for item in items]
    if 1 in groups and (2 in groups or 3 in groups):
        items[groups.index(1)].stash[START_HERE] = (SECOND_DEVICE, "dut_booting") if 2 in groups else (SECOND_DEVICE,)
    if 1 in groups and 2 in groups and 3 in groups:
        # The second device first: where it cannot be made (one board) nothing starts early,
        # and the round stays last, on the session's device.
        items[groups.index(2)].stash[START_HERE] = (SECOND_DEVICE, REBOOT_ROUND)


def start_early(request: pytest.FixtureRequest) -> None:
    """Start the fixtures this check is marked with (see ``order``). A device that cannot be
    made here (one board, no lab network) is not this check's failure: the checks that use it
    meet the reason again themselves; the others run as before."""
    for name in request.node.stash.get(START_HERE, ()):
        try:
            request.getfixturevalue(name)
        except (Exception, pytest.skip.Exception, pytest.fail.Exception):  # noqa: BLE001
            # Whatever stops the early start (a skip, a lab fault, a bug) is reported by the
            # checks that use the fixture, each with its own outcome; not by this one.
            return
