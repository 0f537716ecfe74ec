"""TLS between clients and the server (``agl store --tls-cert``; mpstore.manager.tls): what
fails fails clearly and within the handshake deadline, the limits hold for TLS connections,
and the dispatcher copes with TLS records however they arrive. The contract suite itself runs
through a TLS server too (the ``tls`` kind of the ``store`` fixture)."""

from __future__ import annotations

import pickle
import socket
import ssl
import time
from collections.abc import Iterator
from multiprocessing.connection import answer_challenge, deliver_challenge
from pathlib import Path

import pytest

from mpstore import AuthenticationFailed, InvalidArgument, StoreUnavailable, connect
from mpstore.manager import wire
from mpstore.manager.tls import TLSConnection
from mpstore.testing import ServerProcess, start_server, write_key_file
from tests.certs import TLSFiles
from tests.remote import running_server

#: The server's handshake deadline in these tests, and the client's own (much longer)
#: timeout: an error that comes before the client's timeout was the server's doing.
DEADLINE, CLIENT_TIMEOUT = 1.0, 30.0


@pytest.fixture
def tls_server(tmp_path: Path, tls_files: TLSFiles) -> Iterator[ServerProcess]:
    with running_server(tmp_path, "--handshake-timeout", str(DEADLINE),
                        "--max-message-size", "1MiB", tls=tls_files) as server:
        yield server


def _raw_tls(server: ServerProcess, files: TLSFiles) -> ssl.SSLSocket:
    """A TLS connection that has passed the authkey handshake, driven by hand."""
    context = ssl.create_default_context(cafile=files.ca)
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), 10),
                               server_hostname="127.0.0.1")
    conn = TLSConnection(sock)
    answer_challenge(conn, server.authkey)
    deliver_challenge(conn, server.authkey)
    conn.send_bytes(wire.hello())  # the wire versions, as mpstore's client says them
    assert wire.parse_hello(conn.recv_bytes()) == wire.parse_hello(wire.hello())
    return conn.keep()


def _frame(name: str) -> bytes:
    data = pickle.dumps((wire.STORE_IDENT, name, (), {}), wire.PROTOCOL)
    return len(data).to_bytes(4, "big") + data


def _reply(sock: ssl.SSLSocket) -> object:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            more = sock.recv(size - len(data))
            assert more, "the server closed the connection"
            data += more
        return data

    return pickle.loads(exactly(int.from_bytes(exactly(4), "big")))


def test_calls_go_through_tls(tls_server: ServerProcess) -> None:
    with tls_server.connect() as client:
        rollout = client.enqueue_rollout({"text": "x" * 300_000})  # many TLS records each way
        assert client.get_rollout_by_id(rollout.rollout_id).input == {"text": "x" * 300_000}
        assert client._local.channel._tls
    assert "TLS with certificate" in tls_server.log()


def test_requests_in_one_record_and_requests_in_many(tls_server: ServerProcess,
                                                     tls_files: TLSFiles) -> None:
    sock = _raw_tls(tls_server, tls_files)
    try:
        sock.sendall(_frame("ping") + _frame("statistics"))  # two requests, one record
        assert _reply(sock)[0] == wire.RETURN
        assert _reply(sock)[0] == wire.RETURN
        for byte in _frame("ping"):  # one request as a record per byte
            sock.sendall(bytes([byte]))
        kind, info = _reply(sock)
        assert kind == wire.RETURN and info["name"] == "mpstore"
    finally:
        sock.close()


def _logged(server: ServerProcess, text: str) -> None:
    """Wait until the server's log has ``text``: it may write the line after the client has
    seen the failure (with TLS 1.3 the client finishes its handshake first)."""
    deadline = time.monotonic() + 10
    while text not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)


def _fails_before_client_timeout(started: float) -> None:
    assert time.monotonic() - started < CLIENT_TIMEOUT, "only the client's timeout ended it"


def test_wrong_ca(tls_server: ServerProcess, tls_files: TLSFiles) -> None:
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed, match=r"does not verify .*tls_ca must be the CA"):
        connect(tls_server.address, tls_server.authkey, tls_ca=tls_files.other_ca,
                retry_for=0, timeout=CLIENT_TIMEOUT)
    _fails_before_client_timeout(started)


def test_expired_certificate(tmp_path: Path, tls_files: TLSFiles) -> None:
    with start_server(authkey_file=write_key_file(tmp_path / "key"), ping_ready=False,
                      args=[*tls_files.server_args(expired=True), "--handshake-timeout",
                            str(DEADLINE)]) as server:
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed, match="certificate has expired"):
            connect(server.address, server.authkey, tls_ca=tls_files.ca, retry_for=0,
                    timeout=CLIENT_TIMEOUT)
        _fails_before_client_timeout(started)


def test_plaintext_client_against_tls_server(tls_server: ServerProcess) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="it speaks TLS and this client does not"):
        connect(tls_server.address, tls_server.authkey, retry_for=0, timeout=CLIENT_TIMEOUT)
    _fails_before_client_timeout(started)
    assert f"no TLS handshake within {DEADLINE:g} s (a plaintext client?" in tls_server.log()


def test_tls_client_against_plaintext_server(tmp_path: Path, tls_files: TLSFiles) -> None:
    with running_server(tmp_path, "--handshake-timeout", str(DEADLINE)) as server:
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed, match="does it speak TLS"):
            connect(server.address, server.authkey, tls_ca=tls_files.ca, retry_for=0,
                    timeout=CLIENT_TIMEOUT)
        _fails_before_client_timeout(started)
        _logged(server, "it speaks TLS and this server does not")


def test_mutual_tls(tmp_path: Path, tls_files: TLSFiles) -> None:
    with running_server(tmp_path, "--tls-client-ca", tls_files.ca, "--handshake-timeout",
                        str(DEADLINE), tls=tls_files, tls_cert=tls_files.client_cert,
                        tls_key=tls_files.client_key) as server:
        with server.connect() as client:  # with the client's certificate
            assert client.ping()["name"] == "mpstore"
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed, match="client certificate"):
            connect(server.address, server.authkey, tls_ca=tls_files.ca, retry_for=0,
                    timeout=CLIENT_TIMEOUT)
        _fails_before_client_timeout(started)
        _logged(server, "TLS handshake failed")


def test_the_environment_gives_the_ca(tls_server: ServerProcess, tls_files: TLSFiles,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPSTORE_TLS_CA", tls_files.ca)
    with connect(tls_server.address, tls_server.authkey) as client:
        assert client.ping()
    with pytest.raises(InvalidArgument, match="tls_cert needs tls_ca"):
        connect(tls_server.address, tls_server.authkey, tls_cert=tls_files.client_cert)


def test_a_pickled_client_keeps_tls(tls_server: ServerProcess) -> None:
    client = tls_server.connect()
    copy = pickle.loads(pickle.dumps(client))
    assert copy.ping()["name"] == "mpstore"
    assert copy._local.channel._tls


def test_max_message_size_holds(tls_server: ServerProcess) -> None:
    with tls_server.connect() as client:
        with pytest.raises(InvalidArgument, match="larger than this server's limit"):
            client.enqueue_rollout({"text": "x" * (2 * 2**20)})
        assert client.ping()  # the same connection, still in step


def test_a_peer_trickling_the_tls_handshake_is_dropped(tls_server: ServerProcess,
                                                       tls_files: TLSFiles) -> None:
    # A real ClientHello, sent a byte at a time, slower than the deadline allows.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = ssl.create_default_context(cafile=tls_files.ca).wrap_bio(
        incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    data = outgoing.read()
    with socket.create_connection(("127.0.0.1", tls_server.port), 10) as sock:
        started = time.monotonic()
        closed = False
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if _closed_within(sock, DEADLINE / 4):
                closed = True
                break
        assert closed or _closed_within(sock, CLIENT_TIMEOUT)
        _fails_before_client_timeout(started)
    assert f"no TLS handshake within {DEADLINE:g} s" in tls_server.log()


def test_a_peer_trickling_the_authkey_handshake_is_dropped(tls_server: ServerProcess,
                                                           tls_files: TLSFiles) -> None:
    context = ssl.create_default_context(cafile=tls_files.ca)
    with context.wrap_socket(socket.create_connection(("127.0.0.1", tls_server.port), 10),
                             server_hostname="127.0.0.1") as sock:
        started = time.monotonic()
        sock.recv(4096)  # the challenge; the answer (32 bytes, it says) never comes whole
        sock.sendall((32).to_bytes(4, "big"))
        for _ in range(int(4 * CLIENT_TIMEOUT)):
            try:
                sock.sendall(b"a")
            except OSError:
                break
            if _closed_within(sock, DEADLINE / 4):
                break
        _fails_before_client_timeout(started)
    assert f"no handshake within {DEADLINE:g} s" in tls_server.log()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the peer closes ``sock`` (or resets it) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(4096) == b""
    except (TimeoutError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True


def test_max_connections_holds(tmp_path: Path, tls_files: TLSFiles) -> None:
    with running_server(tmp_path, "--max-connections", "2", tls=tls_files) as server:
        first, second = server.connect(), server.connect()
        assert first.ping() and second.ping()
        with pytest.raises(StoreUnavailable):
            server.connect(retry_for=0)
        second.close()
        deadline = time.monotonic() + 10
        while True:  # the server counts the closed connection down in its own time
            try:
                third = server.connect(retry_for=0)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert third.ping()
        first.close()
        third.close()
        assert "Refused connection from" in server.log()


def test_restricted_decoding_holds_over_tls(tls_server: ServerProcess, tmp_path: Path) -> None:
    from tests.test_safe_pickle import ViaSystem

    marker = tmp_path / "marker"
    with tls_server.connect() as client:
        with pytest.raises(InvalidArgument, match=r"posix\.system, which this server does"):
            client.enqueue_rollout({"task": ViaSystem(marker)})
        assert client.ping()
    assert not marker.exists()


def test_tls_connections_are_counted(tls_server: ServerProcess, tls_files: TLSFiles) -> None:
    """The server's accounting (statistics()["server"], agl top, the metrics) counts TLS
    connections as plaintext ones: accepted, refused in the handshake, their calls."""
    with tls_server.connect() as client:
        before = client.statistics()["server"]
        for _ in range(5):
            client.ping()
        with pytest.raises(StoreUnavailable):  # plaintext: no TLS handshake in time
            connect(tls_server.address, tls_server.authkey, retry_for=0,
                    timeout=CLIENT_TIMEOUT)
        with pytest.raises(AuthenticationFailed):  # the client refuses the server's cert
            connect(tls_server.address, tls_server.authkey, tls_ca=tls_files.other_ca,
                    retry_for=0, timeout=CLIENT_TIMEOUT)
        deadline = time.monotonic() + 10
        while True:  # the accepting thread counts a refusal as it logs it
            after = client.statistics()["server"]
            refused = after["connections_refused"].get("handshake", 0) - before[
                "connections_refused"].get("handshake", 0)
            if refused >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert refused == 2
    assert after["connections_accepted"] - before["connections_accepted"] == 2
    pings = after["calls"]["ping"]["ok"] - before["calls"]["ping"]["ok"]
    assert pings == 5
