"""Operations of :class:`~.store.PostgresStore`: ``ping``, ``statistics``, the watchdog's
background passes on one server at a time, and the pruning of stored replies.

The watchdog's background passes run on the holder of a session advisory lock
(:data:`WATCHDOG_LOCK`), taken on a connection of its own: when that server dies, its
connection closes, the lock is free, and another server takes it at its next pass. The
watchdog's part on entry of REF's method set runs on every server (see :mod:`.db`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .._version import __version__
from ..errors import StorageError
from ..types import RolloutStatus
from .db import Tx
from .requests import PRUNE_EVERY, prune

__all__ = ["WATCHDOG_LOCK", "Operations"]

T = TypeVar("T")
#: Advisory lock held (per session) by the one store whose background watchdog runs.
WATCHDOG_LOCK = 0x6D707377


class Operations:
    """Methods of :class:`~.store.PostgresStore` (which provides the attributes declared
    here)."""

    if TYPE_CHECKING:
        url: str
        _psycopg: Any
        _clock: Callable[[], float]
        _started: float

        _request: Any

        def _call(self, fn: Callable[[Tx], T], *, watchdog: bool = True) -> T: ...

        def _current(self) -> tuple[str, int] | None: ...

    _lead_conn: Any = None

    def _init_operations(self) -> None:
        self._lead_conn = None
        self._lead_lock = threading.Lock()
        self._next_prune = 0.0

    def _close_operations(self) -> None:
        with self._lead_lock:
            if self._lead_conn is not None:
                self._lead_conn.close()
                self._lead_conn = None

    def ping(self) -> dict[str, Any]:
        """Who answers: name, version, pid, the store clock's time, uptime, whether it takes
        writes (always: a failed write is refused by the database, not the server), and the
        backend. Does not touch the database."""
        return {"name": "mpstore", "version": __version__, "pid": os.getpid(),
                "time": self._clock(), "uptime": time.monotonic() - self._started,
                "writable": True, "backend": "postgresql"}

    def statistics(self) -> dict[str, Any]:
        """Counts (by counting rows: costs grow with the tables), rollouts per status."""
        def run(tx: Tx) -> dict[str, Any]:
            by_status = {s.value: 0 for s in RolloutStatus}
            attempts = 0
            for status, count, tries in tx.rows(
                    "SELECT status, count(*), sum(attempts) FROM mpstore_rollouts "
                    "GROUP BY status"):
                by_status[status] = int(count)
                attempts += int(tries)
            queued = tx.one("SELECT count(*) FROM mpstore_rollouts WHERE queue_pos IS NOT NULL")
            spans = tx.one("SELECT count(*), coalesce(sum(size), 0) FROM mpstore_spans")
            resources = tx.one("SELECT count(*) FROM mpstore_resources")
            workers = tx.one("SELECT count(*) FROM mpstore_workers")
            return {
                "total_rollouts": sum(by_status.values()), "total_attempts": attempts,
                "total_spans": int(spans[0]), "total_resources": int(resources[0]),
                "queue_length": int(queued[0]), "span_bytes": int(spans[1]),
                "total_span_bytes": int(spans[1]), "total_workers": int(workers[0]),
                "rollouts_by_status": by_status, "evicted_rollouts": 0,
                "backend": "postgresql", "watchdog_leader": self._lead_conn is not None,
                # Spans are kept on disk, not in memory: no thresholds (see the module).
                "eviction_threshold_bytes": None, "safe_threshold_bytes": None,
                "memory_capacity_bytes": None, "time": tx.now,
            }

        stats = self._call(run)
        stats["name"] = type(self).__name__
        stats["uptime"] = time.monotonic() - self._started
        return stats

    def run_watchdog(self) -> int:
        """One watchdog pass now, if this store leads (holds the watchdog's advisory lock;
        else 0: another store's passes cover the database); returns how many were due."""
        if not self._lead():
            return 0
        due = self._call(lambda tx: tx.watchdog())
        if time.monotonic() >= self._next_prune:  # the stored replies, in bulk
            self._next_prune = time.monotonic() + PRUNE_EVERY
            saved, self._request.id = self._current(), None  # not part of the request
            try:
                self._call(lambda tx: prune(tx, tx.now), watchdog=False)
            finally:
                self._request.id = saved
        return due

    def _run_watchdog_quietly(self) -> None:
        try:
            self.run_watchdog()
        except StorageError:
            pass

    def _lead(self) -> bool:
        """True while this store holds the watchdog lock (tried again on every pass, on a
        connection of its own, so it is released when this process dies)."""
        with self._lead_lock:
            conn = self._lead_conn
            if conn is not None:
                try:  # still connected, so still holding the lock (one cheap round trip)
                    conn.execute("SELECT 1")
                    return True
                except self._psycopg.Error:
                    conn.close()
            try:
                conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                if conn.execute("SELECT pg_try_advisory_lock(%s)", (WATCHDOG_LOCK,)
                                ).fetchone()[0]:
                    self._lead_conn = conn
                    return True
                conn.close()
            except self._psycopg.Error:
                pass
            self._lead_conn = None
            return False
