"""The rollout rows a store last read or wrote, for writes in one round trip.

A hit is only a guess: the row may have been written since, by this server or another. A
write from a cached row goes through ``mpstore_write_span`` / ``mpstore_write``, which apply it
only if the row is still at the cached ``version`` (optimistic concurrency); otherwise the
caller drops the entry and takes the locked path (read ``FOR UPDATE``, apply, write). So the
cache can make a call faster, never wrong. Entries are the row's bytes, decoded afresh for
each use: no two threads share a record they mutate.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["RowCache"]


class RowCache:
    """The ``size`` most recently used rows: rollout id -> (version, record, queued)."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._rows: OrderedDict[str, tuple[int, bytes, bool]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, rollout_id: str) -> tuple[int, bytes, bool] | None:
        with self._lock:
            return self._rows.get(rollout_id)

    def put(self, rollout_id: str, version: int, record: bytes, queued: bool) -> None:
        with self._lock:
            self._rows[rollout_id] = (version, record, queued)
            self._rows.move_to_end(rollout_id)
            if len(self._rows) > self._size:
                self._rows.popitem(last=False)

    def drop(self, rollout_id: str) -> None:
        with self._lock:
            self._rows.pop(rollout_id, None)
