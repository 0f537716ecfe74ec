"""mpstore: a shared store of rollouts, attempts, spans and resources for multi-process
agent-RL and batch workloads, served to other processes over ``multiprocessing.managers``.

In process::

    from mpstore import InMemoryStore
    store = InMemoryStore()

From another process (a server started with ``agl store``)::

    from mpstore import connect
    store = connect("127.0.0.1:4747")
"""

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
)
from .manager.client import StoreClient, connect
from .store import InMemoryStore
from .types import (
    LLM,
    UNSET,
    Attempt,
    AttemptedRollout,
    AttemptStatus,
    PromptTemplate,
    ProxyLLM,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    Unset,
)

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "UNSET",
    "Attempt",
    "AttemptNotFound",
    "AttemptStatus",
    "AttemptedRollout",
    "AuthenticationFailed",
    "InMemoryStore",
    "InvalidArgument",
    "MpstoreError",
    "NoAttempts",
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
    "__version__",
    "connect",
]
