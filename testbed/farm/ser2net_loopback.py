"""ser2net for labgrid's exporter, kept on loopback.

labgrid's exporter serves each exported serial port by starting ``ser2net`` with an
accepter ``tcp,PORT``: ser2net then listens on every interface, and the exporter has no
option to change that. testbed's farms put this wrapper first on the exporter's PATH (as
``ser2net``): it rewrites each accepter to ``tcp,127.0.0.1,PORT`` (or ``TESTBED_SER2NET_BIND``)
and execs the real ser2net, which also gets PR_SET_PDEATHSIG so it dies with the exporter
that started it, however the exporter dies. ``-v`` and every other argument pass through.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from testbed.util import cache_dir

_PR_SET_PDEATHSIG = 1
HOST_TOOLS = "host-tools"

_ACCEPTER = re.compile(r"(accepter:\s*\S*?),tcp,(\d+)\s*$")


def find_ser2net(skip: Path | None = None) -> str | None:
    """The real ser2net: on PATH (not this wrapper's directory), /usr/sbin, or unpacked by ./run."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and (skip is None or Path(d) != skip)]
    candidates = [shutil.which("ser2net", path=os.pathsep.join(dirs)), "/usr/sbin/ser2net"]
    candidates.append(str(cache_dir() / HOST_TOOLS / "usr/sbin/ser2net"))
    for path in candidates:
        if path and os.access(path, os.X_OK) and (skip is None or Path(path).parent != skip):
            return path
    return None


def rewrite(argv: list[str], bind: str) -> list[str]:
    """``argv`` with every ``accepter: ...,tcp,PORT`` bound to ``bind``."""
    return [_ACCEPTER.sub(lambda m: f"{m.group(1)},tcp,{bind},{m.group(2)}", arg) for arg in argv]


def main() -> int:
    wrapper_dir = Path(sys.argv[0]).resolve().parent if len(sys.argv) > 0 else None
    real = os.environ.get("TESTBED_SER2NET") or find_ser2net(
        Path(os.environ.get("TESTBED_SER2NET_WRAPPER_DIR", "")) or wrapper_dir
    )
    if not real:
        print(
            "ser2net is not installed: ./run tests unpacks it from Debian's ser2net package into "
            f"{cache_dir() / HOST_TOOLS} (apt-get install libgensio4 libyaml-0-2 for its libraries)",
            file=sys.stderr,
        )
        return 127
    args = rewrite(sys.argv[1:], os.environ.get("TESTBED_SER2NET_BIND", "127.0.0.1"))
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.execv(real, [real, *args])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
