"""The authkey (SPEC §5): resolution order, the per-host-and-port key file (generated once,
mode 0600, reused on restart, found by connect()), wrong and missing keys, silent peers, and
the default bind address."""

from __future__ import annotations

import multiprocessing
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mpstore import AuthenticationFailed, connect
from mpstore.manager.auth import (
    ENV_AUTHKEY,
    default_key_dir,
    default_key_file,
    is_loopback,
    resolve_authkey,
)
from mpstore.manager.ports import free_port
from mpstore.testing import ServerProcess, start_server, write_key_file
from tests.remote import running_server


@pytest.fixture(autouse=True)
def key_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Default key files go to a private runtime dir (inherited by servers we start)."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv(ENV_AUTHKEY, raising=False)
    yield runtime / "mpstore"


def wait_for_log(server: ServerProcess, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log()}"
        time.sleep(0.01)
    return server.log()


# --------------------------------------------------------------------------- resolution
def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "k"
    key_file.write_text("from-file\n")
    key_file.chmod(0o600)
    monkeypatch.setenv(ENV_AUTHKEY, "from-env")
    assert resolve_authkey("127.0.0.1", 1, "explicit", key_file).key == b"explicit"
    assert resolve_authkey("127.0.0.1", 1, None, key_file).key == b"from-env"
    monkeypatch.delenv(ENV_AUTHKEY)
    assert resolve_authkey("127.0.0.1", 1, None, key_file).key == b"from-file"
    with pytest.raises(AuthenticationFailed, match=r"no authkey for 127\.0\.0\.1:1"):
        resolve_authkey("127.0.0.1", 1)


def test_default_key_file_is_generated_once_with_mode_0600(key_dir: Path) -> None:
    first = resolve_authkey("127.0.0.1", 4999, create=True)
    path = default_key_file("127.0.0.1", 4999)
    assert path.parent == key_dir == default_key_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert len(first.key) == 64 and first.key == path.read_bytes().strip()
    assert resolve_authkey("127.0.0.1", 4999, create=True).key == first.key  # reused
    assert resolve_authkey("localhost", 4999).key == first.key  # loopback names share it
    assert repr(first).count(first.key.decode()) == 0  # never printed


def test_client_falls_back_to_the_wildcard_servers_key() -> None:
    key = resolve_authkey("0.0.0.0", 5001, create=True).key
    assert resolve_authkey("127.0.0.1", 5001).key == key
    assert resolve_authkey("::1", 5001).key == key


def test_loopback_detection() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "localhost", "::1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "example.org", "::"]))


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(AuthenticationFailed, match="does not exist"):
        resolve_authkey("127.0.0.1", 1, authkey_file=tmp_path / "missing")
    with pytest.raises(AuthenticationFailed, match=r"key file .* does not exist"):
        connect(f"127.0.0.1:{free_port()}")  # nothing to find: clear message, no hang


def test_server_with_missing_key_file_exits_1(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="exited with code 1") as info:
        start_server(authkey_file=tmp_path / "missing", log_path=tmp_path / "log")
    assert "authkey file" in str(info.value) and "does not exist" in str(info.value)


def test_loose_key_file_mode_is_warned_about(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    key = write_key_file(tmp_path / "k")
    key.chmod(0o644)
    resolve_authkey("127.0.0.1", 1, authkey_file=key)
    assert "readable by group or others" in caplog.text


# --------------------------------------------------------------------------- real servers
def test_server_generates_the_key_and_connect_finds_it(tmp_path: Path) -> None:
    port = free_port()
    with start_server(port, default_key=True, log_path=tmp_path / "log") as first:
        path = default_key_file("127.0.0.1", port)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = path.read_bytes()
        client = connect(f"127.0.0.1:{port}")  # no key given: found in the key file
        client.enqueue_rollout({"q": 1})
        assert first.stop() == 0
    with start_server(port, default_key=True, log_path=tmp_path / "log2"):
        assert path.read_bytes() == key  # reused on restart ...
        assert client.statistics()["total_rollouts"] == 0  # ... so the same client goes on
    client.close()


def test_key_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_AUTHKEY, "shared secret")
    with start_server(default_key=True, log_path=tmp_path / "log") as srv:
        assert connect(srv.address).ping()["name"] == "mpstore"
        assert f"Authkey from {ENV_AUTHKEY}" in srv.log()


def test_wrong_key_is_refused_logged_and_the_server_goes_on(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        with pytest.raises(AuthenticationFailed) as info:
            connect(srv.address, b"not the key")
        assert isinstance(info.value, multiprocessing.AuthenticationError)
        log = wait_for_log(srv, "Rejected connection from 127.0.0.1:")
        assert "[WARNING]" in log and "authentication failed" in log
        assert srv.connect().ping()["name"] == "mpstore"


def test_silent_peer_stalls_nobody_and_is_dropped(tmp_path: Path) -> None:
    with running_server(tmp_path, "--handshake-timeout", "0.5") as srv:
        silent = socket.create_connection(("127.0.0.1", srv.port))
        try:
            with srv.connect(timeout=5, retry_for=0) as good:  # while the silent one waits
                assert good.ping()["name"] == "mpstore"
            silent.settimeout(10)
            received = b""
            while chunk := silent.recv(1024):  # the challenge, then EOF when dropped
                received += chunk
            assert received  # it was challenged, never answered, and cut off
        finally:
            silent.close()
        assert "no handshake within 0.5 s" in wait_for_log(srv, "no handshake")


def test_default_bind_address_is_loopback(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        listening = [
            c.laddr.ip for c in psutil.Process(srv.pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        ]
    assert listening == ["127.0.0.1"]
    assert os.environ["XDG_RUNTIME_DIR"]  # (keys of this test stayed in tmp_path)
