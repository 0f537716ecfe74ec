"""The exception tree of mpstore.

::

    MpstoreError
    ├── StoreError                 raised by the store itself; never retried by the client
    │   ├── RolloutNotFound        (also ValueError)   "Rollout X not found"
    │   ├── AttemptNotFound        (also ValueError)   "Attempt A not found for rollout X"
    │   ├── NoAttempts             (also ValueError)   "No attempts found for rollout X"
    │   ├── InvalidArgument        (also ValueError)   bad status, config, type or id
    │   ├── SpansEvicted           (also RuntimeError) "Spans for rollout X have been evicted"
    │   └── StorageError           (also RuntimeError) the data directory cannot be used or
    │                              written (locked, foreign, damaged, disk full)
    ├── StoreUnavailable           (also ConnectionError) server unreachable after retries, or a
    │                              write whose request may have reached a server that then died
    ├── AuthenticationFailed       (also multiprocessing.AuthenticationError) wrong authkey
    ├── VersionMismatch            client and server speak different wire versions
    └── ServerStartError           (also RuntimeError) the server could not start (port taken ...)

Every class pickles and unpickles to an equal exception (same class, same message), because
store errors cross the process boundary: each keeps its constructor arguments in ``args``.
The messages keep agent-lightning's wording (D14), so code matching on them keeps working.
"""

from __future__ import annotations

import multiprocessing

__all__ = [
    "AttemptNotFound",
    "AuthenticationFailed",
    "InvalidArgument",
    "MpstoreError",
    "NoAttempts",
    "RolloutNotFound",
    "ServerStartError",
    "SpansEvicted",
    "StorageError",
    "StoreError",
    "StoreUnavailable",
    "VersionMismatch",
]


class MpstoreError(Exception):
    """Base of every exception mpstore raises on purpose."""


class StoreError(MpstoreError):
    """The store refused an operation; the state is unchanged. Retrying will not help."""


class RolloutNotFound(StoreError, ValueError):
    def __init__(self, rollout_id: str) -> None:
        super().__init__(f"Rollout {rollout_id} not found")
        self.rollout_id = rollout_id

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.rollout_id,)


class AttemptNotFound(StoreError, ValueError):
    def __init__(self, rollout_id: str, attempt_id: str) -> None:
        super().__init__(f"Attempt {attempt_id} not found for rollout {rollout_id}")
        self.rollout_id = rollout_id
        self.attempt_id = attempt_id

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.rollout_id, self.attempt_id)


class NoAttempts(StoreError, ValueError):
    def __init__(self, rollout_id: str) -> None:
        super().__init__(f"No attempts found for rollout {rollout_id}")
        self.rollout_id = rollout_id

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.rollout_id,)


class InvalidArgument(StoreError, ValueError):
    """A value the store cannot accept; the message names the argument and what is allowed."""


class SpansEvicted(StoreError, RuntimeError):
    def __init__(self, rollout_id: str) -> None:
        super().__init__(f"Spans for rollout {rollout_id} have been evicted")
        self.rollout_id = rollout_id

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.rollout_id,)


class StorageError(StoreError, RuntimeError):
    """The durable store's data directory cannot be opened, read or written."""


class StoreUnavailable(MpstoreError, ConnectionError):
    """The server could not be reached (after retries, for calls that are safe to retry)."""


class AuthenticationFailed(MpstoreError, multiprocessing.AuthenticationError):
    """The server and the client do not share the same authkey."""


class VersionMismatch(MpstoreError):
    """The client and the server speak different versions of the wire format (how records
    are pickled): the message names both and which side to upgrade. Never retried."""


class ServerStartError(MpstoreError, RuntimeError):
    """The server could not start; the message says why (for a taken port: who holds it)."""
