"""The hot writes on the server loop's own connection, in libpq's pipeline mode.

``add_span`` is most of what runners send (ten of the benchmark cycle's thirteen calls), and
``update_attempt``, ``enqueue_rollout`` and ``dequeue_rollout`` the other three. As
worker-thread calls each paid a pool
checkout and two thread hand-offs (~80 µs of CPU on this project's VM) on top of its one
statement. :class:`StatementPipeline` is the server loop's
:class:`~mpstore.manager.pipelined.Pipeline` for them: given a call's arguments, the store's
*plan* for it (a :class:`~.fast.Planned`, decided on the cached row exactly as the worker's
fast path decides it) is sent on a connection of the pipeline's own without waiting, and the
call is answered when its result arrives.

A claim (``dequeue_rollout``) takes two statements: the head of the queue read, then the
claim written at the version read, as any other write (see ``FastPaths.plan_claim``): the
first's ``finish`` returns the second, which goes with the next transaction.

The calls of one loop round travel as one transaction (a group commit): while two are in
flight, what comes meanwhile waits and goes, sorted by rollout, when the first is answered. A
statement's return code says what it did, and none raises for the cases the store expects
(a stale row, a duplicate span), so one call's outcome touches no other's.

What is not certain goes to the full path (``FALLBACK``), which decides as it always has:
arguments the plan refuses (the full path raises the error), no cached row, a stale row, a
duplicate span (the full path returns the stored one), every call of a transaction that
failed, and every call in flight when the connection is lost. That last is safe because
``add_span`` is idempotent (D7) and the other writes are taken only with a request id: their
reply is stored by the same statement, so a resend is answered once (see .requests).
Meanwhile the connection is made again by a thread of its own; the loop never waits for one.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from typing import Any

from ..manager.pipelined import FALLBACK, RESULT, Done, Register
from .fast import STATEMENTS, Planned
from .pq import encode, numbered, rows

__all__ = ["PIPELINE_APPLICATION", "RECONNECT_EVERY", "Plan", "StatementPipeline"]

#: The pipeline connection's ``application_name`` (as ``pg_stat_activity`` shows it).
PIPELINE_APPLICATION = "mpstore-pipeline"

#: Prepared statement names on the pipeline's connection.
_NAMES = {sql: f"mpstore_pipeline_{i}".encode() for i, sql in enumerate(STATEMENTS)}
#: ``plan(args, kwds, request id or None)``: a call's statement, or None (not taken).
Plan = Callable[[tuple[Any, ...], dict[str, Any], Any], Planned | None]
#: Seconds between attempts to connect again.
RECONNECT_EVERY = 1.0
#: Transactions sent and not yet answered, at most. PostgreSQL runs one connection's
#: statements one at a time anyway; a second one queued behind the first starts as soon as
#: the first commits, instead of a round trip later (measured: about +4 % cycles at K=4),
#: while the calls that come meanwhile still group in the next.
IN_FLIGHT = 2
_Entry = tuple[Planned, Done]


def _rollout_of(entry: _Entry) -> str:
    return entry[0].rollout_id


class StatementPipeline:
    """See the module docstring. ``connect()`` returns a new psycopg connection; ``plans``
    maps the names of the calls taken to their plans."""

    def __init__(self, connect: Callable[[], Any], plans: dict[str, Plan]) -> None:
        self._connect, self._plans = connect, plans
        self.names = frozenset(plans)
        self._conn: Any = None  # in use (the loop's thread only)
        self._fresh: Any = None  # made by the connecting thread, not yet in use
        #: Not yet sent: (the call's statement, done) each.
        self._waiting: list[_Entry] = []
        #: Sent, not yet answered (at most IN_FLIGHT): one list as above per transaction.
        self._inflight: collections.deque[list[_Entry]] = collections.deque()
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

    def submit(self, name: str, args: tuple[Any, ...], kwds: dict[str, Any], request: Any,
               done: Done) -> bool:
        if self._conn is None and not self._adopt():
            return False
        try:
            planned = self._plans[name](args, kwds, request)
        except Exception:  # refused arguments: the full path raises the error
            return False
        if planned is None:
            return False
        self._waiting.append((planned, done))
        return True

    def flush(self) -> None:
        """Send the calls waiting, as one transaction, unless IN_FLIGHT are still in flight:
        then they go when the oldest is answered (a group commit: under load, every
        transaction carries the calls that came while the last ones ran). Sent in rollout
        order, so that two servers' transactions lock their rows in the same order and
        cannot deadlock on each other."""
        if not self._waiting or len(self._inflight) >= IN_FLIGHT or self._conn is None:
            return
        group, self._waiting = self._waiting, []
        group.sort(key=_rollout_of)
        pgconn = self._conn.pgconn
        self._inflight.append(group)
        try:
            for planned, _ in group:
                pgconn.send_query_prepared(_NAMES[planned.sql], *encode(planned.params), 1)
            pgconn.pipeline_sync()  # sends the buffer too
        except Exception:  # the connection is lost
            self._lost()

    def _ready(self, mask: int) -> None:
        """Results arrived (or the connection failed): answer the calls they finish."""
        from psycopg import pq

        if self._conn is None:
            return  # lost earlier in this round of the loop
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
            for (planned, done), result in itertools.zip_longest(group, results):
                self._answer(planned, done, result)
        if pgconn.status != pq.ConnStatus.OK:
            self._lost()
        else:
            self.flush()  # what came while the last transaction ran

    def _answer(self, planned: Planned, done: Done, result: Any) -> None:
        """One call's answer, or its next statement (sent with the next transaction).
        Anything but a result (an error, or a statement not run after another's error in
        the same transaction) goes to the full path: nothing of that transaction was
        written."""
        from psycopg import pq

        value = None  # finish(None): there is no result
        if result is not None and result.status == pq.ExecStatus.TUPLES_OK:
            got = rows(result)
            value = got if planned.all_rows else got[0][0]
        try:
            outcome = planned.finish(value)
        except Exception:  # a plan that cannot decide (say, a record it cannot read)
            outcome = None  # leaves it to the full path, which raises what is wrong
        if isinstance(outcome, Planned):
            self._waiting.append((outcome, done))
        elif outcome is not None:
            done(RESULT, outcome[0])
        else:
            done(FALLBACK, None)

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
        """The connection failed: the calls waiting or in flight go to the full path, and
        another connection is made."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        assert self._unregister is not None
        self._unregister(self._fd)
        groups = [*self._inflight, self._waiting]
        self._inflight, self._waiting, self._results = collections.deque(), [], []
        for group in groups:
            for planned, done in group:
                planned.finish(None)  # the outcome is not known: nothing of it is kept
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
                if all(conn.pgconn.prepare(name, numbered(sql)).status ==
                       pq.ExecStatus.COMMAND_OK for sql, name in _NAMES.items()):
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
