"""What systemd promises about the device's services: critical services protected from the
kernel's OOM killer, and sandboxed services running in a mount namespace of their own.

The units and bounds come from the profile (``services:``)."""

from __future__ import annotations

import shlex

import pytest

from testbed.dut import DUT
from testbed.profile import Profile

# One line per unit: unit, main PID (0: not running), configured OOMScoreAdjust, the main
# process's oom_score_adj and mount namespace (empty when not running), and every other
# process of the unit's control group with its oom_score_adj.
_UNIT_STATE = r"""
for u in {units}; do
  pid=$(systemctl show -p MainPID --value "$u"); cfg=$(systemctl show -p OOMScoreAdjust --value "$u")
  adj=; ns=; others=
  if [ "${{pid:-0}}" != 0 ]; then
    adj=$(cat /proc/$pid/oom_score_adj); ns=$(readlink /proc/$pid/ns/mnt)
    cg=$(systemctl show -p ControlGroup --value "$u")
    for p in $(cat "/sys/fs/cgroup$cg/cgroup.procs" 2>/dev/null); do
      [ "$p" = "$pid" ] || others="$others $p:$(cat /proc/$p/oom_score_adj 2>/dev/null)"
    done
  fi
  printf '%s|%s|%s|%s|%s|%s\n' "$u" "${{pid:-0}}" "$cfg" "$adj" "$ns" "$others"
done
"""


def _unit_states(dut: DUT, units: list[str]) -> dict[str, list[str]]:
    out = dut.run(_UNIT_STATE.format(units=" ".join(shlex.quote(u) for u in units)), check=True).stdout
    return {fields[0]: fields[1:] for fields in (line.split("|") for line in out.splitlines() if "|" in line)}


def test_critical_services_are_protected_from_the_oom_killer(dut: DUT, device_profile: Profile) -> None:
    bounds = {b.unit: b.max_oom_score_adj for b in device_profile.services.oom_protected}
    if not bounds:
        pytest.skip(f"{device_profile.name} lists no critical services (profile services.oom_protected)")
    states = _unit_states(dut, list(bounds))
    running = {u for u, (pid, *_rest) in states.items() if pid != "0"}
    assert running, (
        f"none of the critical services of {device_profile.name} runs ({', '.join(bounds)}): "
        "the profile's services.oom_protected must name this image's units"
    )
    wrong = []
    for unit, bound in bounds.items():
        pid, configured, adj, _ns, others = states[unit]
        if pid != "0":
            if int(adj) > bound:
                wrong.append(f"{unit} (PID {pid}) runs with oom_score_adj {adj}, above {bound}")
            # the unit's other processes (workers, children) get the unit's setting too
            pairs = [p.split(":", 1) for p in others.split()]
            loose = [f"{p}:{a}" for p, a in pairs if a and int(a) > max(bound, int(configured))]
            if loose:
                wrong.append(f"{unit}'s processes {' '.join(loose)} (PID:oom_score_adj) are above {bound}")
        elif int(configured) > bound:
            wrong.append(f"{unit} (not running now) would start with OOMScoreAdjust={configured}, above {bound}")
    promise = "critical services must be the OOM killer's last choice (systemd OOMScoreAdjust=)"
    assert not wrong, f"{promise}: " + "; ".join(wrong)


def test_sandboxed_services_run_in_their_own_mount_namespace(dut: DUT, device_profile: Profile) -> None:
    units = device_profile.services.own_mount_namespace
    if not units:
        pytest.skip(f"{device_profile.name} lists no sandboxed services (profile services.own_mount_namespace)")
    init_ns = dut.run("readlink /proc/1/ns/mnt", check=True).stdout.strip()
    states = _unit_states(dut, units)
    not_running = [u for u in units if states[u][0] == "0"]
    shared = [f"{u} (PID {states[u][0]})" for u in units if states[u][0] != "0" and states[u][3] == init_ns]
    assert not not_running, f"services listed in the profile's services.own_mount_namespace do not run: {not_running}"
    assert not shared, (
        f"these services share PID 1's mount namespace ({init_ns}) instead of running in their own "
        f"(PrivateTmp=, ProtectSystem=, ...): {', '.join(shared)}"
    )
