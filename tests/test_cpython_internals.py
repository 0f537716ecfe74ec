"""The CPython internals the transport leans on, checked on the running Python.

``StoreServer`` rebuilds ``multiprocessing.managers.Server`` instead of calling its
``__init__``, and the stock-proxy path, the handshake deadline and the size limit override
private methods of ``multiprocessing.connection.Connection`` (each place says "CPython
internal" in a comment). These differ between CPython releases; when one changes, a test here
fails with a message naming the internal and the Python version, before anything subtler
breaks in the end-to-end tests.
"""

from __future__ import annotations

import inspect
import io
import re
import socket
import sys
from multiprocessing import connection, managers
from typing import Any

import pytest

from mpstore import InMemoryStore
from mpstore.api import SERVED
from mpstore.manager import server as server_module
from mpstore.manager import wire
from mpstore.manager.server import StoreManager, StoreServer
from mpstore.manager.stock import _LimitedConnection

PYTHON = f"Python {sys.version.split()[0]}"


def changed(what: str, detail: str) -> str:
    return f"CPython internal changed on {PYTHON}: {what}: {detail}"


@pytest.fixture
def servers() -> Any:
    """A stock Server and a StoreServer, both bound to free loopback ports."""
    stock = managers.Server({}, ("127.0.0.1", 0), b"key", "pickle")
    ours = StoreServer({}, ("127.0.0.1", 0), b"key")
    try:
        yield stock, ours
    finally:
        stock.listener.close()
        ours.listener.close()


def test_store_server_sets_every_attribute_that_server_init_sets(servers: Any) -> None:
    stock, ours = servers
    missing = set(vars(stock)) - set(vars(ours))
    assert not missing, changed(
        "multiprocessing.managers.Server.__init__",
        f"it now sets {sorted(missing)}, which StoreServer.__init__ (mpstore/manager/"
        "server.py) does not; StoreServer rebuilds Server's attributes instead of calling it")


def test_inherited_manager_functions_use_only_what_store_server_has(servers: Any) -> None:
    _, ours = servers
    assert "shutdown" in managers.Server.public, changed("Server.public", "no 'shutdown'")
    for name in StoreServer.public:
        function = getattr(managers.Server, name, None)
        assert function is not None, changed("Server.public", f"{name!r} is not a method")
        params = list(inspect.signature(function).parameters)
        assert params[:2] == ["self", "c"], changed(
            f"Server.{name}", f"takes {params}, not (self, c, ...) as StockClients calls it")
        used = set(re.findall(r"self\.(\w+)", inspect.getsource(function)))
        lacking = {attr for attr in used if not hasattr(ours, attr)}
        assert not lacking, changed(
            f"Server.{name}", f"now uses self.{', self.'.join(sorted(lacking))}, which "
            "StoreServer lacks (mpstore/manager/server.py)")


def test_inherited_manager_functions_work_on_store_server() -> None:
    # What a stock proxy's manager asks for (create, incref, get_methods ...) runs Server's
    # own code on the attributes StoreServer rebuilt, and on the id_to_obj entry that
    # serve_store writes as (store, exposed, method_to_typeid).
    store = InMemoryStore(copy_records=False)
    ours = StoreServer(server_module._registry(store), ("127.0.0.1", 0), b"key")
    try:
        ours.serve_store(store)
        try:
            token = managers.Token("get_store", ours.address, "store")
            assert set(ours.get_methods(None, token)) == set(SERVED)
            ident, exposed = ours.create(None, "get_store")
            assert set(exposed) == set(SERVED)
            ours.incref(None, ident)
            assert ours.number_of_objects(None) >= 1
            assert ident in ours.debug_info(None)
            ours.decref(None, ident)
            ours.decref(None, ident)
            assert ident not in ours.id_to_obj
            ours.dummy(None)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise AssertionError(changed(
                "multiprocessing.managers.Server's manager functions",
                f"{type(exc).__name__}: {exc} on StoreServer (mpstore/manager/server.py)")
            ) from exc
        assert set(managers.Server.fallback_mapping) >= {"__str__", "__repr__", "#GETVALUE"}, \
            changed("Server.fallback_mapping", str(sorted(managers.Server.fallback_mapping)))
    finally:
        ours.listener.close()


def test_base_manager_registry() -> None:
    entry = StoreManager._registry.get("get_store")  # type: ignore[attr-defined]
    assert isinstance(entry, tuple) and len(entry) == 4, changed(
        "BaseManager._registry", f"register() stores {entry!r}, not (callable, exposed, "
        "method_to_typeid, proxytype) as mpstore/manager/server.py's _registry() expects")
    assert tuple(entry[1]) == SERVED


def test_connection_private_reads() -> None:
    for name, expected in (("_recv", ["self", "size", "read"]),
                           ("_recv_bytes", ["self", "maxsize"])):
        method = getattr(connection.Connection, name, None)
        assert method is not None, changed(f"Connection.{name}", "gone")
        params = list(inspect.signature(method).parameters)
        assert params == expected, changed(f"Connection.{name}", f"takes {params}")
    # _recv returns a BytesIO, and recv_bytes goes through _recv_bytes (which the size limit
    # overrides): a frame over the limit is drained and refused.
    left, right = socket.socketpair()
    try:
        conn = _LimitedConnection(left.detach())
        conn.max_size = 8
        assert isinstance(conn._recv.__self__, connection.Connection)
        right.sendall(wire.frame(b"x" * 9) + wire.frame(b"ok"))
        with pytest.raises(Exception) as info:
            conn.recv_bytes()
        assert type(info.value).__name__ == "MessageTooLarge", changed(
            "Connection.recv_bytes", "no longer reads through _recv_bytes")
        assert conn.recv_bytes() == b"ok"  # the stream stayed in step
        assert isinstance(conn._handle, int), changed("Connection._handle", "not an fd")
        right.sendall(b"abcd")
        assert isinstance(conn._recv(4), io.BytesIO), changed("Connection._recv",
                                                              "no longer returns a BytesIO")
        conn.close()
    finally:
        right.close()


def test_handshake_functions() -> None:
    for name in ("answer_challenge", "deliver_challenge"):
        function = getattr(connection, name, None)
        assert function is not None, changed(f"multiprocessing.connection.{name}", "gone")
        params = list(inspect.signature(function).parameters)
        assert params[:2] == ["connection", "authkey"], changed(
            f"multiprocessing.connection.{name}", f"takes {params}")


class _Recorder:
    """A connection for managers.dispatch: records what it sends, answers ``reply``."""

    def __init__(self, reply: Any) -> None:
        self.sent: list[Any] = []
        self.reply = reply

    def send(self, obj: Any) -> None:
        self.sent.append(obj)

    def recv(self) -> Any:
        return self.reply


def test_manager_protocol_messages() -> None:
    # What a stock proxy sends (stock.py reads it) and how it reads our replies (wire.py).
    recorder = _Recorder((wire.RETURN, 5))
    assert managers.dispatch(recorder, "store", "ping", (1,), {"k": 2}) == 5, changed(
        "managers.dispatch", "does not return the payload of a #RETURN reply")
    assert recorder.sent == [("store", "ping", (1,), {"k": 2})], changed(
        "managers.dispatch", f"sends {recorder.sent!r}, not (ident, methodname, args, kwds)")
    error = ValueError("boom")
    with pytest.raises(ValueError):
        managers.dispatch(_Recorder((wire.ERROR, error)), "store", "x", (), {})
    for kind in (wire.TRACEBACK, wire.UNSERIALIZABLE):
        with pytest.raises(managers.RemoteError):
            managers.dispatch(_Recorder((kind, "text")), "store", "x", (), {})


def test_connection_private_writes_and_close() -> None:
    """TLSConnection (mpstore/manager/tls.py) overrides _send, _recv and _close to run the
    authkey handshake over an SSL socket."""
    for name, expected in (("_send", ["self", "buf", "write"]), ("_close", ["self", "_close"])):
        method = getattr(connection.Connection, name, None)
        assert method is not None, changed(f"Connection.{name}", "gone")
        params = list(inspect.signature(method).parameters)
        assert params == expected, changed(f"Connection.{name}", f"takes {params}")
    sent: list[bytes] = []
    closed: list[bool] = []

    class Recording(connection.Connection):
        def _send(self, buf: Any, write: Any = None) -> None:
            sent.append(bytes(buf))

        def _close(self, _close: Any = None) -> None:
            closed.append(True)

    left, right = socket.socketpair()
    try:
        conn = Recording(left.fileno())
        conn.send_bytes(b"hello")
        assert b"".join(sent) == wire.frame(b"hello"), changed(
            "Connection.send_bytes", "no longer writes through _send")
        conn.close()
        assert closed, changed("Connection.close", "no longer closes through _close")
    finally:
        left.close()
        right.close()

