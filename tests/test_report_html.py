"""report.html, the boot timeline and the farm summary, on hand-written runs under tests/data/reports/.

The fixture device qemu-x86_64 has three runs: certified (10-30), a lab fault (10-31) and the
latest (11-01) with a failed check, an infra error, a skipped check, a reboot, a power cycle and
device output that tries to inject HTML. raspberrypi4-64 has one certified run without console.log.
The last test opens the report in a real headless Chromium.
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

import pytest

from testbed.report.__main__ import main as cli
from testbed.report.html import ReportError, load_report, render_html
from testbed.report.summary import render_summary
from testbed.report.timeline import parse_boots

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


def stages(boot) -> dict[str, float]:
    return {name: stage.at_s for name, stage in boot.stages.items()}


# -- the boot timeline ----------------------------------------------------------------------
def test_timeline_finds_every_boot_of_the_fixture_run() -> None:
    boots = parse_boots(FIXTURES / LATEST / "console.log")
    assert [(b.source, b.kind) for b in boots] == [
        ("power-on", "cold"),
        ("restore", "restore"),
        ("restore", "restore"),
        ("reboot", "reboot"),
        ("restore", "restore"),
        ("power-on", "power-cycle"),
        ("restore", "restore"),
    ]
    cold, reboot, cycle = boots[0], boots[3], boots[5]
    # "smpboot: Booting Node 0" at 5.612 s is the kernel, not the bootloader.
    assert stages(cold) == {
        "firmware": 2.841, "bootloader": 3.905, "kernel": 5.377, "userspace": 9.802, "login": 19.418, "ssh": 22.507,
    }  # fmt: skip
    assert cold.accelerator == "tcg" and cold.reported_ssh_s == 22.5 and cold.ended_by == "ssh ready"
    assert cold.start_wall == "21:50:03.512" and cold.stages["kernel"].wall == "21:50:08.889"
    assert "Linux version 6.1.0-26-amd64" in cold.stages["kernel"].text
    assert cold.segments() == [
        ("firmware", 0.0, 3.905), ("bootloader", 3.905, 5.377), ("kernel", 5.377, 9.802),
        ("userspace", 9.802, 19.418), ("login", 19.418, 22.507),
    ]  # fmt: skip
    # A reboot counts from the reset ("reboot: Restarting system"), not from the power on.
    assert reboot.start_wall == "21:51:04.410"
    assert stages(reboot) == {
        "firmware": 2.614, "bootloader": 3.732, "kernel": 5.113, "userspace": 9.447, "login": 19.004, "ssh": 21.713,
    }  # fmt: skip
    assert stages(cycle) == {
        "firmware": 2.903, "bootloader": 4.012, "kernel": 5.544, "userspace": 10.102, "login": 19.874, "ssh": 23.4,
    }  # fmt: skip
    assert stages(boots[1]) == {"ssh": 0.932} and boots[1].reported_ssh_s == 0.9
    assert [b.ended_by for b in boots] == ["ssh ready"] * 7


def test_timeline_edge_cases(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text(
        # a board's serial log: no power on marker, GRUB quiet
        "[23:59:58.000 +   0.000] U-Boot 2024.01\n"
        "[23:59:59.500 +   1.500] [    0.000000] Linux version 6.1.77-v8\n"
        "[00:00:04.000 +   6.000] Welcome to balenaOS 5.3.10!\n"
        "[00:00:09.250 +  11.250] ==== testbed: ssh ready after 11.2s (cold) ====\n"
        # a test prints /proc/version over the serial console: not a reboot
        "[00:00:10.000 +  12.000] Linux version 6.1.77-v8 (builder@host) #1 SMP\n"
        "a line without a stamp\n"
        "[00:00:20.000 +   0.000] ==== testbed: power on (kvm) ====\n"
        "[00:00:21.000 +   1.000] BdsDxe: loading Boot0001\n"
        "[00:00:23.000 +   3.000] [    0.000000] Linux version 6.1.77-v8\n"
        "[00:00:25.000 +   5.000] [    1.900000] Kernel panic - not syncing: VFS: Unable to mount root fs\n"
        "[00:00:40.000 +  20.000] ==== testbed: power cut ====\n"
        "[00:00:40.100 +  20.100] stray bytes after the cut\n"
    )
    boots = parse_boots(log)
    assert len(boots) == 2
    board, panic = boots
    assert board.source == "log-start" and board.kind == "cold"
    assert stages(board) == {"firmware": 0.0, "kernel": 1.5, "userspace": 6.0, "ssh": 11.25}
    assert panic.accelerator == "kvm" and not panic.reached_ssh and panic.ended_by == "power cut"
    assert stages(panic) == {"firmware": 1.0, "kernel": 3.0}
    # The boot that never got to SSH is drawn up to its last line, stuck in the kernel.
    assert panic.segments() == [("firmware", 0.0, 3.0), ("kernel", 3.0, 20.0)]


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
    assert "This run has no console.log" in board and "31.9 s" in board and "38.2 s" in board
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
