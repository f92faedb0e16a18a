"""The run report: a JSON model written by the plugin, and JUnit XML derived from it.

``report.json`` schema (version 2; built by ``testbed.report.model.build_report``)::

    schema: 2
    device: str                       profile name
    run_id: str
    image: {path, sha256, format}
    started, finished: ISO 8601 UTC
    result: passed | failed | error   (error: the lab or the input stood in the way, not the device)
    counts: {passed, failed, error, skipped}
    facts: {...}                      device and machine facts (OS, kernel, accelerator)
    timings: {boot_to_ssh_s, boots: [{device, kind, started, accelerator, ended_by, end_s,
              stages: [{stage, at_s, detail}], ssh_ready_s, login_prompt_s, firmware_s, kernel_s}]}
    tests: [{nodeid, outcome, duration_s, message, kind (dut | assertion | infra | config | test),
             recovered (empty, or how the device was restored after a lab fault before this check),
             evidence: [{kind (command | step | note | offline), transport, command,
             exit_code, stdout, stderr, started, duration_s, device}]}]
    testbed: {version, host}
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from testbed.report.model import (
    EXIT_FAILED,
    EXIT_INFRA,
    EXIT_PASSED,
    EXIT_USAGE,
    SCHEMA_VERSION,
    TestRecord,
    counts,
    exit_code,
    overall_result,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_INFRA",
    "EXIT_PASSED",
    "EXIT_USAGE",
    "SCHEMA_VERSION",
    "TestRecord",
    "counts",
    "exit_code",
    "overall_result",
    "point_latest",
    "write_json",
    "write_junit",
]


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
    root = ET.Element("testsuites")
    root.append(suite)
    tree = ET.ElementTree(root)
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
