"""``add_span`` on the server loop's own connection, in libpq's pipeline mode.

``add_span`` is most of what runners send (ten of the benchmark cycle's thirteen calls). As a
worker-thread call it paid a pool checkout and two thread hand-offs on top of its one
statement. :class:`SpanPipeline` is the server loop's :class:`~mpstore.manager.pipelined.
Pipeline` for it: the loop sends the span's statement (:data:`~.fast.ADD_SPAN`, built from
the cached row exactly as the worker's fast path builds it) on a connection of its own without
waiting, and answers when the result arrives. Each statement is followed by a sync, so each
is its own transaction, as on the worker's path: one span's failure touches no other.

What is not certain goes to the full path (``FALLBACK``), which decides as it always has:
anything but one positional span, a span that fails validation (the full path raises the
error), no cached row, a stale row, a duplicate (the full path returns the stored span), and
every span in flight when the connection is lost (add_span is idempotent: D7). Meanwhile the
connection is made again by a thread of its own, so the loop never waits for a connect.
"""

from __future__ import annotations

import collections
import itertools
import pickle
import threading
from collections.abc import Callable
from typing import Any

from .. import validate as v
from ..errors import StoreError
from ..manager.pipelined import FALLBACK, RESULT, Done, Register
from .fast import ADD_SPAN, FastPaths
from .pq import encode, numbered, rows

__all__ = ["PIPELINE_APPLICATION", "RECONNECT_EVERY", "SpanPipeline"]

#: The pipeline connection's ``application_name`` (as ``pg_stat_activity`` shows it).
PIPELINE_APPLICATION = "mpstore-pipeline"

_NAME = b"mpstore_pipeline_span"
#: Seconds between attempts to connect again.
RECONNECT_EVERY = 1.0
_dumps = pickle.dumps


class SpanPipeline:
    """See the module docstring. ``connect()`` returns a new psycopg connection."""

    names = frozenset({"add_span"})

    def __init__(self, connect: Callable[[], Any], fast: FastPaths) -> None:
        self._connect, self._fast = connect, fast
        self._conn: Any = None  # in use (the loop's thread only)
        self._fresh: Any = None  # made by the connecting thread, not yet in use
        #: Sent, not yet synced: (row to cache, span, done) each.
        self._unsynced: list[tuple[Any, Any, Done]] = []
        #: Synced, not yet answered, in order: one list as above per transaction.
        self._inflight: collections.deque[list[tuple[Any, Any, Done]]] = collections.deque()
        self._results: list[Any] = []  # the oldest transaction's results so far
        self._register: Register | None = None
        self._unregister: Callable[[int], None] | None = None
        self._fd = -1
        self._closed = threading.Event()
        self._connecting: threading.Thread | None = None

    # ----------------------------------------------------------------- the loop's calls
    def attach(self, register: Register, unregister: Callable[[int], None]) -> None:
        self._register, self._unregister = register, unregister
        self._connect_later(0.0)

    def submit(self, name: str, args: tuple[Any, ...], kwds: dict[str, Any], done: Done
               ) -> bool:
        if kwds or len(args) != 1 or (self._conn is None and not self._adopt()):
            return False
        try:
            span = v.span(args[0])
        except StoreError:
            return False
        record = _dumps(span, 5)
        prepared = self._fast.span_statement(span, record)
        if prepared is None:
            return False
        params, after = prepared
        try:
            self._conn.pgconn.send_query_prepared(_NAME, *encode(params), 1)
        except Exception:  # the connection is lost: this span was not sent
            self._lost()
            return False
        self._unsynced.append((after, span, done))
        return True

    def flush(self) -> None:
        """End the transaction of the spans submitted since the last flush and send them."""
        if not self._unsynced:
            return
        group, self._unsynced = self._unsynced, []
        self._inflight.append(group)
        try:
            self._conn.pgconn.pipeline_sync()  # sends the buffer too
        except Exception:
            self._lost()

    def _ready(self, mask: int) -> None:
        """Results arrived (or the connection failed): answer the spans they finish."""
        from psycopg import pq

        pgconn = self._conn.pgconn
        finished = []
        try:
            pgconn.flush()
            pgconn.consume_input()
            while self._inflight and not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    continue  # the end of a statement's results
                if result.status == pq.ExecStatus.PIPELINE_SYNC:
                    finished.append((self._inflight.popleft(), self._results))
                    self._results = []
                else:
                    self._results.append(result)
        except Exception:
            pass  # consume_input failed: the connection is gone (see below)
        for group, results in finished:
            for (after, span, done), result in itertools.zip_longest(group, results):
                self._answer(after, span, done, result)
        if pgconn.status != pq.ConnStatus.OK:
            self._lost()

    def _answer(self, after: Any, span: Any, done: Done, result: Any) -> None:
        """One span's answer. Anything but a result (an error, or a statement not run after
        another's error in the same transaction) goes to the full path: nothing of that
        transaction was written, and add_span is idempotent."""
        from psycopg import pq

        if result is not None and result.status == pq.ExecStatus.TUPLES_OK and \
                self._fast.span_written(after, rows(result)[0][0]):
            done(RESULT, span)
        else:
            done(FALLBACK, None)  # also a duplicate (D7) and a stale row: see the module

    # ----------------------------------------------------------------- the connection
    def _adopt(self) -> bool:
        """Take a connection the connecting thread made, if there is one."""
        conn, self._fresh = self._fresh, None
        if conn is None or self._register is None:
            return False
        pgconn = conn.pgconn
        pgconn.enter_pipeline_mode()
        pgconn.nonblocking = 1
        self._conn, self._fd = conn, pgconn.socket
        self._register(self._fd, self._ready)
        return True

    def _lost(self) -> None:
        """The connection failed: the spans in flight go to the full path, and another
        connection is made."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        assert self._unregister is not None
        self._unregister(self._fd)
        groups = [*self._inflight, self._unsynced]
        self._inflight, self._unsynced, self._results = collections.deque(), [], []
        for group in groups:
            for _, _, done in group:
                done(FALLBACK, None)
        try:
            conn.close()
        except Exception:
            pass
        self._connect_later(RECONNECT_EVERY)

    def _connect_later(self, delay: float) -> None:
        """Connect in a thread of its own: after ``delay`` seconds, then every
        RECONNECT_EVERY seconds until it succeeds (or the pipeline is closed)."""
        from psycopg import pq

        def connect() -> None:
            wait = delay
            while not self._closed.wait(wait):
                wait = RECONNECT_EVERY
                try:
                    conn = self._connect()
                except Exception:
                    continue  # the database is down: try again
                if conn.pgconn.prepare(_NAME, numbered(ADD_SPAN)).status == \
                        pq.ExecStatus.COMMAND_OK:
                    self._fresh = conn
                    return
                conn.close()

        self._connecting = threading.Thread(target=connect, name="mpstore-pipeline-connect",
                                            daemon=True)
        self._connecting.start()

    def close(self) -> None:
        """Stop connecting and close the connections (after the loop has stopped)."""
        self._closed.set()
        for conn in (self._conn, self._fresh):
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
        self._conn = self._fresh = None
