"""``agl store``'s start-up (server side, beside the CLI): what happens between the parsed
options and a serving server.

:func:`run` builds the store from the options, tunes the process it runs in (below), checks
the port, resolves the key, then hands over to :func:`mpstore.manager.server.serve`, and
turns every reason it cannot start into SPEC §6's message and exit code 1. The transport
(:mod:`mpstore.manager`) only serves a store it is given.

Process-wide settings, made here and not in ``serve()`` so that a library user's process is
left alone:

* :func:`raise_fd_limit`: one file descriptor per client connection, so lift the soft limit
  to the hard one.
* :func:`tune_gc`: freeze what survives a full garbage collection (see
  :func:`freeze_survivors`).
"""

from __future__ import annotations

import gc
import logging
import ssl
from collections.abc import Iterable
from typing import Any

from .errors import AuthenticationFailed, InvalidArgument, ServerStartError, StorageError
from .manager import tls
from .manager.auth import is_loopback, resolve_authkey
from .manager.loop import BUSY_POLL
from .manager.ports import check_port_free, start_failure_message
from .manager.safe_pickle import AllowList
from .manager.server import MAX_CONNECTIONS, serve
from .manager.wire import MAX_MESSAGE_SIZE
from .store import InMemoryStore

__all__ = ["METRICS_HOST", "freeze_survivors", "raise_fd_limit", "run", "tune_gc"]

# The server's logger: start-up lines read as the server's, as README documents them.
log = logging.getLogger("mpstore.manager.server")
#: Default address of the metrics endpoint (``agl store --metrics-host``): loopback only.
METRICS_HOST = "127.0.0.1"


def run(host: str = "127.0.0.1", port: int = 4747, *, authkey_file: str | None = None,
        watchdog_interval: float = 1.0, eviction_threshold: float | int | None = None,
        safe_threshold: float | int | None = None, handshake_timeout: float = 5.0,
        data_dir: str | None = None, synchronous: str = "normal",
        max_connections: int = MAX_CONNECTIONS, max_message_size: int = MAX_MESSAGE_SIZE,
        busy_poll: float = BUSY_POLL, allow_classes: Iterable[str] = (),
        call_stats: bool = True, metrics_host: str = METRICS_HOST,
        metrics_port: int | None = None, tls_cert: str | None = None,
        tls_key: str | None = None, tls_client_ca: str | None = None,
        backend: str | None = None, migrate: bool = False) -> int:
    """``agl store``: serve a store (in memory, durable in ``data_dir``, or on the PostgreSQL
    database ``backend``) until SIGINT/SIGTERM, with Prometheus metrics on
    ``metrics_host:metrics_port`` if a port is given (see :mod:`mpstore.metrics`). Returns the
    exit code: 0 after a graceful stop, 1 if the server could not start (the reason is logged:
    port taken, key unusable, data directory locked or damaged, database unreachable or of a
    newer/foreign schema).

    With ``tls_cert`` (and ``tls_key``, unless the key is in the certificate's file) every
    connection speaks TLS; ``tls_client_ca`` requires clients to show a certificate it signed.
    Raises InvalidArgument for option values the store rejects (a usage error), or an
    ``allow_classes`` name that cannot be imported."""
    allow_classes = list(allow_classes)
    AllowList.for_requests(allow_classes)  # a name that cannot be imported: a usage error
    raise_fd_limit()
    try:
        store = _build_store(backend, migrate, eviction_threshold=eviction_threshold,
                             safe_threshold=safe_threshold,
                             watchdog_interval=watchdog_interval, data_dir=data_dir,
                             synchronous=synchronous)
    except StorageError as exc:
        log.error("%s", start_failure_message(host, port, reason=str(exc)))
        return 1
    tune_gc()
    try:
        context = _tls_context(tls_cert, tls_key, tls_client_ca)
        _warn_exposure(host, port, context is not None, metrics_host, metrics_port)
        check_port_free(host, port)
        try:
            key = resolve_authkey(host, port, authkey_file=authkey_file, create=True)
        except AuthenticationFailed as exc:
            raise ServerStartError(start_failure_message(host, port, reason=str(exc))) from None
        log.info("Authkey from %s", key.source)
        if data_dir is not None:
            log.info("Data directory %s (synchronous=%s)", data_dir, synchronous)
        metrics = None if metrics_port is None else (metrics_host, metrics_port)
        serve(store, host, port, authkey=key.key, watchdog_interval=watchdog_interval,
              handshake_timeout=handshake_timeout, max_connections=max_connections,
              max_message_size=max_message_size, busy_poll=busy_poll,
              allow_classes=allow_classes, call_stats=call_stats, metrics=metrics,
              tls_context=context)
    except ServerStartError as exc:
        log.error("%s", exc)
        return 1
    finally:
        store.close()
    return 0


def _tls_context(cert: str | None, key: str | None, client_ca: str | None
                 ) -> ssl.SSLContext | None:
    """The server's TLS context (None without ``cert``), logged. Raises ServerStartError
    naming a file that cannot be used."""
    if cert is None:
        return None
    context = tls.server_context(cert, key or None, client_ca)
    log.info("TLS with certificate %s%s", cert,
             f"; clients must show a certificate signed by {client_ca}" if client_ca else "")
    return context


def _warn_exposure(host: str, port: int, tls_on: bool, metrics_host: str,
                   metrics_port: int | None) -> None:
    """Say so when the store, or its metrics, can be reached from beyond this machine."""
    if not is_loopback(host):
        log.warning("Listening on %s:%s, beyond this machine: anyone who can reach it and "
                    "holds the authkey has full access to the store. Keep the key "
                    "secret%s.", host, port,
                    "" if tls_on else "; without TLS (--tls-cert) the traffic is "
                    "readable on the network")
    if metrics_port is not None and not is_loopback(metrics_host):
        log.warning("Serving metrics on %s:%s, beyond this machine, without a key",
                    metrics_host, metrics_port)


def _build_store(backend: str | None, migrate: bool, *, eviction_threshold: float | int | None,
                 safe_threshold: float | int | None, watchdog_interval: float,
                 data_dir: str | None, synchronous: str) -> Any:
    """The store ``agl store`` serves: in memory (optionally durable), or PostgreSQL."""
    if backend is None:
        return InMemoryStore(eviction_threshold=eviction_threshold,
                             safe_threshold=safe_threshold,
                             watchdog_interval=watchdog_interval, copy_records=False,
                             data_dir=data_dir, synchronous=synchronous)
    if data_dir is not None:
        raise InvalidArgument("--backend and --data-dir exclude each other: the database "
                              "is where the state is kept")
    if eviction_threshold is not None or safe_threshold is not None:
        log.warning("--eviction-threshold/--safe-threshold have no effect with --backend: "
                    "spans are kept in the database, not in memory")
    try:
        from .postgres import PostgresStore
    except ImportError as exc:
        raise StorageError(f"--backend needs the postgres extra ({exc}): "
                           "pip install 'mpstore[postgres]'") from None
    store = PostgresStore(backend, watchdog_interval=watchdog_interval, migrate=migrate,
                          copy_records=False)
    log.info("Backend %s (schema %s)", store.safe_url, store.schema)
    return store


def raise_fd_limit() -> None:
    """Lift the soft limit of open files to the hard one (best effort)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def freeze_survivors(phase: str, info: dict[str, int]) -> None:
    """A ``gc.callbacks`` entry: what survives a full collection is frozen (``gc.freeze``),
    so later collections skip it.

    Why: a store holds millions of container objects (spans, their dicts) and no reference
    cycles among them, yet every full collection walks them all, and one runs each time the
    heap has grown by a quarter: measured, 0.35 s of stalled server per 300,000 stored spans
    (over a second with a million); in a loop that keeps what it unpickles, a span cost 11 µs,
    growing with the heap, against 8 µs, flat, with this policy; the benchmark's batched
    cycle runs 19 % faster with it. Frozen objects are still
    freed by reference counting; only a reference cycle that was alive at a full collection
    and becomes garbage later is never collected (rare and small: an exception being handled
    at that instant, say).
    """
    # gc.freeze and gc.callbacks (with info["generation"]) are documented CPython APIs
    # (3.7+), not internals.
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def tune_gc() -> None:
    """Freeze what exists now (imports, a restored durable store) and what survives every
    full collection from now on (idempotent)."""
    gc.collect()
    gc.freeze()
    if freeze_survivors not in gc.callbacks:
        gc.callbacks.append(freeze_survivors)
