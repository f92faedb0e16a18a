"""A tool the image lacks is named by the check that needed it, from what the device's shell said."""

from __future__ import annotations

import pytest

from testbed.console import CommandResult
from testbed.dut import missing_tool


def _result(stderr: str, exit_code: int = 127) -> CommandResult:
    return CommandResult(command="jq -r .hostname /mnt/boot/config.json", exit_code=exit_code, stdout="",
                         stderr=stderr, started="", duration_s=0.01, transport="ssh")  # fmt: skip


@pytest.mark.parametrize(
    ("stderr", "tool"),
    [
        ("bash: line 1: jq: command not found\n", "jq"),  # bash -c, as sshd runs a command
        ("bash: findmnt: command not found\n", "findmnt"),  # interactive bash
        ("sh: 1: dumpe2fs: not found\n", "dumpe2fs"),  # dash
        ("some output\nbash: line 3: chattr: command not found\n", "chattr"),  # later in a script
        ("/bin/sh: 2: e2fsck.static: not found\n", "e2fsck.static"),
    ],
)
def test_the_missing_tool_is_named(stderr: str, tool: str) -> None:
    assert missing_tool(_result(stderr)) == tool


@pytest.mark.parametrize(
    "stderr",
    [
        "",
        "cat: /etc/nothing: No such file or directory\n",
        "grep: not found in pattern\n",
        "systemctl: unit not found\n",
        "Unit foo.service could not be found.\n",
    ],
)
def test_other_errors_are_not_a_missing_tool(stderr: str) -> None:
    assert missing_tool(_result(stderr, exit_code=1)) is None
