"""The transport: serve one store over TCP with ``multiprocessing.managers`` and reach it with
:func:`connect`. No store logic lives here; what it knows of each call comes from the call
table, :mod:`mpstore.api`.

Layers (each only talks to the one below): :mod:`.client` (the store API, retries) →
:mod:`.proxy` (one authenticated connection per thread) → :mod:`.wire` (the manager's messages)
← :mod:`.server` (accepts, authenticates, calls the store). :mod:`.auth` resolves the authkey
for both sides, :mod:`.ports` explains a taken port, :mod:`.process` runs ``agl store`` as a
subprocess (for examples and tests).

The client-side names are imported with the package; the server-side ones (``serve``,
``StoreServer`` ...) when first asked for, so that a process that only connects does not load
the server, nor the store it serves.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .auth import resolve_authkey
from .client import StoreClient, connect, parse_address

if TYPE_CHECKING:
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

#: Names imported on first use, and their modules.
_LAZY = {"ServerProcess": ".process", "StoreManager": ".server", "StoreServer": ".server",
         "run": ".server", "serve": ".server", "start_server": ".process"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
