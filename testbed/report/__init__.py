"""The run report: a JSON model written by the plugin, and JUnit XML derived from it.

``report.json`` schema (version 1)::

    schema: 1
    device: str                       profile name
    run_id: str
    image: {path, sha256, format}
    started, finished: ISO 8601 UTC
    result: passed | failed | error   (error: the lab failed, not the device)
    counts: {passed, failed, error, skipped}
    facts: {...}                      device and machine facts (OS, kernel, accelerator)
    timings: {boot_to_ssh_s, boots: [{kind, ssh_ready_s, login_prompt_s}]}
    tests: [{nodeid, outcome, duration_s, message, evidence: [{transport, command,
             exit_code, stdout, stderr, started, duration_s}]}]
    testbed: {version, host}
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# Exit codes of a testbed run: CI tells a device failure from a lab fault by these.
EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_USAGE = 4
EXIT_INFRA = 75  # EX_TEMPFAIL: the lab failed, retrying may help


@dataclass
class TestRecord:
    nodeid: str
    outcome: str = "passed"
    duration_s: float = 0.0
    message: str = ""
    kind: str = ""  # for failures/errors: dut | infra | config | assertion
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "outcome": self.outcome,
            "duration_s": round(self.duration_s, 3),
            "message": self.message,
            "kind": self.kind,
            "evidence": self.evidence,
        }


def overall_result(tests: list[TestRecord]) -> str:
    outcomes = {t.outcome for t in tests}
    if "failed" in outcomes:
        return "failed"
    if "error" in outcomes:
        return "error"
    return "passed"


def exit_code_for(result: str) -> int:
    return {"passed": EXIT_PASSED, "failed": EXIT_FAILED, "error": EXIT_INFRA}[result]


def counts(tests: list[TestRecord]) -> dict[str, int]:
    out = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for t in tests:
        out[t.outcome] = out.get(t.outcome, 0) + 1
    return out


def write_json(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def write_junit(path: Path, report: dict[str, Any]) -> None:
    """JUnit XML with the device facts as properties; lab faults are <error>, device faults <failure>."""
    c = report["counts"]
    suite = ET.Element(
        "testsuite",
        name=f"testbed.{report['device']}",
        tests=str(len(report["tests"])),
        failures=str(c["failed"]),
        errors=str(c["error"]),
        skipped=str(c["skipped"]),
        timestamp=report["started"],
        time=f"{sum(t['duration_s'] for t in report['tests']):.3f}",
        hostname=report["testbed"]["host"],
    )
    props = ET.SubElement(suite, "properties")
    facts = report.get("facts", {})
    for name, value in (
        ("device", report["device"]),
        ("image", report["image"]["path"]),
        ("image_sha256", report["image"]["sha256"]),
        ("os_version", facts.get("pretty_name", "")),
        ("kernel", facts.get("kernel", "")),
        ("accelerator", facts.get("accelerator", "")),
        ("testbed_version", report["testbed"]["version"]),
        ("boot_to_ssh_s", str(report["timings"].get("boot_to_ssh_s"))),
    ):
        ET.SubElement(props, "property", name=name, value=str(value))
    for t in report["tests"]:
        module, _, name = t["nodeid"].rpartition("::")
        case = ET.SubElement(
            suite, "testcase", classname=module.replace("/", ".").removesuffix(".py"), name=name,
            time=f"{t['duration_s']:.3f}",
        )  # fmt: skip
        if t["outcome"] == "failed":
            ET.SubElement(case, "failure", message=_first_line(t["message"])).text = t["message"]
        elif t["outcome"] == "error":
            ET.SubElement(case, "error", message=_first_line(t["message"]), type=t["kind"]).text = t["message"]
        elif t["outcome"] == "skipped":
            ET.SubElement(case, "skipped", message=_first_line(t["message"]))
        if t["evidence"]:
            lines = [
                f"[{e['transport']}] $ {e['command']}  (exit {e['exit_code']}, {e['duration_s']}s)\n{e['stdout']}{e['stderr']}"
                for e in t["evidence"]
            ]
            ET.SubElement(case, "system-out").text = "\n".join(lines)
    tree = ET.ElementTree(ET.Element("testsuites"))
    tree.getroot().append(suite)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def point_latest(run_dir: Path) -> None:
    """``reports/<device>/latest`` -> this run (relative, so the tree can be moved)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    tmp.replace(link)
