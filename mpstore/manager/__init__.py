"""The transport: serve one store over TCP with ``multiprocessing.managers`` and reach it with
:func:`connect`. No store logic lives here: what it knows of each call comes from the call
table, :mod:`mpstore.api`.

===============  ==========  =============================================================
module           side        holds
===============  ==========  =============================================================
``client``       client      ``connect()``, ``StoreClient``: the store API, retries, slices
``channel``      client      ``Channel``: one authenticated connection per thread, fork-safe
``wire``         shared      framing, requests and replies, packed spans, the size limit
``sockets``      shared      TCP options and the kernel's timeouts
``auth``         shared      the authkey: explicit, environment, key files
``safe_pickle``  shared      restricted decoding: the allow-list both ends unpickle with
``tls``          shared      TLS contexts, the non-blocking server handshake, TLSConnection
``server``       server      ``serve()``, ``StoreServer``: accept, authenticate, hand over
``loop``         server      ``Dispatcher``: one epoll thread answers every connection
``blocking``     server      blocking calls in worker threads, a caller's hang-up noticed
``stock``        server      stock ``BaseProxy`` clients, served as the stock server does
``ports``        server      who holds a port; SPEC §6's start-failure messages
===============  ==========  =============================================================

A client imports only the client-side and shared modules. Elsewhere: ``agl store``'s
start-up (the store from options, process tuning) is :mod:`mpstore.startup`, beside the CLI;
the harness that runs a server in a subprocess for tests and examples is
:mod:`mpstore.testing`.

The client-side names are imported with the package; the server-side ones (``serve``,
``StoreServer``, ``StoreManager``) when first asked for, so that a process that only connects
loads neither the server nor the store it serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .auth import resolve_authkey
from .client import StoreClient, connect, parse_address

if TYPE_CHECKING:
    from .server import StoreManager, StoreServer, serve

__all__ = [
    "StoreClient",
    "StoreManager",
    "StoreServer",
    "connect",
    "parse_address",
    "resolve_authkey",
    "serve",
]

#: The server-side names, imported on first use (PEP 562).
_SERVER_SIDE = frozenset({"StoreManager", "StoreServer", "serve"})


def __getattr__(name: str) -> Any:
    if name not in _SERVER_SIDE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import server

    return getattr(server, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
