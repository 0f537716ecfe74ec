"""A versioned connection (issue 12): client and server say their wire version right after
the handshake, and a mismatch is a clear VersionMismatch naming both, never a record decoded
by another layout."""

from __future__ import annotations

import pickle
import threading
from multiprocessing.connection import Listener
from pathlib import Path

import pytest

import mpstore.manager.channel
from mpstore import InvalidArgument, VersionMismatch, connect
from mpstore._version import WIRE_VERSION, __version__
from mpstore.manager.wire import ERROR, HELLO
from mpstore.testing import ServerProcess
from tests.faults import authenticated, request, wait_until
from tests.remote import running_server


@pytest.fixture
def server(tmp_path: Path) -> ServerProcess:
    with running_server(tmp_path) as srv:
        yield srv


def test_same_versions_talk(server: ServerProcess) -> None:
    with server.connect() as store:
        assert store.ping()["version"] == __version__


def test_a_client_of_another_version_is_refused(server: ServerProcess,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpstore.manager.channel, "hello", lambda: HELLO + b"99 9.9.9")
    with pytest.raises(VersionMismatch) as caught:
        connect(server.address, server.authkey, retry_for=5.0)
    message = str(caught.value)
    assert "mpstore 9.9.9 (wire version 99)" in message
    assert f"mpstore {__version__} (wire version {WIRE_VERSION})" in message
    assert "install the same mpstore on both sides" in message
    wait_until(lambda: "Refused a client of another wire version" in server.log())


def test_a_client_that_says_no_version_gets_no_store_call(server: ServerProcess) -> None:
    conn = authenticated(server, say_version=False)  # as mpstore 0.1.0's client
    try:
        request(conn, "ping")
        kind, error = pickle.loads(conn.recv_bytes())
    finally:
        conn.close()
    assert kind == ERROR and isinstance(error, VersionMismatch)
    assert "says no wire version" in str(error)


def test_a_server_that_says_no_version_is_refused(tmp_path: Path) -> None:
    """An older server (it answers the hello as a request it cannot read): the client says
    so at connect, instead of exchanging records with it."""
    key = b"k" * 32
    listener = Listener(("127.0.0.1", 0), authkey=key)

    def old_server() -> None:
        with listener.accept() as conn:
            conn.recv_bytes()  # the hello, not a pickle it can read
            conn.send_bytes(pickle.dumps((ERROR, InvalidArgument("cannot unpickle"))))

    thread = threading.Thread(target=old_server, daemon=True)
    thread.start()
    host, port = listener.address
    try:
        with pytest.raises(VersionMismatch, match="the server says no wire version"):
            connect(f"{host}:{port}", key, retry_for=0.5)
    finally:
        thread.join(10)
        listener.close()
