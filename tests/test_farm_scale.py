"""Scale, simulated, in short: benchmarks/farm_scale.py's checks on a small farm.

A real labgrid coordinator, 12 places whose consoles are ptys answering like booted
devices, 4 client processes running short jobs through real lease keepers for 45 s while
clients are killed with ``kill -9`` (alone, and with their keeper), lease ttl 5 s. The
three promises must hold: no place held by two jobs, no lock leaked past its lease, a
verdict for every job.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest

from testbed.errors import ConfigError
from tests.conftest import REPO


def require_labgrid() -> None:
    """Fail with CI=true, skip elsewhere, when labgrid (its coordinator) is not installed."""
    try:
        # testbed.farm first: it turns gRPC's fork handlers off, which only works before gRPC
        # is imported (with them on, a client forked while the session is busy may crash).
        from testbed.farm.virtual import labgrid_tool

        importlib.import_module("labgrid.remote.client")  # what testbed's coordinator session uses
        labgrid_tool("labgrid-coordinator")
    except (ImportError, ConfigError) as exc:
        message = f"needs labgrid>=26 and labgrid-coordinator (pip install '.[farm]'): {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)


def load_benchmark() -> ModuleType:
    """benchmarks/ is no package: the script is loaded from its path."""
    path = REPO / "benchmarks" / "farm_scale.py"
    spec = importlib.util.spec_from_file_location("farm_scale", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_farm_under_random_kills_keeps_its_three_promises() -> None:
    require_labgrid()
    scale = load_benchmark()
    options = scale.Options(places=12, clients=4, minutes=0.75, kill_every=6.0, ttl=5.0, margin=10.0, wait=60.0, seed=7)
    result = scale.run(options)
    text = scale.report(result)

    for name, check in result.checks.items():
        assert check.ok, f"check {name} failed:\n{text}"
    # Both kinds of kill happened (they alternate), and jobs ran between them.
    assert result.kills[scale.KILL_CLIENT] >= 1 and result.kills[scale.KILL_GROUP] >= 1, text
    assert result.jobs["passed"] >= 10, text
    # A job that was not killed passed: its place was its own and its console answered.
    assert result.jobs["failed"] == 0, text
    # Every place whose keeper was killed with its client stayed locked until a job (or the
    # final acquire) broke its expired lease: nothing else frees it.
    breaks = result.broken_leases["by_jobs"] + result.broken_leases["at_end"]
    assert breaks >= result.kills_holding[scale.KILL_GROUP], text
    assert result.coordinator_rss_mb is not None and result.coordinator_rss_mb > 0, text
