"""Speed figures for testbed, each next to the raw tool it wraps, measured in one run.

    python benchmarks/bench.py [--image PATH] [--device NAME] [--rounds N] [--suites | --certify]

Prints: cold boot to SSH ready (testbed vs QEMU started by hand + first successful ssh),
snapshot restore to ready, and per-command round trips over SSH (vs raw paramiko) and over
the serial console (vs raw pexpect), and a reboot to SSH ready with QEMU restarted on the reset
(testbed's default) vs the machine reset in place (``qemu.reset: warm``). Ratios, not absolute
times, are what to compare. The reference image's cold boot is also set beside a minimal Debian's
(``python -m testbed.reference --variant minimal``: minbase, systemd, udev, openssh-server, the
same kernel, bootloader and firmware; built once and cached), both through testbed and both by
hand, with each boot's stages.

With ``--suites`` it also times whole suite runs, in the same run: the OS suites in both modes
(issue target 5 min) and the hup suite with 5 power-cut trials (target 6 min), each also as a
number of cold boots of this run (the suite's cost in the unit that dominates it).

With ``--arch`` it prints the aarch64 figures next to x86_64's, in the same run: cold boot to SSH
split into its stages (firmware, bootloader, kernel, userspace), snapshot restore to SSH, and with
``--arch-suites`` one OS-suite run (development mode, the hup suite aside), each as a ratio;
``--cpu-models cortex-a72,cortex-a57,max`` adds a cold boot of the aarch64 guest per CPU model.

With ``--slots 1,2,3`` it boots ``--guests`` devices at once under each boot budget
(``TESTBED_BOOT_SLOTS``) and prints the time until all answer SSH, and each guest's boot.

With ``--certify`` it prints only the certification figures: ``python -m testbed certify`` from an
empty warm store, the same command again (warm devices), that again with the modes one after the
other (``--one-mode-at-a-time``: what side by side gains, as a ratio), and ``suites/smoke`` warm,
each with the boots and snapshot restores it cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paramiko
import pexpect.fdpexpect

from testbed import reference
from testbed.dut import open_dut
from testbed.errors import DutError, InfraError
from testbed.machines.qemu import probe_accel
from testbed.profile import load_profile
from testbed.util import OwnedProcess, free_port


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _exec(transport: paramiko.Transport, command: str) -> int:
    chan = transport.open_session()
    chan.exec_command(command)
    code = chan.recv_exit_status()
    chan.close()
    return code


def raw_qemu(profile, image: Path, accel: str, rounds: int, serial: bool = True) -> dict[str, float]:
    """QEMU as a person would start it, then paramiko and pexpect used directly (``serial``:
    also log in on the serial console and time its round trips)."""
    q = profile.qemu
    work = Path(tempfile.mkdtemp(prefix="bench-raw-"))
    try:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image), str(work / "d.qcow2")],
            check=True,
        )
        shutil.copyfile(q.firmware.vars, work / "vars.fd")
        port = free_port()
        t0 = time.monotonic()
        argv = [
            q.binary, "-accel", accel, "-M", q.machine, "-cpu", q.cpu, "-m", str(q.memory_mib), "-smp", str(q.cpus),
            "-display", "none", "-vga", "std",
            "-drive", f"if=pflash,format=raw,readonly=on,file={q.firmware.code}",
            "-drive", f"if=pflash,format=raw,file={work / 'vars.fd'}",
            "-drive", f"if=virtio,format=qcow2,file={work / 'd.qcow2'}",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22222", "-device", "virtio-net-pci,netdev=n0",
            "-chardev", f"socket,id=s0,path={work / 'ser.sock'},server=on,wait=off", "-serial", "chardev:s0",
        ]  # fmt: skip
        with OwnedProcess(argv) as _proc:
            # The serial socket must be drained at all times or the guest stalls on console
            # output: a thread reads it until SSH is up, then pexpect takes over.
            while not (work / "ser.sock").exists():
                time.sleep(0.01)
            ser = socket.socket(socket.AF_UNIX)
            ser.connect(str(work / "ser.sock"))
            ser.settimeout(0.1)
            stop = threading.Event()
            tail = bytearray()  # the console's last bytes, shown if SSH never answers

            def drain() -> None:
                while not stop.is_set():
                    try:
                        data = ser.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        return
                    tail.extend(data)
                    del tail[:-4096]

            drainer = threading.Thread(target=drain, daemon=True)
            drainer.start()
            client = None
            deadline = t0 + profile.timeouts.boot_to_ssh
            while client is None:
                if time.monotonic() > deadline:
                    last = tail.decode(errors="replace").splitlines()[-15:]
                    raise SystemExit(f"{image}: no SSH within {profile.timeouts.boot_to_ssh} s (timeouts.boot_to_ssh); "
                                     "its console's last lines:\n" + "\n".join(last))  # fmt: skip
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    t = paramiko.Transport(sock)
                    t.start_client(timeout=5)
                    t.auth_none("root")
                    _exec(t, "true")
                    client = t
                except Exception:  # noqa: BLE001 - not up yet
                    time.sleep(0.2)
            stop.set()
            drainer.join()
            ser.settimeout(None)
            child = pexpect.fdpexpect.fdspawn(ser.fileno(), encoding="utf-8", codec_errors="replace", timeout=300)
            boot = time.monotonic() - t0
            ssh = []
            for _ in range(rounds):
                s = time.monotonic()
                _exec(client, "true")
                ssh.append(time.monotonic() - s)
            if not serial:
                client.close()
                return {"boot": boot, "ssh": median_ms(ssh)}
            child.sendline("")
            child.expect("login: ?$", timeout=120)
            child.sendline("root")
            child.expect(r"[#$] ?$", timeout=60)
            child.sendline("stty -echo; PS1='P# '")
            child.expect("P# ", timeout=60)
            serial = []
            for i in range(rounds):
                s = time.monotonic()
                child.sendline(f"true; echo R{i}:$?")
                child.expect(f"R{i}:0", timeout=60)
                serial.append(time.monotonic() - s)
            client.close()
        return {"boot": boot, "ssh": median_ms(ssh), "serial": median_ms(serial)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def with_testbed(profile, image: Path, rounds: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-tb-"))
    dut = open_dut(profile, image, "raw", work / "console.log")
    try:
        t0 = time.monotonic()
        dut.power_on()
        boot = time.monotonic() - t0
        save = dut.save_snapshot("ready")
        restores = []
        for _ in range(max(3, rounds // 10)):
            s = time.monotonic()
            dut.restore("ready")
            restores.append(time.monotonic() - s)
        ssh = []
        for _ in range(rounds):
            ssh.append(dut.run("true").duration_s)
        dut.console.login()
        serial = [dut.console.run("true").duration_s for _ in range(rounds)]
        reboot = dut.reboot().ssh_ready_s or 0.0
        return {"boot": boot, "save": save, "restore": statistics.median(restores), "ssh": median_ms(ssh),
                "serial": median_ms(serial), "reboot": reboot}  # fmt: skip
    finally:
        dut.close()
        shutil.rmtree(work, ignore_errors=True)


def warm_reboot(profile, image: Path) -> str:
    """A reboot to SSH ready with the machine reset in place (``qemu.reset: warm``)."""
    warm = profile.model_copy(update={"qemu": profile.qemu.model_copy(update={"reset": "warm"})})
    work = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    dut = open_dut(warm, image, "raw", work / "console.log")
    try:
        dut.power_on()
        return f"{dut.reboot().ssh_ready_s:.1f} s (reset in place)"
    except (DutError, InfraError) as exc:
        return f"failed: {str(exc).splitlines()[0][:60]}"
    finally:
        dut.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path)
    ap.add_argument("--device", default="qemu-x86_64")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--suites", action="store_true", help="also time the OS suites (both modes) and the hup suite")
    ap.add_argument(
        "--certify",
        action="store_true",
        help="only the certification figures: certify cold, certify again (warm devices), one suite warm",
    )
    ap.add_argument("--arch", action="store_true", help="aarch64 next to x86_64: boot, its stages, restore")
    ap.add_argument("--arch-suites", action="store_true", help="with --arch: one OS-suite run on each")
    ap.add_argument("--cpu-models", default="", help="with --arch: aarch64 CPU models to boot, comma-separated")
    ap.add_argument("--slots", default="", help="boot budgets to compare, comma-separated (e.g. 1,2,3)")
    ap.add_argument("--guests", type=int, default=3, help="with --slots: devices powered on at once")
    args = ap.parse_args()
    if args.slots:
        slots_figures(args.device, args.image, [int(n) for n in args.slots.split(",")], args.guests)
        return
    if args.arch:
        arch_figures(args.arch_suites, [m for m in args.cpu_models.split(",") if m])
        return
    if args.certify:
        certify_figures(args.device, args.image)
        return
    profile = load_profile(args.device)
    image = (args.image or reference.build()).resolve()
    accel, note = probe_accel(profile)
    print(f"image {image}\naccelerator {accel}{' (' + note + ')' if note else ''}\n")
    raw = raw_qemu(profile, image, accel, args.rounds)
    tb = with_testbed(profile, image, args.rounds)
    # The yardstick of the boot: a minimal Debian (minbase, systemd, udev, openssh-server) with
    # the same kernel, bootloader and firmware, built by the same builder (cached), started by hand.
    minimal = reference.build(reference.BuildOptions(arch=profile.arch, variant="minimal"), log=lambda _l: None)
    debian = raw_qemu(profile, minimal, accel, 3, serial=False)
    stages = {"reference": _one_device(profile, image), "minimal Debian": _one_device(profile, minimal)}
    rows = [
        ("cold boot to SSH ready", f"{tb['boot']:.2f} s", f"{raw['boot']:.2f} s (qemu by hand + first ssh)", tb["boot"] / raw["boot"], "<= 1.1"),
        ("cold boot vs minimal Debian", f"{stages['reference']['boot']:.2f} s", f"{stages['minimal Debian']['boot']:.2f} s (minimal Debian, by testbed)", stages["reference"]["boot"] / stages["minimal Debian"]["boot"], "<= 0.8"),
        ("... both by hand", f"{raw['boot']:.2f} s", f"{debian['boot']:.2f} s (minimal Debian, by hand)", raw["boot"] / debian["boot"], "<= 0.8"),
        ("snapshot restore to ready", f"{tb['restore']:.2f} s", f"(savevm {tb['save']:.2f} s)", None, "<= 1.5 s"),
        ("command round trip, SSH", f"{tb['ssh']:.1f} ms", f"{raw['ssh']:.1f} ms (paramiko exec)", tb["ssh"] / raw["ssh"], "<= 1.5"),
        ("command round trip, serial", f"{tb['serial']:.1f} ms", f"{raw['serial']:.1f} ms (pexpect)", tb["serial"] / raw["serial"], ""),
        ("reboot to SSH ready", f"{tb['reboot']:.1f} s", warm_reboot(profile, image), None, "< reset in place"),
    ]  # fmt: skip
    if args.suites:
        tmp = Path(tempfile.mkdtemp(prefix="testbed-bench-"))
        both = sum(
            _timed_pytest(["suites", "--ignore=suites/hup", "--mode", mode], args.device, args.image, tmp)
            for mode in ("development", "production")
        )
        hup = _timed_pytest(["suites/hup", "--hup-power-cuts", "5"], args.device, args.image, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        rows += [
            ("OS suites, both modes", f"{both / 60:.1f} min", f"= {both / raw['boot']:.1f} cold boots", None, "<= 5 min"),
            ("hup suite, 5 power cuts", f"{hup / 60:.1f} min", f"= {hup / raw['boot']:.1f} cold boots", None, "<= 6 min"),
        ]  # fmt: skip
    print(f"{'figure':28} {'testbed':>10}   {'raw':38} {'ratio':>6}  target")
    for name, ours, theirs, ratio, target in rows:
        r = f"{ratio:.2f}" if ratio is not None else "-"
        print(f"{name:28} {ours:>10}   {theirs:38} {r:>6}  {target}")
    print("\ncold boot by stage (s)  " + "".join(f"{name:>12}" for name in (*STAGES, "restore")))
    for name, figures in stages.items():
        print(f"{name:23} " + "".join(f"{figures.get(stage, float('nan')):12.2f}" for stage in (*STAGES, "restore")))


STAGES = ("firmware", "bootloader", "kernel", "userspace", "ssh")


def _one_device(profile, image: Path) -> dict[str, float]:
    """Cold boot to SSH (and where it went), then snapshot restores to SSH, of one device."""
    work = Path(tempfile.mkdtemp(prefix="bench-arch-"))
    dut = open_dut(profile, image, "raw", work / "console.log")
    try:
        t0 = time.monotonic()
        record = dut.power_on()
        figures = {"boot": time.monotonic() - t0}
        assert record is not None
        # Each stage's share: from its start to the next stage's (the last one ends at SSH).
        # The firmware's share counts from power on (its first console line comes late on x86_64).
        marks = [("firmware", 0.0), *((name, record.at(name)) for name in STAGES[1:])]
        marks = [(n, t) for n, t in marks if t is not None]
        for (name, at), (_next, until) in zip(marks, marks[1:], strict=False):
            figures[name] = until - at
        dut.save_snapshot("ready")
        restores = []
        for _ in range(3):
            s = time.monotonic()
            dut.restore("ready")
            restores.append(time.monotonic() - s)
        figures["restore"] = statistics.median(restores)
        return figures
    finally:
        dut.close()
        shutil.rmtree(work, ignore_errors=True)


def arch_figures(suites: bool, cpu_models: list[str]) -> None:
    """aarch64 next to x86_64 in one run, as ratios."""
    devices = {"x86_64": "qemu-x86_64", "aarch64": "qemu-aarch64"}
    images = {arch: reference.build(reference.BuildOptions(arch=arch), log=lambda _l: None) for arch in devices}
    got = {}
    for arch, device in devices.items():
        got[arch] = _one_device(load_profile(device), images[arch])
        print(f"{device}: cold boot to SSH {got[arch]['boot']:.1f} s, restore {got[arch]['restore']:.2f} s", flush=True)
    if suites:
        tmp = Path(tempfile.mkdtemp(prefix="testbed-bench-arch-"))
        for arch, device in devices.items():
            got[arch]["suite"] = _timed_pytest(
                ["suites", "--ignore=suites/hup", "--mode", "development"], device, images[arch], tmp
            )
        shutil.rmtree(tmp, ignore_errors=True)
    x, a = got["x86_64"], got["aarch64"]
    print(f"\n{'figure':30} {'x86_64':>9} {'aarch64':>9} {'ratio':>6}  target")
    rows = [("cold boot to SSH", "boot", "<= 2.5"), *((f"  of which {n}", n, "") for n in STAGES[:-1]),
            ("snapshot restore to SSH", "restore", ""), ("OS suites, development mode", "suite", "")]  # fmt: skip
    for name, key, target in rows:
        if key in x and key in a:
            ratio = f"{a[key] / x[key]:.2f}" if x[key] > 0 else "-"
            print(f"{name:30} {x[key]:>8.1f}s {a[key]:>8.1f}s {ratio:>6}  {target}")
    base = load_profile("qemu-aarch64")
    for model in cpu_models:
        profile = base.model_copy(update={"qemu": base.qemu.model_copy(update={"cpu": model})})
        fig = _one_device(profile, images["aarch64"])
        parts = ", ".join(f"{n} {fig[n]:.1f}" for n in STAGES[:-1] if n in fig)
        print(f"aarch64 -cpu {model:12} cold boot to SSH {fig['boot']:6.1f} s ({parts})", flush=True)


def slots_figures(device: str, image: Path | None, settings: list[int], guests: int) -> None:
    """``guests`` devices powered on at once, under each boot budget in ``settings``."""
    profile = load_profile(device)
    image = (image or reference.build(log=lambda _l: None)).resolve()
    print(f"{guests} guests of {device} powered on at once, {os.cpu_count()} host cores")
    for slots in settings:
        os.environ["TESTBED_BOOT_SLOTS"] = str(slots)
        work = Path(tempfile.mkdtemp(prefix="bench-slots-"))
        duts = [open_dut(profile, image, "raw", work / f"console-{i}.log", name=f"guest{i}") for i in range(guests)]
        boots: list[float] = []
        errors: list[str] = []

        def one(dut, boots: list[float], errors: list[str]) -> None:
            try:
                record = dut.power_on()
                boots.append(record.ssh_ready_s if record and record.ssh_ready_s else 0.0)
            except (DutError, InfraError) as exc:
                errors.append(str(exc).splitlines()[0])

        t0 = time.monotonic()
        threads = [threading.Thread(target=one, args=(d, boots, errors)) for d in duts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        for d in duts:
            d.close()
        shutil.rmtree(work, ignore_errors=True)
        each = ", ".join(f"{b:.0f}" for b in sorted(boots))
        print(f"budget {slots}: all {guests} ready in {wall:6.1f} s; each boot to SSH (s): {each}"
              + (f"; errors: {errors}" if errors else ""), flush=True)  # fmt: skip
    os.environ.pop("TESTBED_BOOT_SLOTS", None)


def _boots(report_dir: Path) -> tuple[int, int]:
    """Cold boots (power-ons, reboots, restarts) and snapshot restores the runs under ``report_dir`` made."""
    cold = restores = 0
    for path in report_dir.glob("*/*/report.json"):
        if path.parent.name == "latest":
            continue
        for boot in json.loads(path.read_text())["timings"]["boots"]:
            if boot.get("from_warm_device"):
                continue  # an earlier run's boot
            restores += boot.get("kind") == "restore"
            cold += boot.get("kind") != "restore"
    return cold, restores


def certify_figures(device: str, image: Path | None) -> None:
    """``python -m testbed certify`` from an empty warm store, the same again, then one suite warm."""
    tmp = Path(tempfile.mkdtemp(prefix="testbed-bench-certify-"))
    env = {**os.environ, "TESTBED_WARM_DIR": str(tmp / "warm")}
    extra = ["--image", str(image)] if image else []
    rows = []
    walls: dict[str, float] = {}
    try:
        for name, argv, target in (
            ("certify, cold", ["-m", "testbed", "certify", "--device", device, *extra], "<= 12 min"),
            ("certify again, warm", ["-m", "testbed", "certify", "--device", device, *extra], "<= 6 min"),
            # The same, the modes one after the other: what running them side by side gains.
            (
                "... one mode at a time",
                ["-m", "testbed", "certify", "--one-mode-at-a-time", "--device", device, *extra],
                "(side by side / this)",
            ),
            (
                "suites/smoke, warm",
                ["-m", "pytest", "-q", "suites/smoke", "--warm", "--mode", "development", "--device", device, *extra],
                "<= 30 s",
            ),
        ):
            reports = tmp / name.replace(" ", "-").replace(",", "")
            t0 = time.monotonic()
            done = subprocess.run([sys.executable, *argv, "--report-dir", str(reports)], capture_output=True,
                                  text=True, env=env, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
            seconds = time.monotonic() - t0
            if done.returncode != 0:
                raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
            cold, restores = _boots(reports)
            shown = f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"
            if name == "... one mode at a time":
                target = f"side by side / this = {walls['certify again, warm'] / seconds:.2f}"
            walls[name] = seconds
            rows.append((name, shown, f"{cold} boots, {restores} restores", target))
            print(f"{name}: {seconds:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'figure':24} {'wall':>9}   {'cost':26} target")
    for name, wall, cost, target in rows:
        print(f"{name:24} {wall:>9}   {cost:26} {target}")


def _timed_pytest(args: list[str], device: str, image: Path | None, tmp: Path) -> float:
    """Wall time of one pytest run of the suites (it must pass: a failing run is no figure)."""
    argv = [sys.executable, "-m", "pytest", "-q", *args, "--device", device, "--report-dir", str(tmp)]
    if image is not None:
        argv += ["--image", str(image)]
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    print(f"{' '.join(args)}: {seconds:.0f} s")
    return seconds


if __name__ == "__main__":
    main()
