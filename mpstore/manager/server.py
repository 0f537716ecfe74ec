"""The server: one store served over TCP by a ``BaseManager`` subclass (SPEC §5).

``StoreServer`` is a ``multiprocessing.managers.Server`` (the class ``StoreManager`` serves
with) with these changes, each because the stock one falls short:

* it listens with a backlog of 128 (stock: 16, which stalls bursts of connections for a
  second each, the SYN retry time);
* it authenticates each peer in that peer's own thread, with a time limit (stock: in the one
  accept loop, so a single silent peer stalls every newcomer), logs a failed handshake with the
  peer's address and goes on serving;
* it sets ``TCP_NODELAY`` on every connection (see :mod:`.channel`);
* it bounds what peers can take: at most ``max_connections`` at once (more are closed at
  once, with a log line), requests of at most ``max_message_size`` bytes (a larger frame is
  read and discarded in small chunks, never buffered, and answered with InvalidArgument), and
  a blocking call (a long ``wait``/``timeout``) waits in slices (``BLOCKING_SLICE`` seconds,
  longer while many calls wait: :func:`.blocking.slice_seconds`), between which the server
  checks that its caller is still connected: a caller that died gives its thread back
  instead of holding it, or claiming rollouts, until its wait ends;
* once authenticated, a connection is served by the one dispatcher thread of :mod:`.loop`
  (``epoll``; blocking calls in worker threads), not by a thread of its own: the store under
  the fixed ident ``"store"`` from a method table, exceptions with their tracebacks
  (:mod:`.wire`).

Stock ``BaseProxy`` clients still work (``StoreManager(address, authkey).connect()`` then
``.get_store()``): their connections are served by a thread (:mod:`.stock`). This module only
moves calls: every request is one method of the store.

CPython internals this module leans on (each marked "CPython internal" where it is used, and
checked on the running Python by ``tests/test_cpython_internals.py``, which names the internal
and the version when one changes): ``Server``'s instance attributes (``registry``,
``authkey``, ``id_to_obj`` and its ``(obj, exposed, method_to_typeid)`` entries,
``id_to_refcount``, ``id_to_local_proxy_obj``, ``mutex``, ``stop_event``) that its inherited
``create``/``incref``/``decref``/... read; ``Server.public``; ``BaseManager._registry``;
``Connection._recv`` and ``_handle``.

:func:`serve` serves a given store object (tests inject one with a controlled clock);
``agl store`` builds its store and tunes its process first (:mod:`mpstore.startup`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import select
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from multiprocessing.managers import AutoProxy, BaseManager, Server
from multiprocessing.process import AuthenticationString
from typing import Any

from ..accounting import LATENCY_BUCKETS, CallStats, Tally, process_usage
from ..api import SERVED
from . import tls
from .blocking import BLOCKING_SLICE
from .loop import BUSY_POLL, Dispatcher
from .ports import bind_failure
from .safe_pickle import AllowList
from .sockets import set_socket_timeouts, tune_socket
from .stock import StockClients
from .wire import MAX_MESSAGE_SIZE, STORE_IDENT

__all__ = [
    "BACKLOG",
    "BLOCKING_SLICE",
    "MAX_CONNECTIONS",
    "StoreManager",
    "StoreServer",
    "serve",
]

log = logging.getLogger(__name__)
BACKLOG = 128
#: Default limits (``agl store --max-connections``, ``--max-message-size``).
MAX_CONNECTIONS = 1024


class _Handshake(Connection):
    """The connection of a peer still authenticating. Every read waits at most until the
    handshake's deadline: the socket's receive timeout bounds each read, so without this a
    peer trickling a byte at a time could stretch the handshake to minutes and hold a slot."""

    def __init__(self, handle: int, deadline: float) -> None:
        super().__init__(handle)
        self.deadline = deadline
        self.first = b""  # the peer's first bytes (to tell a TLS client what is wrong)

    # CPython internal: Connection._recv(size, read) -> io.BytesIO is what every read of
    # the handshake (recv_bytes) goes through, and _handle is the descriptor.
    def _recv(self, size: int, read: Callable[[int, int], bytes] = os.read) -> io.BytesIO:
        buf, remaining = io.BytesIO(), size
        poller = select.poll()
        poller.register(self._handle, select.POLLIN)
        while remaining > 0:
            left = self.deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise BlockingIOError(errno.EAGAIN, "handshake deadline passed")
            chunk = read(self._handle, remaining)
            if not chunk:
                if remaining == size:
                    raise EOFError
                raise OSError("got end of file during message")
            buf.write(chunk)
            remaining -= len(chunk)
            self.first = self.first or chunk
        return buf


def _listen(address: tuple[str, int], backlog: int) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR, so a restart need not wait out TIME_WAIT).
    Raises ServerStartError (the SPEC §6 message) if the address cannot be bound."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise bind_failure(host, port, exc) from None


class StoreServer(StockClients, Server):
    """A manager server that serves one store; see the module docstring."""

    # No remote "shutdown": the server stops on SIGINT/SIGTERM or its stop event.
    # CPython internal: Server.public, the manager functions a stock client may call.
    public = [name for name in Server.public if name != "shutdown"]

    def __init__(self, registry: dict[str, Any], address: tuple[str, int], authkey: bytes,
                 serializer: str = "pickle", *, handshake_timeout: float = 5.0,
                 backlog: int = BACKLOG, max_connections: int = MAX_CONNECTIONS,
                 max_message_size: int = MAX_MESSAGE_SIZE, busy_poll: float = BUSY_POLL,
                 allow_classes: Iterable[str | type] = (), call_stats: bool = True,
                 tls_context: ssl.SSLContext | None = None) -> None:
        # Not Server.__init__: it binds with a backlog of 16 through a Listener that
        # authenticates inside accept(). CPython internal: these are the attributes
        # Server.__init__ sets and Server's inherited methods (create, incref, decref,
        # debug_info ...) use; the shape of id_to_obj's entries is theirs too.
        if serializer != "pickle":
            raise ValueError("StoreServer speaks pickle only")
        self.registry = registry
        self.authkey = AuthenticationString(authkey)
        self.listener = _listen(address, backlog)
        self.address = self.listener.getsockname()[:2]
        self.id_to_obj: dict[str, Any] = {"0": (None, ())}
        self.id_to_refcount: dict[str, int] = {}
        self.id_to_local_proxy_obj: dict[str, Any] = {}
        self.mutex = threading.Lock()
        self.stop_event = threading.Event()
        self.handshake_timeout = handshake_timeout
        self._methods: dict[str, Callable[..., Any]] = {}
        self._once: Callable[[Any, Callable[..., Any]], Callable[..., Any]] | None = None
        self._dispatcher: Dispatcher | None = None
        self._conns: set[Connection] = set()
        self._conns_lock = threading.Lock()
        self._accepter: threading.Thread | None = None
        self.max_connections, self.max_message_size = max_connections, max_message_size
        self.busy_poll = busy_poll
        # What requests may name (see .safe_pickle); raises InvalidArgument for a bad name.
        self.allow = AllowList.for_requests(allow_classes)
        self._loads = self.allow.loads
        self.tls = tls_context  # every connection speaks TLS (see .tls)
        self._peers = 0  # connections with a thread (authenticated or not); _conns_lock
        self._refused, self._refusal_logged = 0, -1e9  # accepter thread only
        # For statistics() and metrics: connections accepted (accepter thread only) and
        # refused, by why; calls per method (the dispatcher's; None: not counted).
        self.accepted, self.refused = 0, Tally("auth", "handshake", "limit")
        self.calls: CallStats | None = None  # set by serve_store
        self._call_stats, self._store = call_stats, None

    def serve_store(self, store: Any) -> None:
        """Serve ``store``'s methods that the call table marks ``served`` under the ident
        ``"store"``."""
        self.id_to_obj[STORE_IDENT] = (store, frozenset(SERVED), None)
        self._methods = {name: getattr(store, name) for name in SERVED}
        self._once = getattr(store, "once", None)  # exactly-once answers (api.REQUEST_KEY)
        self._store = store
        if "statistics" in self._methods:  # the store's, plus this server's own
            self._methods["statistics"] = self.statistics
        self.calls = CallStats(SERVED) if self._call_stats else None
        self._dispatcher = Dispatcher(
            self._methods, once=self._once, max_message_size=self.max_message_size,
            calls=self.calls,
            on_close=self._peer_closed, fallback=self._fallback, busy_poll=self.busy_poll,
            loads=self._loads,
            # Only a durable store's commits are worth batching; an in-memory store's
            # replies go out as soon as they are ready.
            batch=store.deferred_commits if getattr(store, "durable", False) else None,
            offload=getattr(store, "blocking_io", False),
            pipeline=getattr(store, "pipeline", None))

    def statistics(self) -> dict[str, Any]:
        """The store's ``statistics()`` with a ``"server"`` section: connections (open,
        accepted, refused by reason), calls per method served by the dispatcher (counts per
        outcome, latency buckets with bounds ``latency_bounds``), this process's usage."""
        stats = self._store.statistics()
        stats["server"] = {
            "connections": self._peers, "connections_accepted": self.accepted,
            "connections_refused": self.refused.snapshot(),
            "calls": None if self.calls is None else self.calls.snapshot(),
            "latency_bounds": list(LATENCY_BUCKETS), "process": process_usage(),
        }
        return stats

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Accept connections in a background thread (and serve them in another)."""
        self._dispatcher.start()
        self._accepter = threading.Thread(target=self.accepter, name="mpstore-accept",
                                          daemon=True)
        self._accepter.start()

    def serve_forever(self) -> None:
        """Stock entry point: serve until :meth:`stop` (or ``stop_event``)."""
        self.start()
        self.stop_event.wait()
        self.stop()

    def stop(self) -> None:
        """Stop accepting, end every connection (their clients see EOF and reconnect or
        retry elsewhere) and wait briefly for the accept loop. Idempotent."""
        self.stop_event.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
        self.listener.close()
        with self._conns_lock:
            for conn in self._conns:
                _shutdown_fd(conn.fileno())
        if self._accepter is not None and self._accepter is not threading.current_thread():
            self._accepter.join(timeout=2.0)
        if self._dispatcher is not None:
            self._dispatcher.stop()

    def accepter(self) -> None:
        """Accept peers and hand each to its own thread, which authenticates it."""
        while not self.stop_event.is_set():
            try:
                sock, peer = self.listener.accept()
            except OSError as exc:
                if self.stop_event.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("Cannot accept connections: %s", exc.strerror)
                    self.stop_event.wait(0.1)  # until some connection closes
                continue
            with self._conns_lock:
                full = self._peers >= self.max_connections
                self._peers += not full
            self.accepted += not full
            if full:
                self._refuse(sock, peer)
                continue
            try:
                threading.Thread(target=self._serve_peer, args=(sock, peer),
                                 name=f"mpstore-{_peer(peer)}", daemon=True).start()
            except RuntimeError as exc:  # "can't start new thread"
                log.error("Refused connection from %s: %s", _peer(peer), exc)
                sock.close()
                with self._conns_lock:
                    self._peers -= 1

    def _refuse(self, sock: socket.socket, peer: Any) -> None:
        """Close a connection beyond ``max_connections`` at once; log it (at most one line
        every 5 s, with the count, so a flood cannot flood the log too)."""
        sock.close()
        self.refused.add("limit")
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 5.0:
            log.warning("Refused connection from %s: %d connections are open, the limit "
                        "(--max-connections %d); %d refused since the last such line",
                        _peer(peer), self.max_connections, self.max_connections, self._refused)
            self._refused, self._refusal_logged = 0, now

    def _serve_peer(self, sock: socket.socket, peer: Any) -> None:
        adopted = False
        try:
            adopted = self.handle_request(sock, peer)
        finally:
            if not adopted:  # else the dispatcher counts it down when it closes it
                self._peer_closed()

    def _peer_closed(self) -> None:
        with self._conns_lock:
            self._peers -= 1

    # ------------------------------------------------------------ connections
    def handle_request(self, sock: socket.socket, peer: Any) -> bool:  # type: ignore[override]
        """Authenticate the peer and hand it to the dispatcher; True once handed over."""
        conn: Connection | None
        try:
            tune_socket(sock)
            timeout = self.handshake_timeout
            deadline = time.monotonic() + timeout  # for the TLS and the authkey handshake
            if self.tls is not None:
                conn = tls.accept(self.tls, sock, deadline, _peer(peer), timeout, self.refused)
                if conn is None:
                    return False
            else:
                set_socket_timeouts(sock, timeout, timeout)  # a silent peer gives up its thread
                conn = _Handshake(sock.detach(), deadline)
        except OSError:
            sock.close()
            return False
        with self._conns_lock:
            if self.stop_event.is_set():
                conn.close()
                return False
            self._conns.add(conn)
        try:
            if self._authenticate(conn, peer):
                assert self._dispatcher is not None, "serve_store() first"
                if isinstance(conn, tls.TLSConnection):
                    self._dispatcher.adopt(conn.keep())  # non-blocking, no timeouts
                    return True
                set_socket_timeouts(conn.fileno(), None, None)  # idle clients are normal
                # The Connection cannot give its descriptor away: the dispatcher gets a
                # duplicate, and this one closes below.
                self._dispatcher.adopt(socket.socket(fileno=os.dup(conn.fileno())))
                return True
        except OSError:
            pass  # the peer went away
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()
        return False

    def _fallback(self, sock: socket.socket, first: bytes) -> None:
        threading.Thread(target=self._serve_stock, args=(sock, first), daemon=True,
                         name="mpstore-stock-proxy").start()

    def _authenticate(self, conn: Connection, peer: Any) -> bool:
        """The stock mutual challenge; False (and a log line naming the peer) on failure."""
        # CPython internal: deliver_challenge/answer_challenge, as Listener.accept() runs
        # them (see Channel for the client's side).
        try:
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
            return True
        except AuthenticationError as exc:
            self.refused.add("auth")
            log.warning("Rejected connection from %s: authentication failed (%s); "
                        "does the client use the server's authkey?", _peer(peer), exc)
        except EOFError:
            log.debug("Connection from %s closed during the handshake", _peer(peer))
        except BlockingIOError:
            self.refused.add("handshake")
            log.warning("Dropped connection from %s: no handshake within %g s",
                        _peer(peer), self.handshake_timeout)
        except OSError as exc:
            self.refused.add("handshake")
            if tls.looks_like_tls(getattr(conn, "first", b"")):
                log.warning("Rejected connection from %s: it speaks TLS and this server does "
                            "not (start it with --tls-cert and --tls-key)", _peer(peer))
            else:
                log.warning("Dropped connection from %s during the handshake: %s",
                            _peer(peer), exc)
        return False

def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _shutdown_fd(fd: int) -> None:
    """shutdown(2) a socket owned by a Connection, waking its thread's blocked read."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()


class StoreManager(BaseManager):
    """The manager class of the store server. Serve with :func:`serve`; a stock client may
    use ``StoreManager(address, authkey=key)``, ``.connect()``, ``.get_store()``."""

    _Server = StoreServer


StoreManager.register("get_store", exposed=SERVED)


class _StopSignal(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM to end :func:`serve`'s wait."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[Callable[[], None]]:
    """While serving, SIGINT and SIGTERM raise _StopSignal in the main thread. Raising (not
    setting an Event) is the safe way out: a handler that took the Event's lock could
    deadlock against the wait it interrupted. Yields ``quiet()``, which makes further signals
    only log (for the graceful stop: it must not be interrupted half-way)."""

    def quiet() -> None:
        if enabled:
            signal.signal(signal.SIGINT, _ignore)
            signal.signal(signal.SIGTERM, _ignore)

    def handler(signum: int, frame: Any) -> None:
        quiet()
        raise _StopSignal(signum)

    if not enabled:
        yield quiet
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield quiet
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ignore(signum: int, frame: Any) -> None:
    log.info("Received %s while stopping; still stopping", signal.Signals(signum).name)


def _tick(store: Any, interval: float, stop: threading.Event) -> None:
    """The watchdog ticker (D12): timeouts fire even when no client calls."""
    while not stop.wait(interval):
        try:
            store.run_watchdog()
        except Exception:
            log.exception("Watchdog pass failed")


def _registry(store: Any) -> dict[str, Any]:
    """StoreManager's registry with ``get_store`` answering this store (for stock proxies)."""
    # CPython internal: BaseManager._registry, filled by register(): typeid -> (callable,
    # exposed, method_to_typeid, proxytype), as Server.create reads it.
    return {**StoreManager._registry,  # type: ignore[attr-defined]
            "get_store": (lambda: store, SERVED, None, AutoProxy)}


def serve(store: Any, host: str = "127.0.0.1", port: int = 4747, *, authkey: bytes,
          watchdog_interval: float | None = 1.0, handshake_timeout: float = 5.0,
          max_connections: int = MAX_CONNECTIONS, max_message_size: int = MAX_MESSAGE_SIZE,
          busy_poll: float = BUSY_POLL, allow_classes: Iterable[str | type] = (),
          tls_context: ssl.SSLContext | None = None, stop: threading.Event | None = None,
          on_ready: Callable[[tuple[str, int]], None] | None = None, call_stats: bool = True,
          metrics: tuple[str, int] | None = None) -> str:
    """Serve ``store`` on ``host:port`` until ``stop`` is set or, when called from the main
    thread, SIGINT or SIGTERM arrives; then stop gracefully and return why ("SIGTERM" ...).

    ``watchdog_interval``: seconds between background watchdog passes (None: no ticker).
    ``max_connections``: peers served at once (more are refused); ``max_message_size``: the
    largest request in bytes (a larger one gets InvalidArgument); ``busy_poll``: seconds the
    dispatcher polls without sleeping while requests come close together (0: never; see
    :class:`~mpstore.manager.loop.Dispatcher`); ``allow_classes``: names (``"module.Name"``, or
    the objects) that requests may contain beyond the default allow-list (see
    :mod:`~mpstore.manager.safe_pickle`); ``tls_context``: a server context
    (:func:`~mpstore.manager.tls.server_context`) that every connection speaks TLS with;
    ``call_stats``: count and time every call (for statistics() and metrics); ``metrics``:
    serve Prometheus metrics on this ``(host, port)`` too (needs ``mpstore[metrics]``; see
    :mod:`mpstore.metrics`).
    ``on_ready(address)`` is called once the server accepts connections. Raises
    ServerStartError if it cannot listen (the SPEC §6 message)."""
    stop = stop if stop is not None else threading.Event()
    ticking = threading.Event()  # set: the ticker ends
    server: StoreServer | None = None
    exporter: Any = None
    reason = "stop"
    with _stop_on_signals(threading.current_thread() is threading.main_thread()) as quiet:
        try:
            if watchdog_interval is not None:
                threading.Thread(target=_tick, name="mpstore-watchdog", daemon=True,
                                 args=(store, watchdog_interval, ticking)).start()
            server = StoreServer(_registry(store), (host, port), authkey,
                                 handshake_timeout=handshake_timeout,
                                 max_connections=max_connections,
                                 max_message_size=max_message_size, busy_poll=busy_poll,
                                 allow_classes=allow_classes, call_stats=call_stats,
                                 tls_context=tls_context)
            extra = server.allow.extra()
            if extra:
                log.info("Requests may also contain: %s (--allow-class)", ", ".join(extra))
            server.serve_store(store)
            if metrics is not None:
                from ..metrics import start_exporter

                exporter = start_exporter(server.statistics, *metrics)
            log.info("Starting server at %s:%s", host, server.address[1])
            server.start()
            if on_ready is not None:
                on_ready(server.address)
            stop.wait()
        except _StopSignal as sig:
            reason = str(sig)
        except BaseException:
            ticking.set()
            if server is not None:
                server.stop()
            raise
        quiet()
        ticking.set()
        if exporter is not None:
            exporter.stop()
        if server is not None:
            log.info("Stopping server at %s:%s (%s)", host, server.address[1], reason)
            server.stop()
            log.info("Server stopped")
    return reason
