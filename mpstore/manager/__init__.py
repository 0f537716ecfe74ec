"""The transport: serve one store over TCP with ``multiprocessing.managers`` and reach it with
:func:`connect`.

Layers (each only talks to the one below): :mod:`.client` (the store API, retries) →
:mod:`.proxy` (one authenticated connection per thread) → :mod:`.wire` (the manager's messages)
← :mod:`.server` (accepts, authenticates, calls the store). :mod:`.auth` resolves the authkey
for both sides, :mod:`.ports` explains a taken port, :mod:`.process` runs ``agl store`` as a
subprocess (for examples and tests). No store logic lives here.
"""

from .auth import resolve_authkey
from .client import StoreClient, connect, parse_address
from .process import ServerProcess, start_server
from .server import StoreManager, StoreServer, run, serve

__all__ = [
    "ServerProcess",
    "StoreClient",
    "StoreManager",
    "StoreServer",
    "connect",
    "parse_address",
    "resolve_authkey",
    "run",
    "serve",
    "start_server",
]
