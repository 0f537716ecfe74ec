"""mpstore: a shared store of rollouts, attempts, spans and resources for multi-process
agent-RL and batch workloads, served to other processes over ``multiprocessing.managers``.

In process::

    from mpstore import InMemoryStore
    store = InMemoryStore()

From another process (a server started with ``agl store``)::

    from mpstore import connect
    store = connect("127.0.0.1:4747")

``InMemoryStore`` is imported on first use (``from mpstore import InMemoryStore`` works as
usual): a process that only connects to a server never loads the store, its SQLite
persistence or their imports (see :mod:`mpstore.api`).
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    AttemptNotFound,
    AuthenticationFailed,
    InvalidArgument,
    MpstoreError,
    NoAttempts,
    RolloutNotFound,
    ServerStartError,
    SpansEvicted,
    StorageError,
    StoreError,
    StoreUnavailable,
    VersionMismatch,
)
from .manager.client import StoreClient, connect
from .types import (
    LLM,
    UNSET,
    Attempt,
    AttemptedRollout,
    AttemptStatus,
    FinishedRollouts,
    Page,
    PromptTemplate,
    ProxyLLM,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    Unset,
    Worker,
    WorkerStatus,
)

if TYPE_CHECKING:
    from .store import InMemoryStore

__all__ = [
    "LLM",
    "UNSET",
    "Attempt",
    "AttemptNotFound",
    "AttemptStatus",
    "AttemptedRollout",
    "AuthenticationFailed",
    "FinishedRollouts",
    "InMemoryStore",
    "InvalidArgument",
    "MpstoreError",
    "NoAttempts",
    "Page",
    "PromptTemplate",
    "ProxyLLM",
    "ResourcesUpdate",
    "Rollout",
    "RolloutConfig",
    "RolloutMode",
    "RolloutNotFound",
    "RolloutStatus",
    "ServerStartError",
    "Span",
    "SpansEvicted",
    "StorageError",
    "StoreClient",
    "StoreError",
    "StoreUnavailable",
    "Unset",
    "VersionMismatch",
    "Worker",
    "WorkerStatus",
    "__version__",
    "connect",
]


def __getattr__(name: str) -> Any:
    """``InMemoryStore``, imported when first asked for (PEP 562)."""
    if name == "InMemoryStore":
        from .store import InMemoryStore

        return InMemoryStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
