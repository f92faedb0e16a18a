"""Developer and CI entry points. `./run SESSION` sets up the host and calls these."""

from __future__ import annotations

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]


def _install(session: nox.Session, *extra: str) -> None:
    session.install(*(extra or ("-e", ".")))


@nox.session
def tests(session: nox.Session) -> None:
    """The project's own tests, including real boots of the reference image on QEMU."""
    # The board drivers' optional packages, from wheels only: gpiod's source build needs a
    # compiler, so where PyPI has no gpiod wheel for this Python its one test says so and skips.
    _install(session, "-e", ".[farm]", "zstandard", "hidapi", "usbsdmux")
    session.install("--only-binary=:all:", "gpiod>=2", success_codes=[0, 1])
    # The slowest tests are listed at the end: where the CI budget goes.
    session.run("pytest", "tests", "--durations=25", *session.posargs)


@nox.session
def certify(session: nox.Session) -> None:
    """Certify an image on a device in development and production modes, one report each.

    Default: the reference image on qemu-x86_64. Options after `--`, e.g.
    `./run certify -- --device qemu-x86_64 --image my.img` (see `python -m testbed certify -h`).
    """
    _install(session)
    session.run("python", "-m", "testbed", "certify", *session.posargs)


@nox.session
def smoke(session: nox.Session) -> None:
    """The smoke suite on one device with boot stages live; default: the virtual bench (no hardware).

    A board on the desk: `./run smoke -- --device raspberrypi4-64 --serial /dev/ttyUSB0
    --relay serial-relay:/dev/ttyUSB1:1 --flash-to /dev/sdX` (see `python -m testbed smoke -h`).
    """
    _install(session, "-e", ".[farm]", "zstandard", "hidapi", "usbsdmux")
    args = list(session.posargs)
    if not any(a == "--device" or a.startswith("--device=") for a in args):
        args = ["--device", "virtual-board", *args]
    session.run("python", "-m", "testbed", "smoke", *args)


@nox.session
def image(session: nox.Session) -> None:
    """Build (or find in the cache) the reference image and print its path."""
    _install(session)
    session.run("python", "-m", "testbed.reference", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, then mypy on the package (config in pyproject.toml's [tool.mypy])."""
    # The project itself so that its dependencies' own types (pydantic, pytest, qemu.qmp, Jinja2)
    # resolve; the stub packages cover those that ship none. The board drivers' optional
    # packages stay out: pyproject tells mypy to take them as untyped.
    session.install("ruff", "mypy", "types-PyYAML", "types-paramiko", "types-pyserial", "types-pexpect")
    _install(session)
    session.run("ruff", "check", "testbed", "suites", "tests", "benchmarks", "noxfile.py", "conftest.py")
    session.run("mypy", "testbed")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed figures, side by side with raw QEMU, paramiko and pexpect in the same run."""
    _install(session)
    session.run("python", "benchmarks/bench.py", *session.posargs)
