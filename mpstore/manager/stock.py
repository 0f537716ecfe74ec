"""Serving stock ``multiprocessing.managers`` clients (``BaseProxy``), as the stock server does.

mpstore's own client speaks to the dispatcher (:mod:`.loop`); a connection whose first request
is a stock manager request (ident None: ``accept_connection``, ``create``, ``incref`` ...) is
handed to a thread running the code below, so ``StoreManager(address, authkey).connect()`` and
``.get_store()`` keep working. Requests are length-limited as in the dispatcher.

CPython internals (see ``tests/test_cpython_internals.py``): the stock manager protocol (a
request ``(ident, methodname, args, kwds)``, ident None for the manager's own functions, and
``#RETURN``/``#ERROR``... replies), ``Server.fallback_mapping`` and the entries of
``id_to_obj``/``id_to_local_proxy_obj``, and ``Connection._recv``/``_recv_bytes``.
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..api import BLOCKING, REQUEST_KEY
from .blocking import Abandoned, sliced
from .safe_pickle import Refused, refused
from .wire import (
    MAX_MESSAGE_SIZE,
    STORE_IDENT,
    dump_error,
    dump_reply,
    once_call,
    too_large,
    unpickle_failure,
)

__all__ = ["MessageTooLarge", "StockClients"]

log = logging.getLogger("mpstore.manager.server")
_DRAIN_CHUNK = 1024 * 1024


class MessageTooLarge(Exception):
    """A request frame larger than the server's limit (already drained from the stream)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a request of {size} bytes, over the limit of {limit}")
        self.size, self.limit = size, limit


class _LimitedConnection(Connection):
    """A server-side Connection that never buffers a request larger than ``max_size``: it
    reads the announced length, drains that many bytes in 1 MiB chunks (the stream stays in
    step) and raises MessageTooLarge. Explicit limits (the handshake's 256 bytes) behave as
    stock: the frame is refused unread."""

    max_size = MAX_MESSAGE_SIZE

    # CPython internal: recv_bytes() calls _recv_bytes(maxsize), which reads through
    # _recv(size) -> io.BytesIO; the framing is multiprocessing.connection's.
    def _recv_bytes(self, maxsize: int | None = None) -> Any:
        size, = struct.unpack("!i", self._recv(4).getvalue())
        if size == -1:  # a frame of 2 GiB or more: an 8-byte length follows
            size, = struct.unpack("!Q", self._recv(8).getvalue())
        if maxsize is not None:
            return None if size > maxsize else self._recv(size)
        if size > self.max_size:
            remaining = size
            while remaining > 0:
                step = min(remaining, _DRAIN_CHUNK)
                self._recv(step)
                remaining -= step
            raise MessageTooLarge(size, self.max_size)
        return self._recv(size)


class StockClients:
    """The stock request loop, mixed into ``StoreServer`` (which provides the attributes)."""

    _conns_lock: threading.Lock
    _conns: set[Connection]
    _methods: dict[str, Callable[..., Any]]
    _loads: Callable[[bytes], Any]  # the restricted decoder (see .safe_pickle)
    _once: Callable[[Any, Callable[..., Any]], Callable[..., Any]] | None
    max_message_size: int
    public: list[str]
    id_to_obj: dict[str, Any]
    id_to_local_proxy_obj: dict[str, Any]
    fallback_mapping: dict[str, Any]

    def _peer_closed(self) -> None:
        raise NotImplementedError

    def _serve_stock(self, sock: socket.socket, first: bytes) -> None:
        """A stock manager client's connection (see :meth:`_first_request`), in a thread."""
        conn = _LimitedConnection(sock.detach())
        conn.max_size = self.max_message_size
        with self._conns_lock:
            self._conns.add(conn)
        try:
            self._first_request(conn, first)
        except (OSError, EOFError):
            pass  # the peer went away
        except Exception:
            log.exception("Unexpected error serving a stock manager client")
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()
            self._peer_closed()

    def _first_request(self, conn: Connection, data: bytes) -> None:
        """A stock manager request (ident None: accept_connection, create, incref ...) is
        answered as Server does; anything else is already the first call of a client."""
        try:
            request = self._loads(data)
        except Exception:
            request = None
        if not (isinstance(request, tuple) and len(request) == 4 and request[0] is None):
            self.serve_client(conn, data)
            return
        _, funcname, args, kwds = request
        if funcname == "accept_connection":
            threading.current_thread().name = str(args[0]) if args else "proxy"
            conn.send_bytes(dump_reply(None))
            self.serve_client(conn)
            return
        try:
            if funcname not in self.public:
                raise AttributeError(f"{funcname!r} is not a manager function")
            reply = dump_reply(getattr(self, funcname)(conn, *args, **kwds))
        except Exception as exc:
            reply = dump_error(exc)
        conn.send_bytes(reply)

    def serve_client(self, conn: Connection, first: bytes | None = None) -> None:
        """The request loop of one connection: one call, one reply, until EOF."""
        recv, send, answer = conn.recv_bytes, conn.send_bytes, self._answer
        data = first
        while True:
            try:  # answer() never raises
                reply = answer(conn, recv() if data is None else data)
            except (EOFError, OSError):
                return
            except MessageTooLarge as exc:
                # Drained from the stream: answer it and go on.
                reply = too_large(exc.size, exc.limit)
            if reply is None:
                return  # the caller of a blocking call went away
            data = None
            try:
                send(reply)
            except OSError:
                return

    def _answer(self, conn: Connection, data: bytes) -> bytes | None:
        """The pickled reply to one pickled request; None if the caller of a blocking call
        disconnected meanwhile. Never raises."""
        try:
            request = self._loads(data)
        except Refused as exc:
            return dump_error(refused(exc, data, conn.fileno()))
        except Exception as exc:  # e.g. a class the server cannot import
            return unpickle_failure(exc)
        try:
            ident, name, args, kwds = request
            if ident == STORE_IDENT:
                func = self._methods.get(name) or self._missing(name)
                if isinstance(kwds, dict) and REQUEST_KEY in kwds:
                    func = once_call(self._once, kwds, func)
                if name in BLOCKING:
                    return dump_reply(sliced(conn.fileno(), name, func, args, kwds))
            else:
                func = self._lookup(conn, ident, name)
            return dump_reply(func(*args, **kwds))
        except Abandoned:
            return None
        except Exception as exc:
            return dump_error(exc)  # with the server-side traceback (tblib)

    @staticmethod
    def _missing(name: str) -> Callable[..., Any]:
        raise AttributeError(f"the mpstore server has no method {name!r}")

    def _lookup(self, conn: Connection, ident: str, name: str) -> Callable[..., Any]:
        """A method of another registered object, as stock ``serve_client`` resolves it."""
        # CPython internal: id_to_obj / id_to_local_proxy_obj entries are (obj, exposed,
        # method_to_typeid); fallback_mapping answers __str__, __repr__ and #GETVALUE.
        try:
            obj, exposed, _ = self.id_to_obj[ident]
        except KeyError:
            obj, exposed, _ = self.id_to_local_proxy_obj[ident]
        if name in exposed:
            return getattr(obj, name)
        if name in self.fallback_mapping:  # __str__, __repr__, #GETVALUE
            return functools.partial(self.fallback_mapping[name], self, conn, ident, obj)
        raise AttributeError(f"method {name!r} of {type(obj)!r} is not exposed")

