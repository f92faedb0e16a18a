"""Every command the README shows parses as the README means it.

Each command of the README's ``sh`` blocks is run for real up to the point where a full run
would start: ``./run`` with ``TESTBED_RUN_DRY=1`` (it prints the nox command), testbed's own
commands with ``--dry-run`` (they print the pytest command they would run), and every pytest
command that comes out of them with ``--collect-only`` (pytest and the plugin parse all the
options, with a tiny disk image standing in for the user's). A command whose options do not
reach their owner (``--image`` taken by pytest as a file name, say) fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The testbed command each ./run session runs (noxfile.py), with the session's posargs after it.
SESSIONS = {"certify": ["-m", "testbed", "certify"], "smoke": ["-m", "testbed", "smoke"]}


def readme_commands() -> list[str]:
    """The commands of the README's sh blocks: continuations joined, comments dropped, ``# or:``
    alternatives kept, optional ``[...]`` parts included."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^#\s*or:\s*", "", line.strip())
            line = re.sub(r"\s+#\s.*$", "", line)
            line = re.sub(r"\[([^\]]*)\]", r"\1", line).replace("...", "").strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def write_image(path: Path) -> Path:
    """A tiny raw disk image (an MBR with one partition): enough for the options to be checked."""
    data = bytearray(4 << 20)
    data[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (4096).to_bytes(4, "little")
    data[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stand-ins for the README's image paths, by name."""
    root = tmp_path_factory.mktemp("images")
    raw = write_image(root / "os.img")
    qcow2 = root / "os.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(raw), str(qcow2)], check=True)
    zipped = root / "os.img.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(raw, "os.img")
    return {".img": raw, ".qcow2": qcow2, ".zip": zipped}


def with_images(argv: list[str], images: dict[str, Path]) -> list[str]:
    out = []
    for arg in argv:
        suffix = next((s for s in (".zip", ".qcow2", ".img") if arg.endswith(s) and "/dev/" not in arg), None)
        out.append(str(images[suffix]) if suffix and not arg.startswith("-") else arg)
    return out


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )  # fmt: skip


def collect(pytest_argv: list[str], images: dict[str, Path], tmp_path: Path) -> None:
    """pytest parses the command (all options, the profile, the image) and collects its checks."""
    argv = [sys.executable, *with_images(pytest_argv, images), "--collect-only", "-q", "--report-dir", str(tmp_path)]
    # A desk option is refused under CI=true on purpose; the README shows it for the desk.
    done = run(argv, CI="false" if "--keep-on-failure" in argv else os.environ.get("CI", ""))
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"


def check_testbed_command(args: list[str], images: dict[str, Path], tmp_path: Path) -> None:
    """``python -m testbed ...``: run with --dry-run, then collect each pytest command it prints."""
    done = run([sys.executable, *with_images(args, images), "--dry-run"])
    assert done.returncode in (0, 1), f"{shlex.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    for line in done.stdout.splitlines():
        if line.startswith("-m pytest "):
            collect(shlex.split(line), images, tmp_path)


@pytest.mark.parametrize("command", readme_commands())
def test_the_readme_command_parses(command: str, images: dict[str, Path], tmp_path: Path) -> None:
    argv = shlex.split(command)
    if argv[0] == "./run":
        done = run(["./run", *argv[1:]], TESTBED_RUN_DRY="1")
        assert done.returncode == 0, done.stderr
        nox = shlex.split(done.stdout)
        assert nox[:2] == ["nox", "-s"] and nox[2] == (argv[1] if len(argv) > 1 else "tests"), nox
        assert f"def {nox[2]}(" in (REPO / "noxfile.py").read_text(), f"noxfile.py has no session {nox[2]}"
        posargs = nox[4:] if nox[3:4] == ["--"] else []
        assert "--" not in posargs[:1], f"{command}: a `--` would reach the session: {nox}"
        if nox[2] in SESSIONS and posargs:
            check_testbed_command([*SESSIONS[nox[2]], *posargs], images, tmp_path)
    elif argv[0] == "pytest":
        collect(["-m", "pytest", *argv[1:]], images, tmp_path)
    elif argv[:3] == ["python", "-m", "testbed"] and argv[3] == "inspect":
        done = run([sys.executable, *with_images(argv[1:], images)])
        assert done.returncode in (0, 1), f"{command}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        assert "partition" in done.stdout.lower(), done.stdout
    elif argv[:3] == ["python", "-m", "testbed"]:
        check_testbed_command(argv[1:], images, tmp_path)
    else:
        pytest.fail(f"the README shows a command this test does not know how to check: {command}")


def test_the_readme_shows_the_commands_this_test_checks() -> None:
    commands = readme_commands()
    assert "./run certify -- --image path/to/os.img" in commands
    assert any(c.startswith("python -m testbed console") for c in commands)
    assert len(commands) >= 12, commands
