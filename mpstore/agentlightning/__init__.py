"""mpstore as agent-lightning's store: ``MpstoreLightningStore(store)``.

Works with agent-lightning 0.3.0 and 0.2.2 (whichever is installed)::

    pip install 'mpstore[agentlightning]'

    from mpstore import connect
    from mpstore.agentlightning import MpstoreLightningStore
    store = MpstoreLightningStore(connect("127.0.0.1:4747"))   # an `agl store` server
    trainer = agl.Trainer(store=store, strategy={"type": "cs", "managed_store": False}, ...)

Importing this package imports ``agentlightning``; the core of mpstore never does.
"""

from __future__ import annotations

try:
    import agentlightning as _agentlightning  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mpstore.agentlightning needs agent-lightning: pip install 'mpstore[agentlightning]'"
    ) from exc

from .store import MpstoreLightningStore

__all__ = ["MpstoreLightningStore"]
