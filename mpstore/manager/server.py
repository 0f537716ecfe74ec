"""The server: one store served over TCP by a ``BaseManager`` subclass (SPEC §5).

``StoreServer`` is a ``multiprocessing.managers.Server`` (the class ``StoreManager`` serves
with) with four changes, each because the stock one falls short:

* it listens with a backlog of 128 (stock: 16, which stalls bursts of connections for a
  second each, the SYN retry time);
* it authenticates each peer in that peer's own thread, with a time limit (stock: in the one
  accept loop, so a single silent peer stalls every newcomer), logs a failed handshake with the
  peer's address and goes on serving;
* it sets ``TCP_NODELAY`` on every connection (see :mod:`.proxy`);
* its request loop serves the store under the fixed ident ``"store"`` from a method table and
  sends exceptions with their tracebacks (:mod:`.wire`).

Stock ``BaseProxy`` clients still work (``StoreManager(address, authkey).connect()`` then
``.get_store()``). This module only moves calls: every request is one method of the store.

:func:`serve` serves a given store object (tests inject one with a controlled clock);
:func:`run` is ``agl store``: it builds the store from options and returns the exit code.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import pickle
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from multiprocessing.managers import AutoProxy, BaseManager, Server
from multiprocessing.process import AuthenticationString
from typing import Any

from ..errors import AuthenticationFailed, InvalidArgument, ServerStartError, StorageError
from ..store import InMemoryStore
from .auth import is_loopback, resolve_authkey
from .ports import bind_failure, check_port_free, start_failure_message
from .proxy import set_socket_timeouts, tune_socket
from .wire import STORE_IDENT, dump_error, dump_reply, remote_methods

__all__ = ["BACKLOG", "StoreManager", "StoreServer", "run", "serve"]

log = logging.getLogger(__name__)
BACKLOG = 128
_loads = pickle.loads


def _listen(address: tuple[str, int], backlog: int) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR, so a restart need not wait out TIME_WAIT).
    Raises ServerStartError (the SPEC §6 message) if the address cannot be bound."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise bind_failure(host, port, exc) from None


class StoreServer(Server):
    """A manager server that serves one store; see the module docstring."""

    # No remote "shutdown": the server stops on SIGINT/SIGTERM or its stop event.
    public = [name for name in Server.public if name != "shutdown"]

    def __init__(self, registry: dict[str, Any], address: tuple[str, int], authkey: bytes,
                 serializer: str = "pickle", *, handshake_timeout: float = 5.0,
                 backlog: int = BACKLOG) -> None:
        # Not Server.__init__: it binds with a backlog of 16 through a Listener that
        # authenticates inside accept(). These are the attributes Server's methods use.
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
        self._conns: set[Connection] = set()
        self._conns_lock = threading.Lock()
        self._accepter: threading.Thread | None = None

    def serve_store(self, store: Any) -> None:
        """Serve ``store``'s public methods (except ``close``) under the ident ``"store"``."""
        exposed = remote_methods(type(store))
        self.id_to_obj[STORE_IDENT] = (store, frozenset(exposed), None)
        self._methods = {name: getattr(store, name) for name in exposed}

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Accept connections in a background thread."""
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
            try:
                threading.Thread(target=self.handle_request, args=(sock, peer),
                                 name=f"mpstore-{_peer(peer)}", daemon=True).start()
            except RuntimeError as exc:  # "can't start new thread"
                log.error("Refused connection from %s: %s", _peer(peer), exc)
                sock.close()

    # ------------------------------------------------------------ connections
    def handle_request(self, sock: socket.socket, peer: Any) -> None:  # type: ignore[override]
        """Authenticate the peer, then serve its requests until it disconnects."""
        try:
            tune_socket(sock)
            timeout = self.handshake_timeout
            set_socket_timeouts(sock, timeout, timeout)  # a silent peer gives up its thread
            conn = Connection(sock.detach())
        except OSError:
            sock.close()
            return
        with self._conns_lock:
            if self.stop_event.is_set():
                conn.close()
                return
            self._conns.add(conn)
        try:
            if self._authenticate(conn, peer):
                set_socket_timeouts(conn.fileno(), None, None)  # idle clients are normal
                self._first_request(conn)
        except (OSError, EOFError):
            pass  # the peer went away
        except Exception:
            log.exception("Unexpected error serving %s", _peer(peer))
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _authenticate(self, conn: Connection, peer: Any) -> bool:
        """The stock mutual challenge; False (and a log line naming the peer) on failure."""
        try:
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
            return True
        except AuthenticationError as exc:
            log.warning("Rejected connection from %s: authentication failed (%s); "
                        "does the client use the server's authkey?", _peer(peer), exc)
        except EOFError:
            log.debug("Connection from %s closed during the handshake", _peer(peer))
        except BlockingIOError:
            log.warning("Dropped connection from %s: no handshake within %g s",
                        _peer(peer), self.handshake_timeout)
        except OSError as exc:
            log.warning("Dropped connection from %s during the handshake: %s", _peer(peer), exc)
        return False

    def _first_request(self, conn: Connection) -> None:
        """A stock manager request (ident None: accept_connection, create, incref ...) is
        answered as Server does; anything else is already the first call of a client."""
        data = conn.recv_bytes()
        try:
            request = _loads(data)
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
            if data is None:
                try:
                    data = recv()
                except (EOFError, OSError):
                    return
            reply = answer(conn, data)
            data = None
            try:
                send(reply)
            except OSError:
                return

    def _answer(self, conn: Connection, data: bytes) -> bytes:
        """The pickled reply to one pickled request; never raises."""
        try:
            request = _loads(data)
        except Exception as exc:  # e.g. a class the server cannot import
            return dump_error(InvalidArgument(
                f"the server cannot unpickle the request ({type(exc).__name__}: {exc}); "
                "arguments must be built from types it can import (builtins, mpstore's "
                "records, modules installed on the server)"))
        try:
            ident, name, args, kwds = request
            if ident == STORE_IDENT:
                func = self._methods.get(name) or self._missing(name)
            else:
                func = self._lookup(conn, ident, name)
            return dump_reply(func(*args, **kwds))
        except Exception as exc:
            return dump_error(exc)  # with the server-side traceback (tblib)

    @staticmethod
    def _missing(name: str) -> Callable[..., Any]:
        raise AttributeError(f"the mpstore server has no method {name!r}")

    def _lookup(self, conn: Connection, ident: str, name: str) -> Callable[..., Any]:
        """A method of another registered object, as stock ``serve_client`` resolves it."""
        try:
            obj, exposed, _ = self.id_to_obj[ident]
        except KeyError:
            obj, exposed, _ = self.id_to_local_proxy_obj[ident]
        if name in exposed:
            return getattr(obj, name)
        if name in self.fallback_mapping:  # __str__, __repr__, #GETVALUE
            return functools.partial(self.fallback_mapping[name], self, conn, ident, obj)
        raise AttributeError(f"method {name!r} of {type(obj)!r} is not exposed")


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


StoreManager.register("get_store", exposed=remote_methods(InMemoryStore))


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


def _raise_fd_limit() -> None:
    """One file descriptor per client connection: lift the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _tick(store: Any, interval: float, stop: threading.Event) -> None:
    """The watchdog ticker (D12): timeouts fire even when no client calls."""
    while not stop.wait(interval):
        try:
            store.run_watchdog()
        except Exception:
            log.exception("Watchdog pass failed")


def _registry(store: Any) -> dict[str, Any]:
    """StoreManager's registry with ``get_store`` answering this store (for stock proxies)."""
    return {**StoreManager._registry,  # type: ignore[attr-defined]
            "get_store": (lambda: store, remote_methods(type(store)), None, AutoProxy)}


def serve(store: Any, host: str = "127.0.0.1", port: int = 4747, *, authkey: bytes,
          watchdog_interval: float | None = 1.0, handshake_timeout: float = 5.0,
          stop: threading.Event | None = None,
          on_ready: Callable[[tuple[str, int]], None] | None = None) -> str:
    """Serve ``store`` on ``host:port`` until ``stop`` is set or, when called from the main
    thread, SIGINT or SIGTERM arrives; then stop gracefully and return why ("SIGTERM" ...).

    ``watchdog_interval``: seconds between background watchdog passes (None: no ticker).
    ``on_ready(address)`` is called once the server accepts connections. Raises
    ServerStartError if it cannot listen (the SPEC §6 message)."""
    stop = stop if stop is not None else threading.Event()
    ticking = threading.Event()  # set: the ticker ends
    server: StoreServer | None = None
    reason = "stop"
    with _stop_on_signals(threading.current_thread() is threading.main_thread()) as quiet:
        try:
            _raise_fd_limit()
            if watchdog_interval is not None:
                threading.Thread(target=_tick, name="mpstore-watchdog", daemon=True,
                                 args=(store, watchdog_interval, ticking)).start()
            server = StoreServer(_registry(store), (host, port), authkey,
                                 handshake_timeout=handshake_timeout)
            server.serve_store(store)
            log.info("Starting server at %s:%s", host, server.address[1])
            server.start()
            if on_ready is not None:
                on_ready(server.address)
            stop.wait()
        except _StopSignal as sig:
            reason = str(sig)
        quiet()
        ticking.set()
        if server is not None:
            log.info("Stopping server at %s:%s (%s)", host, server.address[1], reason)
            server.stop()
            log.info("Server stopped")
    return reason


def run(host: str = "127.0.0.1", port: int = 4747, *, authkey_file: str | None = None,
        watchdog_interval: float = 1.0, eviction_threshold: float | int | None = None,
        safe_threshold: float | int | None = None, handshake_timeout: float = 5.0,
        data_dir: str | None = None, synchronous: str = "normal") -> int:
    """``agl store``: serve a store (in memory, or durable in ``data_dir``) until
    SIGINT/SIGTERM. Returns the exit code: 0 after a graceful stop, 1 if the server could not
    start (the reason is logged: port taken, key unusable, data directory locked or damaged).

    Raises InvalidArgument for option values the store rejects (a usage error)."""
    try:
        store = InMemoryStore(eviction_threshold=eviction_threshold,
                              safe_threshold=safe_threshold,
                              watchdog_interval=watchdog_interval, copy_records=False,
                              data_dir=data_dir, synchronous=synchronous)
    except StorageError as exc:
        log.error("%s", start_failure_message(host, port, reason=str(exc)))
        return 1
    try:
        if not is_loopback(host):
            log.warning("Listening on %s:%s, beyond this machine: anyone who can reach it and "
                        "holds the authkey can run arbitrary code in this server (the wire "
                        "format is pickle). Keep the key secret; prefer an SSH tunnel.",
                        host, port)
        check_port_free(host, port)
        try:
            key = resolve_authkey(host, port, authkey_file=authkey_file, create=True)
        except AuthenticationFailed as exc:
            raise ServerStartError(start_failure_message(host, port, reason=str(exc))) from None
        log.info("Authkey from %s", key.source)
        if data_dir is not None:
            log.info("Data directory %s (synchronous=%s)", data_dir, synchronous)
        serve(store, host, port, authkey=key.key, watchdog_interval=watchdog_interval,
              handshake_timeout=handshake_timeout)
    except ServerStartError as exc:
        log.error("%s", exc)
        return 1
    finally:
        store.close()
    return 0
