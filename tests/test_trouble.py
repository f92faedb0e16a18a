"""Which console lines are kernel or service trouble, and which check each one goes to (no QEMU)."""

from __future__ import annotations

import pytest

from testbed.trouble import TroubleLog

LINES = {
    "[ 5.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100": "panic",
    "[ 7.2] Oops: 0000 [#1] PREEMPT SMP NOPTI": "oops",
    "[ 8.3] BUG: kernel NULL pointer dereference, address: 0000000000000010": "bug",
    "[62.0] watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [sshd:284]": "stall",
    "[90.1] rcu: INFO: rcu_preempt self-detected stall on CPU": "stall",
    "[99.0] INFO: task sshd:12 blocked for more than 120 seconds.": "stall",
    "[ 9.4] WARNING: CPU: 0 PID: 1 at drivers/base/core.c:42 device_add+0x10/0x20": "warning",
    "[10.5] Out of memory: Killed process 612 (stress) total-vm:1024kB": "oom",
    "[11.6] app[612]: segfault at 10 ip 000055 sp 00007ff error 4 in app[55+1000]": "segfault",
    "[FAILED] Failed to start NetworkManager.service - Network Manager.": "unit",
    "[12.7] Call Trace:": "trace",
}
QUIET = [
    "[ 0.0] Linux version 6.1.0-26-amd64",
    "[  OK  ] Started ssh.service - OpenBSD Secure Shell server.",
    "EXT4-fs (vda2): mounted filesystem with ordered data mode",
    "echo WARNING is a word",  # no kernel WARNING format
]


@pytest.mark.parametrize(("line", "kind"), list(LINES.items()))
def test_each_kind_is_found(line: str, kind: str) -> None:
    log = TroubleLog("d")
    log.on_line(line)
    assert [t.kind for t in log.take()] == [kind]


def test_ordinary_lines_are_not_trouble_and_replays_are_ignored() -> None:
    log = TroubleLog("d")
    for line in QUIET:
        log.on_line(line)
    log.on_line("[ 7.2] Oops: 0000 [#1] SMP", replay=True)
    assert log.take() == []


def test_each_line_goes_to_one_check_and_provoked_trouble_is_marked() -> None:
    log = TroubleLog("d")
    log.on_line("[ 7.2] Oops: 0000 [#1] SMP")
    first = log.take()
    log.expecting = True  # a wait that tolerates panics: a root meant not to boot
    log.on_line("[ 5.1] Kernel panic - not syncing: VFS: Unable to mount root fs")
    second = log.take()
    assert [t.kind for t in first] == ["oops"] and not first[0].expected
    assert [(t.kind, t.expected) for t in second] == [("panic", True)]
    assert log.take() == []


def test_failed_units_are_trouble_once() -> None:
    log = TroubleLog("d")
    log.failed_units("")
    listing = "testbed-broken.service loaded failed failed /bin/false\n"
    log.failed_units(listing)
    log.failed_units(listing)
    assert [t.line for t in log.take()] == [
        "systemctl --failed: testbed-broken.service loaded failed failed /bin/false"
    ]
