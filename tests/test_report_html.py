"""report.html, the boot timeline and the farm summary, on hand-written runs under tests/data/reports/.

The fixture device qemu-x86_64 has three runs: certified (10-30), a lab fault (10-31) and the
latest (11-01) with a failed check, an infra error, a skipped check, a reboot, a power cycle and
device output that tries to inject HTML. raspberrypi4-64 has one certified run without console.log.
The latest run's report.json is schema 2: its boots carry the stages the boot model recorded
live. The other runs are schema 1 (boots with only ssh_ready_s and login_prompt_s), as older
runs in a device's history are. The last test opens the report in a real headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from testbed.report.__main__ import main as cli
from testbed.report.html import ReportError, load_report, render_html, timeline_context
from testbed.report.summary import render_summary
from testbed.report.timeline import Boot, boots_from_report, upgrade_boot

FIXTURES = Path(__file__).parent / "data" / "reports"
LATEST = "qemu-x86_64/20261101T214958Z-5e6f"
LAB_FAULT = "qemu-x86_64/20261031T214907Z-3c4d"
CERTIFIED = "qemu-x86_64/20261030T215102Z-1a2b"
BOARD = "raspberrypi4-64/20261101T220512Z-9a0b"
TITLE_ATTACK = "<script>document.title='pwned'</script>"


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    """A copy of the fixture reports tree, so rendering writes nothing into the repository."""
    root = tmp_path / "reports"
    shutil.copytree(FIXTURES, root, symlinks=True)
    return root


def stages(boot: Boot) -> dict[str, float]:
    return {stage.name: stage.at_s for stage in boot.stages}


def timeline_html(html: str) -> str:
    return html[html.index('id="timeline"') : html.index('id="checks"')]


def boot(device: str, kind: str, *stage_times: tuple[str, float], **fields: Any) -> dict[str, Any]:
    """A schema-2 boot as the plugin writes it."""
    entry = {
        "device": device, "kind": kind, "started": "2026-12-02T13:40:01.123+00:00", "accelerator": "kvm",
        "ended_by": "ssh ready" if any(name == "ssh" for name, _ in stage_times) else "power cut",
        "end_s": max((at for _, at in stage_times), default=0.0),
        "stages": [{"stage": name, "at_s": at, "detail": f"{name} line"} for name, at in stage_times],
    }  # fmt: skip
    return {**entry, **fields}


# -- the boot timeline ----------------------------------------------------------------------
def test_timeline_is_built_from_the_boots_in_report_json() -> None:
    boots = boots_from_report(load_report(FIXTURES / LATEST / "report.json"))
    assert [(b.device, b.index, b.kind, b.is_restore) for b in boots] == [
        ("qemu-x86_64", 1, "cold", False),
        ("qemu-x86_64", 2, "restore", True),
        ("qemu-x86_64", 3, "restore", True),
        ("qemu-x86_64", 4, "reboot", False),
        ("qemu-x86_64", 5, "restore", True),
        ("qemu-x86_64", 6, "power-cycle", False),
        ("qemu-x86_64", 7, "restore", True),
    ]
    cold, reboot, cycle = boots[0], boots[3], boots[5]
    assert stages(cold) == {
        "firmware": 2.841, "bootloader": 3.905, "kernel": 5.377, "userspace": 9.802, "login": 19.418, "ssh": 22.507,
    }  # fmt: skip
    assert cold.accelerator == "tcg" and cold.ended_by == "ssh ready" and cold.schema == 2
    assert cold.started is not None and cold.started.isoformat() == "2026-11-01T21:50:03.512000+00:00"
    assert "Linux version 6.1.0-26-amd64" in (cold.stage("kernel") or pytest.fail("no kernel")).detail
    # The firmware runs from power on (before its first output, too) until the bootloader starts.
    assert cold.segments() == [
        ("firmware", 0.0, 3.905), ("bootloader", 3.905, 5.377), ("kernel", 5.377, 9.802),
        ("userspace", 9.802, 19.418), ("login", 19.418, 22.507),
    ]  # fmt: skip
    # The reboot's reset is a stage the bar does not draw; the table lists it.
    assert [s.name for s in reboot.other_stages] == ["reset"] and reboot.segments()[0] == ("firmware", 0.0, 3.732)
    assert cycle.total_s == 23.4 and cycle.reached_ssh
    assert stages(boots[1]) == {"restore": 0.0, "ssh": 0.932} and boots[1].segments() == [("restore", 0.0, 0.932)]
    assert [b.ended_by for b in boots] == ["ssh ready"] * 7


def test_timeline_draws_report_json_not_the_console(reports: Path) -> None:
    """console.log is not parsed for stages: without it, or with a different one, the timeline is the same."""
    run = reports / LATEST
    drawn = timeline_html(render_html(run).read_text())
    (run / "console.log").write_text("[21:50:03.512 +   0.000] ==== testbed: power on (kvm) ====\nLinux version 9\n")
    assert timeline_html(render_html(run).read_text()) == drawn
    (run / "console.log").unlink()
    assert timeline_html(render_html(run).read_text()) == drawn
    assert "Boot 6 · power-cycle" in drawn and ">23.4 s<" in drawn and "4 snapshot restores" in drawn


def test_timeline_of_a_boot_that_never_reached_ssh_and_restores() -> None:
    report = {"device": "qemu-x86_64", "timings": {"boots": [
        boot("qemu-x86_64", "cold", ("firmware", 1.0), ("kernel", 3.0), end_s=20.0),
        boot("qemu-x86_64", "restore", ("restore", 0.0), ("ssh", 0.9)),
        boot("qemu-x86_64", "restore", ("restore", 0.0), ("ssh", 1.3)),
        boot("qemu-x86_64", "restore", ("restore", 0.0), end_s=30.0),
    ]}}  # fmt: skip
    stuck = boots_from_report(report)[0]
    assert not stuck.reached_ssh and stuck.total_s == 20.0 and stuck.ended_by == "power cut"
    # Drawn up to the last moment it was seen, stuck in the kernel.
    assert stuck.segments() == [("firmware", 0.0, 3.0), ("kernel", 3.0, 20.0)]
    context = timeline_context(report)
    [row] = context["rows"]
    assert row["label"] == "Boot 1 · cold" and not row["complete"] and row["total_text"] == "20.0 s ✗"
    assert row["start"] == "13:40:01.123" and row["stages"]["kernel"] == 3.0 and row["stages"]["ssh"] is None
    assert context["chart"]["bars"][0]["total"] == "20.0 s ✗" and context["detailed"] and not context["legacy"]
    assert context["restores"] == (
        "3 snapshot restores: SSH ready after 900 ms to 1.3 s (median 1.1 s); 1 never got SSH back"
    )
    assert context["legend"] == [("firmware", "#64748b"), ("kernel", "#2563eb")]


def test_timeline_of_several_devices_puts_the_main_device_first(tmp_path: Path) -> None:
    report = {"device": "qemu-x86_64", "timings": {"boots": [
        boot("qemu-x86_64-configured", "cold", ("firmware", 1.0), ("ssh", 15.0)),
        boot("qemu-x86_64", "cold", ("firmware", 2.0), ("kernel", 4.0), ("ssh", 20.0)),
        boot("qemu-x86_64-configured", "reboot", ("reset", 0.0), ("kernel", 3.0), ("ssh", 14.0)),
        {"kind": "reboot", "ssh_ready_s": 18.0, "login_prompt_s": 16.0},  # no device: the main one's
        boot("qemu-x86_64-configured", "restore", ("restore", 0.0), ("ssh", 1.0)),
    ]}}  # fmt: skip
    context = timeline_context(report)
    assert context["several_devices"] and context["devices"] == ["qemu-x86_64", "qemu-x86_64-configured"]
    assert [r["label"] for r in context["rows"]] == [
        "qemu-x86_64 · boot 1 · cold",
        "qemu-x86_64 · boot 2 · reboot",
        "qemu-x86_64-configured · boot 1 · cold",
        "qemu-x86_64-configured · boot 2 · reboot",
    ]
    assert context["restores"] == "1 snapshot restore (qemu-x86_64-configured: 1): SSH ready 1.0 s"
    assert context["detailed"] and context["legacy"]
    # The label column widens for the longer labels and every label fits it.
    chart = context["chart"]
    assert chart["left"] > 190 and [b["label"] for b in chart["bars"]] == [r["label"] for r in context["rows"]]

    run = tmp_path / "reports" / "qemu-x86_64" / "r1"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({**report, "schema": 2, "tests": []}))
    html = timeline_html(render_html(run).read_text())
    assert "<th>Device</th>" in html and '<td class="mono">qemu-x86_64-configured</td>' in html
    assert "qemu-x86_64-configured · boot 2 · reboot" in html and "reset at 0 ms" in html
    assert 'title="kernel line"' in html and "older report.json (schema 1)" in html


def test_an_old_boot_without_stages_is_upgraded_to_the_new_shape() -> None:
    assert upgrade_boot({"kind": "cold", "ssh_ready_s": 38.215, "login_prompt_s": 31.904}) == {
        "kind": "cold", "ssh_ready_s": 38.215, "login_prompt_s": 31.904, "end_s": 38.215,
        "stages": [
            {"stage": "boot", "at_s": 0.0, "detail": "stages not recorded (report schema 1)"},
            {"stage": "login", "at_s": 31.904, "detail": ""},
            {"stage": "ssh", "at_s": 38.215, "detail": ""},
        ],
    }  # fmt: skip
    report = {"device": "rpi", "timings": {"boots": [
        {"kind": "cold", "ssh_ready_s": 38.215, "login_prompt_s": 31.904},
        {"kind": "cold", "ssh_ready_s": 17.9, "login_prompt_s": None},
        {"kind": "restore", "ssh_ready_s": 0.9},
        {"kind": "cold", "ssh_ready_s": None, "login_prompt_s": None},
    ]}}  # fmt: skip
    with_login, without_login, restore, nothing = boots_from_report(report)
    # As the old report.json path drew them: power on to the login prompt, then to SSH.
    assert with_login.schema == 1 and with_login.device == "rpi" and with_login.started is None
    assert with_login.segments() == [("boot", 0.0, 31.904), ("login", 31.904, 38.215)]
    assert without_login.segments() == [("boot", 0.0, 17.9)]
    assert restore.is_restore and restore.segments() == [("restore", 0.0, 0.9)]
    assert not nothing.reached_ssh and nothing.segments() == []
    context = timeline_context(report)
    assert context["legacy"] and not context["detailed"] and not context["several_devices"]
    assert context["rows"][0]["label"] == "Boot 1 · cold" and context["rows"][0]["stages"]["login"] == 31.904
    assert context["restores"] == "1 snapshot restore: SSH ready 900 ms"


def test_timeline_tolerates_missing_and_odd_values() -> None:
    report = {"device": "qemu-x86_64", "timings": {"boots": [
        "not a boot", None, 7,
        {"stages": [
            {"stage": "ssh", "at_s": 12.0}, {"stage": "kernel", "at_s": 4.0, "detail": "x" * 500},
            {"stage": "kernel", "at_s": 6.0}, {"stage": "firmware", "at_s": -1.0}, {"stage": "login", "at_s": "9"},
            {"stage": "userspace", "at_s": True}, {"stage": "", "at_s": 1.0}, {"at_s": 2.0}, "junk",
            {"stage": "flashed", "at_s": 0.5}, {"stage": "login", "at_s": 14.0},
        ], "end_s": 3.0, "started": "yesterday", "device": 42, "kind": None, "ended_by": ["?"]},
        {"kind": "wait", "stages": []},
        {"kind": "cold", "stages": "garbage", "ssh_ready_s": "fast", "login_prompt_s": float("nan")},
    ]}}  # fmt: skip
    odd, empty, garbage = boots_from_report(report)
    # Bad entries are left out, a repeated stage keeps its first time, negatives count as 0, order is by time.
    assert [(s.name, s.at_s) for s in odd.stages] == [
        ("firmware", 0.0), ("flashed", 0.5), ("kernel", 4.0), ("ssh", 12.0), ("login", 14.0),
    ]  # fmt: skip
    assert len((odd.stage("kernel") or pytest.fail("no kernel")).detail) == 160
    assert odd.device == "qemu-x86_64" and odd.kind == "" and odd.started is None and odd.ended_by == ""
    # end_s is never before the last stage; what came after SSH stays out of the bar.
    assert odd.end_s == 14.0 and odd.total_s == 12.0
    assert odd.segments() == [("firmware", 0.0, 4.0), ("kernel", 4.0, 12.0)]
    assert empty.stages == [] and empty.segments() == [] and empty.total_s == 0.0
    assert garbage.schema == 1 and garbage.segments() == [] and not garbage.reached_ssh
    context = timeline_context(report)
    assert [r["label"] for r in context["rows"]] == ["Boot 1", "Boot 2 · wait", "Boot 3 · cold"]
    assert context["rows"][0]["other"] == [{"label": "flashed at 500 ms", "detail": ""}]
    assert context["restores"] == ""
    for broken in ({}, {"timings": None}, {"timings": {"boots": "none"}}, {"device": 3, "timings": {"boots": []}}):
        assert boots_from_report(broken) == [] and timeline_context(broken)["chart"] is None


# -- the report ---------------------------------------------------------------------------
def test_report_shows_verdict_facts_timeline_checks_history_in_order(reports: Path) -> None:
    out = render_html(reports / LATEST)
    assert out == reports / LATEST / "report.html"
    html = out.read_text()

    order = [
        html.index(f'id="{anchor}"') for anchor in ("verdict", "facts", "timeline", "checks", "history", "signoff")
    ]
    assert order == sorted(order)

    verdict = html[html.index('id="verdict"') : html.index('id="facts"')]
    assert 'class="verdict not-certified"' in verdict and "NOT CERTIFIED" in verdict
    for count, label in ((10, "passed"), (1, "failed"), (1, "infra errors"), (1, "skipped")):
        assert re.search(rf"<b>{count}</b><span>{label}</span>", verdict), label
    assert 'Failed: <a href="#check-suites-persistence-test_persistence.py-test_state_survives_power_cut">' in verdict

    facts = html[html.index('id="facts"') : html.index('id="timeline"')]
    for text in (
        "qemu-x86_64", "balena-qemux86-64-5.3.10.img", "9f2c4e8a1b7d3f60c5a9e2d4b8f1c3a7e6d0b9f2a4c8e1d3b5f7a9c2e4d6b8f0",
        "balenaOS 5.3.10", "6.1.0-26-amd64", "/usr/share/OVMF/OVMF_CODE_4M.fd", "tcg (KVM is not usable: /dev/kvm is absent)",
        "QEMU, machine type q35, 2 CPUs, 1024 MiB RAM", "version 0.1.0 on host farm-qemu-03", "2026-11-01 21:49:58 UTC",
        "2 min 35 s", "resin-rootA", "704 MiB", "585 MiB", "secure_boot",
    ):  # fmt: skip
        assert text in facts, text

    timeline = html[html.index('id="timeline"') : html.index('id="checks"')]
    assert "<svg" in timeline and "Boot 1 · cold" in timeline and "Boot 4 · reboot" in timeline
    assert ">22.5 s<" in timeline and ">21.7 s<" in timeline and ">23.4 s<" in timeline
    assert "4 snapshot restores" in timeline

    checks = html[html.index('id="checks"') : html.index('id="history"')]
    report = json.loads((reports / LATEST / "report.json").read_text())
    for t in report["tests"]:
        assert t["nodeid"] in checks, t["nodeid"]
    for suite in ("layout", "smoke", "persistence", "update"):
        assert f'id="suite-{suite}"' in checks
    assert "State survives power cut" in checks and "SSH answers on 22222" in checks

    failure = checks[checks.index('test_state_survives_power_cut"') : checks.index('id="suite-update"')]
    assert "Failure: the check&#39;s expectation was not met" in failure
    assert "is gone after it" in failure
    assert "$ cat /mnt/state/tb-marker</code>" in failure
    assert '<span class="exit bad">1</span>' in failure
    assert "cat: /mnt/state/tb-marker: No such file or directory" in failure
    assert "<details open>" in failure
    # The console excerpt is matched by time to the check's commands and shows the cause.
    assert "Console lines from 21:51:27 to 21:51:57 UTC" in failure
    assert "[FAILED] Failed to start resin-state-reset.service" in failure
    assert "==== testbed: power cut ====" in failure

    lab = checks[checks.index('id="suite-update"') :]
    assert "LAB ERROR" in lab and "Lab fault: the emulator, console or host failed, not the device" in lab
    assert "QEMU exited (code -9)" in lab
    # No timed command: the excerpt falls back to the lines before the power cut, and says so.
    assert "ran no command with a timestamp" in lab and "the power cut at 21:52:31.700" in lab
    assert "hostapp-update[702]: writing rootB" in lab
    assert "needs a second image to update to" in lab

    history = html[html.index('id="history"') :]
    for run_id in ("20261101T214958Z-5e6f", "20261031T214907Z-3c4d", "20261030T215102Z-1a2b"):
        assert run_id in history
    assert 'href="../20261031T214907Z-3c4d/report.json"' in history
    assert "<polyline" in history and "17.9 s" in history and "18.0 s" in history
    assert "Reviewed by" in html and "Signature" in html and "Date" in html


def test_certified_lab_fault_and_board_runs(reports: Path) -> None:
    certified = render_html(reports / CERTIFIED).read_text()
    assert 'class="verdict certified"' in certified and "CERTIFIED" in certified and "NOT CERTIFIED" not in certified

    lab = render_html(reports / LAB_FAULT).read_text()
    assert 'class="verdict incomplete"' in lab and "INCOMPLETE: lab fault" in lab and "NOT CERTIFIED" not in lab
    assert "The lab failed" in lab and "serial console closed" in lab
    # The history of an older run links to the newer ones too.
    assert 'href="../20261101T214958Z-5e6f/report.json"' in lab

    board = render_html(reports / BOARD).read_text()
    assert "CERTIFIED" in board and "raspberrypi4-64" in board and "Raspberry Pi bootloader 2024-04-20" in board
    # A schema-1 report: the boot is drawn from its login and SSH times, and the page says why no more.
    assert "31.9 s" in board and "38.2 s" in board and "older report.json (schema 1)" in timeline_html(board)
    assert "power on → login prompt or SSH (stages not recorded)" in board
    assert "28.5 GiB" in board and "relay" in board


def test_device_output_is_escaped(reports: Path) -> None:
    run = reports / LATEST
    report = json.loads((run / "report.json").read_text())
    report["tests"][0]["evidence"][0]["stdout"] = "bell\x07 esc\x1b[31m nul\x00 \u202eevil\n"
    (run / "report.json").write_text(json.dumps(report))
    html = render_html(run).read_text()
    assert "<script" not in html.lower()
    assert "<b>bold</b>" not in html and "<img" not in html
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt; &lt;b&gt;bold&lt;/b&gt;" in html
    # in the console excerpt and in the command output alike
    assert html.count("&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;") >= 2
    assert "onerror=&#34;document.body.setAttribute" in html
    assert "bell\u2407 esc\u241b[31m nul\u2400 \ufffdevil" in html
    assert "content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\"" in html


def test_missing_and_unknown_fields(tmp_path: Path) -> None:
    run = tmp_path / "reports" / "tiny" / "r1"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({
        "device": "tiny", "schema": 7, "something_new": {"a": [1, 2]},
        "tests": [{"nodeid": "test_alone.py::test_it_works[x-1]", "outcome": "passed", "attempts": 2}],
        "facts": {"kernel": "6.6.0", "fancy": {"nested": True}},
    }))  # fmt: skip
    html = render_html(run).read_text()
    assert "CERTIFIED" in html and "It works [x-1]" in html and "6.6.0" in html and "fancy" in html
    assert 'id="suite-alone"' in html

    (run / "report.json").write_text(json.dumps({"device": "tiny", "tests": []}))
    html = render_html(run).read_text()
    assert "INCOMPLETE: nothing checked" in html and "CERTIFIED" not in html.replace("NOT CERTIFIED", "")


def test_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text('{"device": "x", "tests": [\n')
    with pytest.raises(ReportError, match=r"report\.json: not valid JSON \(line 2"):
        load_report(run / "report.json")
    assert cli(["render", str(run)]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(run / "report.json") in err and "not valid JSON" in err

    (run / "report.json").write_text('{"tests": [{"nodeid": "a.py::t", "evidence": "nope"}]}')
    assert cli(["render", str(run)]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tests[0].'evidence' should be a list, found str" in err

    assert cli(["render", str(tmp_path / "missing")]) == 4
    err = capsys.readouterr().err
    assert err.strip() == f"testbed.report: error: {tmp_path / 'missing'}: no such run directory"

    assert cli(["summary", str(tmp_path / "nowhere")]) == 4
    assert "no such reports directory" in capsys.readouterr().err


def test_cli_renders_a_run_and_the_summary(reports: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["render", str(reports / "qemu-x86_64" / "latest")]) == 0
    assert (reports / LATEST / "report.html").is_file()
    out = reports / "farm.html"
    assert cli(["summary", str(reports), "-o", str(out)]) == 0
    assert out.is_file() and capsys.readouterr().out.strip().endswith("farm.html")


# -- the farm summary ---------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs += [v for k, v in attrs if k == "href" and v]


def test_summary_matrix_links_and_changes(reports: Path) -> None:
    broken = reports / "qemu-x86_64" / "20261029T000000Z-dead"
    broken.mkdir()
    (broken / "report.json").write_text("{truncated")
    out = render_summary(reports, reports / "summary.html")
    html = out.read_text()
    assert "Reports that could not be read" in html and f"{broken / 'report.json'}: not valid JSON" in html
    assert "2 devices" in html and "qemu-x86_64" in html and "raspberrypi4-64" in html
    for suite in ("Layout", "Smoke", "Persistence", "Update"):
        assert f">{suite}</th>" in html

    parser = _Links()
    parser.feed(html)
    assert "./qemu-x86_64/20261101T214958Z-5e6f/report.html#suite-persistence" in parser.hrefs
    assert "./raspberrypi4-64/20261101T220512Z-9a0b/report.html#suite-smoke" in parser.hrefs
    for href in parser.hrefs:  # every link leads to a report that exists (missing ones were rendered)
        assert (out.parent / href.split("#")[0]).is_file(), href

    row = html[html.index('id="device-qemu-x86_64"') : html.index('id="device-raspberrypi4-64"')]
    assert 'class="failed"' in row and 'class="error"' in row and 'class="passed"' in row
    assert "+25% vs 18.0 s" in row

    changes = html[html.index('id="changes"') :]
    qemu = changes[: changes.index("raspberrypi4-64")]
    assert "20261031T214907Z-3c4d" in qemu
    assert "State survives power cut</a>: failed" in qemu and "Update switches to rootB</a>: lab error" in qemu
    assert "Boots to a shell on the serial console" in qemu  # fixed: it was a lab error
    assert "slower: 18.0 s → 22.5 s (+25%)" in qemu
    assert "balenaOS 5.3.9 → balenaOS 5.3.10" in qemu
    assert "no earlier run" in changes[changes.index("raspberrypi4-64") :]


def test_summary_against_a_previous_reports_root(reports: Path, tmp_path: Path) -> None:
    previous = tmp_path / "previous"
    (previous / "qemu-x86_64").mkdir(parents=True)
    shutil.copytree(reports / CERTIFIED, previous / CERTIFIED)
    html = render_summary(reports, tmp_path / "out" / "summary.html", previous=previous).read_text()
    qemu = html[html.index('id="changes"') :]
    assert "20261030T215102Z-1a2b" in qemu and "slower: 17.9 s → 22.5 s (+26%)" in qemu
    assert 'href="../reports/qemu-x86_64/20261101T214958Z-5e6f/report.html#suite-smoke"' in html


# -- in a real browser --------------------------------------------------------------------
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip


def _chromium(names: tuple[str, ...] = ("chromium", "/usr/bin/chromium")) -> str:
    """The browser; without it the test fails when CI=true (a skip would hide it) and is skipped elsewhere."""
    path = next((found for name in names if (found := shutil.which(name))), None)
    if path is None:
        message = "needs Debian's chromium (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return path


def test_a_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: needs Debian's chromium"):
        _chromium(("no-such-browser",))
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="needs Debian's chromium"):
        _chromium(("no-such-browser",))


def _run_chromium(binary: str, args: list[str], profile: Path, timeout: float = 60) -> str:
    """Run Chromium once in its own process group, and kill the whole group whatever happens."""
    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium {args[0]} did not finish in {timeout}s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"chromium {args[0]} exited {proc.returncode}: {stderr[-2000:]}"
    return stdout


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        self.text.append(data)


def test_report_in_headless_chromium(reports: Path, tmp_path: Path) -> None:
    binary = _chromium()
    page = render_html(reports / LATEST)
    url = page.resolve().as_uri()
    shot, pdf = tmp_path / "report.png", tmp_path / "report.pdf"
    jobs = {
        "dom": ["--dump-dom", url],
        "png": [f"--screenshot={shot}", "--window-size=1280,2000", url],
        "pdf": [f"--print-to-pdf={pdf}", "--no-pdf-header-footer", url],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(_run_chromium, binary, args, tmp_path / f"profile-{k}") for k, args in jobs.items()}
        results = {k: f.result() for k, f in futures.items()}

    dom = _Dom()
    dom.feed(results["dom"])
    text = " ".join("".join(dom.text).split())
    original = _Dom()
    original.feed(page.read_text())
    assert dom.title == original.title and "pwned" not in dom.title
    assert dom.title.startswith("NOT CERTIFIED: qemu-x86_64 20261101T214958Z-5e6f")
    # the injected markup stayed text: no script ran, no element was made from it
    assert not [t for t, _ in dom.tags if t in ("script", "img", "pwned-marker")]
    assert not [a for _, a in dom.tags if "data-pwned" in a]
    assert TITLE_ATTACK + " <b>bold</b>" in text
    assert "<script>document.body.appendChild(document.createElement('pwned-marker'))</script>" in text

    assert "NOT CERTIFIED" in text
    for fact in (
        "qemu-x86_64",
        "balenaOS 5.3.10",
        "6.1.0-26-amd64",
        "resin-rootB",
        "9f2c4e8a1b7d3f60c5a9e2d4b8f1c3a7e6d0b9f2a4c8e1d3b5f7a9c2e4d6b8f0",
    ):
        assert fact in text, fact
    report = json.loads((reports / LATEST / "report.json").read_text())
    for t in report["tests"]:
        assert t["nodeid"] in text, t["nodeid"]
    assert "$ cat /mnt/state/tb-marker" in text and "cat: /mnt/state/tb-marker: No such file or directory" in text
    assert "[FAILED] Failed to start resin-state-reset.service" in text

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert struct.unpack(">II", png[16:24]) == (1280, 2000)

    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF") and len(data) > 20_000
    match = re.search(rb"/Type\s*/Pages\b.*?/Count\s+(\d+)", data, re.DOTALL)
    assert match and int(match.group(1)) >= 1
