"""Development and production modes, each checked against the mode the device booted in.

Development: passwordless root over SSH on 22222, a Docker API on 2375, gettys on tty1 and
the serial console. Production: passwordless login refused, keys from config.json accepted,
2375 closed, no getty.
"""

from __future__ import annotations

import http.client
import json

import pytest

from testbed.dut import DUT
from testbed.profile import Profile


@pytest.fixture(scope="module")
def mode(dut: DUT) -> str:
    return "development" if dut.development_mode else "production"


def _http_get(host: str, port: int, path: str) -> tuple[int, str] | str:
    """(status, body), or the reason no HTTP answer came."""
    conn = http.client.HTTPConnection(host, port, timeout=15)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def test_passwordless_root_login_matches_mode(dut: DUT, mode: str) -> None:
    outcome = dut.try_ssh_login("without a key or password")
    if mode == "development":
        assert outcome.startswith("accepted"), f"development mode must allow passwordless root on SSH; {outcome}"
    else:
        assert outcome.startswith("refused"), f"production mode must refuse passwordless root on SSH; it was {outcome}"


# sshd's effective settings (`sshd -T`) that decide who may log in, and the values each mode
# needs: production takes keys only (no password of any kind, no empty password, root only
# with a key); development lets root in without a password.
PRODUCTION_SSHD = {
    "passwordauthentication": {"no"},
    "kbdinteractiveauthentication": {"no"},
    "permitemptypasswords": {"no"},
    "permitrootlogin": {"prohibit-password", "without-password", "forced-commands-only", "no"},
    "pubkeyauthentication": {"yes"},
    "authenticationmethods": {"any", "publickey"},
}
DEVELOPMENT_SSHD = {"permitemptypasswords": {"yes"}, "permitrootlogin": {"yes"}}


def test_sshd_offers_what_the_mode_allows(dut: DUT, mode: str) -> None:
    settings = dict(line.split(" ", 1) for line in dut.run("sshd -T", check=True).stdout.splitlines() if " " in line)
    wanted = PRODUCTION_SSHD if mode == "production" else DEVELOPMENT_SSHD
    wrong = {k: settings.get(k, "(not set)") for k, ok in wanted.items() if settings.get(k) not in ok}
    assert not wrong, f"{mode} mode: sshd's effective settings (`sshd -T`) must be " + ", ".join(
        f"{k} {'|'.join(sorted(wanted[k]))} (is {v})" for k, v in wrong.items()
    )
    if mode == "production":
        offered = dut.ssh_offered_methods()
        assert offered == ["publickey"], (
            f"production mode must offer publickey authentication only; after `none` sshd offers {', '.join(offered)}"
        )


def test_key_from_config_json_logs_in(dut: DUT) -> None:
    outcome = dut.try_ssh_login("with the key listed in config.json os.sshKeys", key=dut.key, methods=("publickey",))
    assert outcome == "accepted (publickey)", f"a key listed in config.json os.sshKeys must log in; {outcome}"


def test_engine_api_matches_mode(dut: DUT, device_profile: Profile, mode: str) -> None:
    port = device_profile.dev.engine_port
    listening = dut.run(f"ss -Htln 'sport = :{port}'").stdout.strip()
    host, fwd = dut.endpoint("engine")
    ping = _http_get(host, fwd, "/_ping")
    dut.record_note(f"GET http://{host}:{fwd}/_ping (forwarded to the device's {port})", repr(ping))
    if mode == "development":
        assert ping == (200, "OK"), f"development mode must answer the Docker API /_ping on {port} with OK; got {ping}"
        version = _http_get(host, fwd, "/version")
        dut.record_note(f"GET http://{host}:{fwd}/version", repr(version))
        assert isinstance(version, tuple) and version[0] == 200, f"/version on {port} failed: {version}"
        info = json.loads(version[1])
        assert info.get("ApiVersion") and info.get("Version"), f"/version on {port} lacks Version/ApiVersion: {info}"
    else:
        assert not listening, f"production mode must not listen on {port}; `ss -tln` shows: {listening}"
        assert not isinstance(ping, tuple), f"production mode must not answer on {port}; /_ping gave {ping}"


def test_gettys_match_mode(dut: DUT, device_profile: Profile, mode: str) -> None:
    units = " ".join(device_profile.dev.gettys)
    states = dut.run(f"systemctl is-active {units}").stdout.split()
    found = dict(zip(device_profile.dev.gettys, states, strict=False))
    if mode == "development":
        inactive = [u for u, s in found.items() if s != "active"]
        assert not inactive, f"development mode must run {device_profile.dev.gettys}; not active: {found}"
        # The serial console's tty is the profile's serial getty's (ttyS0 on x86, ttyAMA0 on arm64 virt).
        serial = [u.removeprefix("serial-getty@").removesuffix(".service") for u in device_profile.dev.gettys
                  if u.startswith("serial-getty@")]  # fmt: skip
        login = dut.console.run("tty")
        assert login.exit_code == 0 and login.stdout.strip() in [f"/dev/{tty}" for tty in serial], (
            f"a root login on the serial console ({', '.join(serial) or 'no serial getty in the profile'}) "
            f"must give a shell; `tty` said {login.stdout!r}"
        )
    else:
        active = [u for u, s in found.items() if s == "active"]
        assert not active, f"production mode must not run a getty; active: {active}"
