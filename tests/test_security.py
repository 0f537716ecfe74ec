"""Security defaults (issue 5), checked on real ``agl store`` processes: the default bind is
127.0.0.1 (psutil on the server's listening sockets); a generated key file is mode 0600 in a
0700 directory (under $XDG_RUNTIME_DIR, or ~/.mpstore without it); no key or a wrong key gets no
access, and nothing an unauthenticated peer sends is ever unpickled; the key never appears in
the server's command line or log; binding beyond loopback is warned about.
"""

from __future__ import annotations

import os
import pickle
import stat
import struct
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from pathlib import Path

import psutil
import pytest

from mpstore import AuthenticationFailed, connect
from mpstore.manager import StoreManager
from mpstore.manager.auth import ENV_AUTHKEY, default_key_file
from mpstore.manager.ports import free_port
from mpstore.testing import ServerProcess, start_server
from tests.faults import raw_socket, wait_until
from tests.remote import running_server


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ENV_AUTHKEY, raising=False)
    yield


def listening(server: ServerProcess) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port)
            for c in psutil.Process(server.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


def test_default_bind_is_loopback_only(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        assert listening(server) == [("127.0.0.1", server.port)]
        assert "beyond this machine" not in server.log()


@pytest.mark.parametrize("where", ["runtime-dir", "home"])
def test_generated_key_file_is_0600_in_a_0700_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    if where == "runtime-dir":
        runtime = tmp_path / "run"
        runtime.mkdir(mode=0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        expected_dir = runtime / "mpstore"
    else:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        expected_dir = tmp_path / ".mpstore"
    port = free_port()
    with start_server(port, default_key=True, log_path=tmp_path / "server.log") as server:
        path = default_key_file("127.0.0.1", port)
        assert path.parent == expected_dir
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(expected_dir.stat().st_mode) == 0o700
        key = path.read_bytes().strip()
        assert len(key) >= 32
        # The key itself is never shown: not in the command line, not in the log.
        assert key.decode() not in " ".join(psutil.Process(server.pid).cmdline())
        assert key.decode() not in server.log()
        assert connect(server.address).ping()["name"] == "mpstore"  # found by connect()


def test_no_key_no_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_server(tmp_path) as server:  # its key is in tmp_path, not a default file
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # nothing to find there
        with pytest.raises(AuthenticationFailed, match="no authkey for"):
            connect(server.address, retry_for=0)
        for key in (b"wrong", server.authkey + b"x", server.authkey[:-1]):
            with pytest.raises(AuthenticationFailed):
                connect(server.address, key, retry_for=0)
        with pytest.raises(AuthenticationFailed, match="empty"):
            connect(server.address, b"", retry_for=0)
        # The stock manager client is refused the same way.
        manager = StoreManager(address=("127.0.0.1", server.port), authkey=b"wrong")
        with pytest.raises(AuthenticationError):
            manager.connect()
        wait_until(lambda: server.log().count("Rejected connection from 127.0.0.1:") >= 4, 10,
                   "every refusal logged with the peer's address")
        assert "authentication failed" in server.log()
        assert connect(server.address, server.authkey).ping()["name"] == "mpstore"


def test_nothing_is_unpickled_before_the_handshake(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    frame = pickle.dumps(("store", "ping", (Payload(),), {}))
    with running_server(tmp_path, "--handshake-timeout", "0.5") as server:
        for answer_first in (False, True):
            with raw_socket(server) as sock:
                if answer_first:
                    sock.recv(4096)  # the challenge, ignored
                sock.sendall(struct.pack("!i", len(frame)) + frame)
                sock.settimeout(10)
                while sock.recv(4096):  # until the server closes the connection
                    pass
        wait_until(lambda: server.log().count("Dropped connection") + server.log().count(
            "Rejected connection") >= 2, 10, "both peers dropped")
        assert connect(server.address, server.authkey).ping()["name"] == "mpstore"
    assert not marker.exists()


def test_loose_key_file_is_warned_about_by_the_server(tmp_path: Path) -> None:
    key = tmp_path / "authkey"
    key.write_text("a shared secret\n")
    key.chmod(0o644)
    with running_server(tmp_path) as server:
        assert "readable by group or others" in server.log()


def test_binding_beyond_loopback_is_warned_about(tmp_path: Path) -> None:
    # 0.0.0.0 on a free port: it never receives traffic from elsewhere during the test.
    key = tmp_path / "authkey"
    key.write_text("a secret\n")
    key.chmod(0o600)
    with start_server(host="0.0.0.0", authkey_file=key, log_path=tmp_path / "log") as server:
        assert listening(server) == [("0.0.0.0", server.port)]
        log = server.log()
        assert "[WARNING]" in log and "beyond this machine" in log
        assert "has full access to the store" in log


def test_a_key_others_could_have_written_is_warned_about(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A key directory others may write to: they could plant a key they know.
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    (runtime / "mpstore").mkdir()
    (runtime / "mpstore").chmod(0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with start_server(default_key=True, log_path=tmp_path / "server.log") as server:
        assert "in a directory writable by group or others (mode 777)" in server.log()
    if os.geteuid() != 0:
        return  # only root can give a file to another user
    key = tmp_path / "planted"
    key.write_text("known to someone else\n")
    key.chmod(0o600)
    os.chown(key, 65534, 65534)
    with start_server(authkey_file=key, log_path=tmp_path / "server2.log") as server:
        assert "belongs to another user (uid 65534)" in server.log()
