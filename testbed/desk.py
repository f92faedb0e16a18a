"""The developer at the desk: a way into a device testbed booted.

``python -m testbed console`` boots a device (QEMU, or a board through its serial port and
power), prints the SSH command that reaches it and attaches its serial console to this
terminal: raw keys, ``Ctrl-]`` to leave, as telnet and labgrid-client users expect; the console
log is still written. The device is powered off and removed when the command ends, also on
Ctrl-C or SIGTERM (its QEMU dies with this process in any case). ``attach`` and
``ssh_command`` are also what ``--keep-on-failure`` offers.
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from testbed import inputs
from testbed.console import Console
from testbed.dut import DUT, open_dut
from testbed.errors import ConfigError, DutError, InfraError
from testbed.report import EXIT_INFRA, EXIT_PASSED, EXIT_USAGE
from testbed.util import cache_dir

ESCAPE = b"\x1d"  # Ctrl-]


def ssh_command(dut: DUT) -> str:
    """The command line that logs in to ``dut`` with the key testbed put in its config.json."""
    host, port = dut.endpoint("ssh")
    key = cache_dir() / "keys" / "id_ed25519"
    return shlex.join(
        [
            "ssh", "-p", str(port), "-i", str(key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", f"{dut.profile.ssh.user}@{host}",
        ]
    )  # fmt: skip


@contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """The terminal in raw mode (every key goes to the device) until the block ends."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def attach(console: Console, stdin: int | None = None, stdout: int | None = None) -> None:
    """Bridge this terminal and the device's serial console until ``Ctrl-]`` (or the console ends)."""
    fd_in = sys.stdin.fileno() if stdin is None else stdin
    fd_out = sys.stdout.fileno() if stdout is None else stdout
    os.write(fd_out, b"\r\n[connected to the serial console; Ctrl-] leaves]\r\n")
    console.drain()  # what was printed before is in the console log
    with _raw_terminal(fd_in):
        while not console.closed:
            ready, _, _ = select.select([fd_in], [], [], 0.05)
            out = console.read_available()
            if out:
                os.write(fd_out, out)
            if fd_in in ready:
                keys = os.read(fd_in, 1024)
                if not keys or ESCAPE in keys:
                    before = keys.split(ESCAPE, 1)[0]
                    if before:
                        console.transport_write(before)
                    break
                console.transport_write(keys)
    os.write(fd_out, b"\r\n[left the serial console]\r\n")


def _stop_on_sigterm() -> None:
    """SIGTERM ends the command as Ctrl-C does: through the clean-up below."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def console_main(args: argparse.Namespace) -> int:
    """``python -m testbed console``: boot, print the SSH command, attach the serial console."""
    _stop_on_sigterm()

    def say(text: str) -> None:
        print(f"testbed: {text}", flush=True)

    try:
        profile = inputs.resolve_profile(
            args.device, serial=args.serial, relay=args.relay, flash_to=args.flash_to, ssh_host=args.ssh_host
        )
        image = inputs.resolve_image(args.image, profile, say)
        if not args.dry_run:
            inputs.check_host(profile)  # as the plugin does: before anything is made or booted
            if args.image:
                inputs.check_image(image, profile)
    except ConfigError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print(f"would boot {image.given} ({image.format}) on {profile.name} ({profile.source})")
        return EXIT_PASSED
    run_dir = Path(args.report_dir) / profile.name / ("console-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = {"developmentMode": args.mode == "development"} if args.mode else {}

    def stage(name: str, seconds: float | None, detail: str) -> None:
        when = f"{seconds:6.1f}s" if seconds is not None else "       "
        say(f"[{when}] {name:9} {detail}".rstrip())

    device = open_dut(
        profile, image.path, image.format, run_dir / "console.log", config_overrides=overrides, listener=stage
    )
    try:
        device.power_on()
        say(f"{device.name} is up; log in over SSH with:\n  {ssh_command(device)}")
        say(f"console log: {run_dir / 'console.log'}")
        console = device.machine.console
        if console is None:
            raise InfraError(f"{device.name} has no console")
        attach(console)
        return EXIT_PASSED
    except (DutError, InfraError) as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return EXIT_INFRA
    except KeyboardInterrupt:
        return 130
    finally:
        say(f"powering {device.name} off")
        device.close()


def add_console_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser(
        "console",
        help="boot a device and attach its serial console here (Ctrl-] leaves); prints the SSH command",
        description="Boot a device (default: the reference image on qemu-x86_64), print the SSH command that "
        "reaches it and attach its serial console to this terminal. Ctrl-] leaves; the device is then powered off.",
    )
    c.add_argument("--device", default=None, help="profile name or YAML path (default qemu-x86_64)")
    c.add_argument("--image", default=None, help="raw, qcow2 or compressed image (default: the reference image)")
    c.add_argument("--mode", choices=["development", "production"], default=None)
    c.add_argument("--serial", default=None, help="a board's serial console (see `smoke -h`)")
    c.add_argument("--relay", default=None, help="a board's power switch")
    c.add_argument("--flash-to", default=None, help="a board's storage to flash")
    c.add_argument("--ssh-host", default=None, help="a board's address HOST[:PORT]")
    c.add_argument("--report-dir", default="reports", help="where the console log goes (default reports/)")
    c.add_argument("--dry-run", action="store_true", help="check the options and the image, boot nothing")


def wait_for_the_person(devices: list[DUT]) -> None:
    """Until Enter alone, Ctrl-C or SIGTERM: a number attaches that device's serial console here.

    Reads the terminal itself (``/dev/tty``): pytest's capture holds standard input. Without a
    terminal, waits for a signal.
    """
    previous = signal.getsignal(signal.SIGTERM)
    _stop_on_sigterm()
    try:
        try:
            tty_file = open("/dev/tty", "r+b", buffering=0)  # noqa: SIM115 - closed below
        except OSError:
            signal.pause()  # no terminal: until Ctrl-C or SIGTERM
            return
        with tty_file:
            while True:
                tty_file.write(b"testbed: device number, or Enter to finish> ")
                answer = tty_file.readline().strip()
                if not answer:
                    return
                if answer.isdigit() and 1 <= int(answer) <= len(devices):
                    console = devices[int(answer) - 1].machine.console
                    if console is not None:
                        attach(console, tty_file.fileno(), tty_file.fileno())
    except KeyboardInterrupt:
        return
    finally:
        signal.signal(signal.SIGTERM, previous)
