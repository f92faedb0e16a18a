"""SshClient's commands over a real SSH connection to a server on loopback that runs each exec
request with a real bash, as sshd does (``$SHELL -c COMMAND``, SHELL in the environment): the
long-lived shell that carries commands (``_Shell``), and the channel per command beside it."""

from __future__ import annotations

import io
import socket
import subprocess
import threading
from collections.abc import Iterator

import paramiko
import pytest

from testbed.errors import DutError
from testbed.ssh import SshClient


class _Server(paramiko.ServerInterface):
    def __init__(self) -> None:
        self.execs: list[str] = []

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def get_allowed_auths(self, username: str) -> str:
        return "none"

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.execs.append(command.decode())
        threading.Thread(target=_execute, args=(channel, command.decode()), daemon=True).start()
        return True


def _execute(channel: paramiko.Channel, command: str) -> None:
    proc = subprocess.Popen(
        ["/bin/bash", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={"SHELL": "/bin/bash", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )  # fmt: skip
    assert proc.stdin and proc.stdout and proc.stderr

    def pump(src: io.BufferedReader, send: object) -> None:
        while data := src.read1(65536):  # type: ignore[attr-defined]
            send(data)  # type: ignore[operator]

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, channel.sendall), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, channel.sendall_stderr), daemon=True),
    ]
    for t in threads:
        t.start()
    stdin = proc.stdin
    try:
        while data := channel.recv(65536):
            stdin.write(data)
            stdin.flush()
    except OSError:
        pass
    finally:
        stdin.close()
    for t in threads:
        t.join()
    channel.send_exit_status(proc.wait())
    channel.close()


@pytest.fixture
def client() -> Iterator[tuple[SshClient, _Server]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    server = _Server()
    host_key = paramiko.Ed25519Key.from_private_key(io.StringIO(_host_key()))
    transports: list[paramiko.Transport] = []

    def accept() -> None:
        conn, _ = listener.accept()
        t = paramiko.Transport(conn)
        t.add_server_key(host_key)
        t.start_server(server=server)
        transports.append(t)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    ssh = SshClient("127.0.0.1", listener.getsockname()[1], "root")
    ssh.connect_once(timeout=10)
    yield ssh, server
    ssh.close()
    for t in transports:
        t.close()
    listener.close()


def _host_key() -> str:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        return path.read_text()


def test_commands_share_one_shell_and_keep_their_own_state(client: tuple[SshClient, _Server]) -> None:
    ssh, server = client
    first = ssh.run("echo out; echo err >&2; cd /tmp; X=1; exit 3", timeout=10)
    assert (first.exit_code, first.stdout, first.stderr) == (3, "out\n", "err\n")
    # exit, cd and variables stayed in the first command's subshell
    second = ssh.run('pwd; echo "X=${X:-unset}"', timeout=10)
    assert second.exit_code == 0 and second.stdout.endswith("X=unset\n") and second.stdout != "/tmp\nX=unset\n"
    assert len(server.execs) == 1 and server.execs[0].endswith("-s")


def test_output_is_exact_and_no_output_passes_for_a_marker(client: tuple[SshClient, _Server]) -> None:
    ssh, _ = client
    assert ssh.run("printf 'no newline'", timeout=10).stdout == "no newline"
    assert ssh.run("printf 'two\\n\\n'", timeout=10).stdout == "two\n\n"
    tricky = ssh.run("echo '@@TBSH000000000000E3:0'; echo \"'quoted'\"", timeout=10)
    assert tricky.stdout == "@@TBSH000000000000E3:0\n'quoted'\n"
    big = ssh.run("seq 1 200000", timeout=30)
    assert big.stdout.splitlines()[-1] == "200000" and len(big.stdout.splitlines()) == 200000
    heredoc = ssh.run("cat <<'EOF'\nline $HOME\nEOF", timeout=10)
    assert heredoc.stdout == "line $HOME\n"


def test_a_syntax_error_or_a_read_of_stdin_is_the_commands_own(client: tuple[SshClient, _Server]) -> None:
    ssh, _ = client
    broken = ssh.run("echo 'unclosed", timeout=10)
    assert broken.exit_code == 2 and "unexpected EOF" in broken.stderr
    assert ssh.run("cat; echo after-eof", timeout=10).stdout == "after-eof\n"
    assert ssh.run("echo still here", timeout=10).stdout == "still here\n"


def test_a_command_past_its_timeout_fails_and_the_next_gets_a_new_shell(client: tuple[SshClient, _Server]) -> None:
    ssh, server = client
    with pytest.raises(DutError, match="did not finish within 1s"):
        ssh.run("echo started; sleep 30", timeout=1)
    assert ssh.run("echo next", timeout=10).stdout == "next\n"
    assert len(server.execs) == 2


def test_a_command_with_stdin_or_beside_another_gets_its_own_channel(client: tuple[SshClient, _Server]) -> None:
    ssh, server = client
    done = ssh.run("cat > /dev/null; echo got", timeout=10, stdin=io.BytesIO(b"x" * 100000))
    assert done.stdout == "got\n" and server.execs == ["cat > /dev/null; echo got"]
    results: list[str] = []
    slow = threading.Thread(target=lambda: results.append(ssh.run("sleep 3; echo slow", timeout=10).stdout))
    slow.start()
    started = threading.Event()
    for _ in range(500):  # the shell is started by the slow command (at most 5 s)
        if any(e.endswith("-s") for e in server.execs):
            break
        started.wait(0.01)
    assert ssh.run("echo beside", timeout=10).stdout == "beside\n"
    slow.join()
    assert results == ["slow\n"] and "echo beside" in server.execs
