"""Power through external commands, one per action (a PDU's CLI, a lab script).

Each command is an argv list (run as is) or a string (run with ``sh -c``). A command
that exits non-zero or runs past ``timeout`` seconds is an InfraError that shows its
stderr. Commands get no standard input, so one that prompts fails instead of hanging.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ConfigError, InfraError
from testbed.power.base import DEFAULT_OFF_SECONDS, Switch, check_off_seconds
from testbed.util import OwnedProcess

Command = str | list[str]


def argv_of(command: Command) -> list[str]:
    """The argv a command spec runs: a list as is, a string through ``sh -c``."""
    if isinstance(command, str):
        return ["sh", "-c", command]
    return list(command)


def run_checked(argv: Sequence[str], timeout: float, what: str) -> None:
    """Run ``argv`` to completion within ``timeout`` seconds.

    ``what`` names the action for messages ("power on command"). Raises ConfigError when
    the program does not exist, InfraError when it exits non-zero (with its stderr) or
    runs too long (it is killed).
    """
    if not argv:
        raise ConfigError(f"{what} is empty")
    if shutil.which(argv[0]) is None:
        raise ConfigError(f"{what}: program '{argv[0]}' not found (not on PATH and not an executable path)")
    shown = shlex.join(argv)
    fd, name = tempfile.mkstemp(prefix="testbed-cmd-", suffix=".stderr")
    os.close(fd)
    stderr_path = Path(name)
    try:
        with OwnedProcess(argv, stderr_path=stderr_path) as proc:
            code = proc.wait(timeout)
            if code is None:
                proc.kill()
                tail = proc.stderr_tail()
                raise InfraError(
                    f"{what} timed out after {timeout:g}s and was killed: {shown}"
                    + (f"\nstderr:\n{tail}" if tail else "")
                )
            if code != 0:
                tail = proc.stderr_tail() or "(nothing on stderr)"
                raise InfraError(f"{what} failed with exit code {code}: {shown}\nstderr:\n{tail}")
    finally:
        stderr_path.unlink(missing_ok=True)


@dataclass
class CommandPower(Switch):
    """Power by running commands.

    ``cycle_command`` and ``cut_command`` are optional: without them a cycle is off,
    ``off_seconds``, on, and a cut is the off command.
    """

    on_command: Command
    off_command: Command
    cycle_command: Command | None = None
    cut_command: Command | None = None
    timeout: float = 30.0
    off_seconds: float = DEFAULT_OFF_SECONDS

    def __post_init__(self) -> None:
        for key in ("on_command", "off_command", "cycle_command", "cut_command"):
            value = getattr(self, key)
            if value is not None and not value:
                raise ConfigError(f"{key} is empty; give a command string or an argv list")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")
        check_off_seconds(self.off_seconds)

    def on(self) -> None:
        run_checked(argv_of(self.on_command), self.timeout, "power on command")

    def off(self) -> None:
        run_checked(argv_of(self.off_command), self.timeout, "power off command")

    def cycle(self) -> None:
        if self.cycle_command is None:
            super().cycle()
        else:
            run_checked(argv_of(self.cycle_command), self.timeout, "power cycle command")

    def cut(self) -> None:
        if self.cut_command is None:
            self.off()
        else:
            run_checked(argv_of(self.cut_command), self.timeout, "power cut command")
