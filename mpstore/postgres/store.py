"""``PostgresStore``: the store's API with its state in PostgreSQL only.

The same contract as :class:`~mpstore.store.InMemoryStore`, method for method: arguments are
checked by :mod:`mpstore.validate`, statuses follow :mod:`mpstore.transitions` through
:class:`~.unit.Unit`, and every call is one transaction (:class:`~.db.Tx`), so a refused or
failed call writes nothing. Any number of stores (servers) may share one database:

* claims lock the queue's head rows ``FOR UPDATE SKIP LOCKED``: no rollout is claimed twice,
  and claimers do not queue up behind each other's locks;
* sequence ids are counted by the database (``UPDATE ... RETURNING``);
* waits are woken across servers by ``LISTEN``/``NOTIFY`` (:mod:`.notify`);
* the watchdog runs on entry of REF's method set on every server (its rows are locked, so no
  rollout is judged twice), and its background passes on one server at a time: the holder of
  an advisory lock, which another takes over when that server's connection dies.

Spans are never evicted: they are kept on disk until deleted (retention), so ``query_spans``
never raises SpansEvicted and ``statistics()['evicted_rollouts']`` is 0.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .. import transitions as tr
from .. import validate as v
from .. import workers as wk
from ..errors import InvalidArgument, RolloutNotFound, StorageError
from ..types import (
    UNSET,
    Attempt,
    AttemptedRollout,
    Rollout,
    RolloutStatus,
    new_rollout_id,
)
from .cache import RowCache
from .db import COLUMNS, Tx
from .fast import FastPaths, Planned
from .notify import Listener
from .ops import Operations
from .pipeline import PIPELINE_APPLICATION, StatementPipeline
from .reads import Reads
from .requests import (
    ANSWERED_KEY,
    FORGOTTEN,
    REMEMBER,
    SKIP,
    Answered,
    Requests,
    forgotten,
)
from .schema import prepare
from .spans import Spans
from .unit import Unit
from .writes import Writes

__all__ = ["PostgresStore"]

T = TypeVar("T")
NOT_GIVEN: Any = UNSET
_dumps, _loads = pickle.dumps, pickle.loads
_QUEUING, _PREPARING = RolloutStatus.QUEUING, RolloutStatus.PREPARING
_BY_ID = f"SELECT {COLUMNS} FROM mpstore_rollouts WHERE rollout_id = %s"
_RETRIES = 5


class PostgresStore(Reads, Spans, Writes, Operations, Requests):
    """The store on a PostgreSQL database (``postgresql://USER@HOST:PORT/DB``).

    ``clock`` is the store's notion of now (servers sharing a database must agree on it:
    keep their clocks synchronised); ``watchdog_interval`` is how often waiters run the
    watchdog while anyone waits; ``migrate`` migrates an older schema (an empty database is
    always given the current one); ``pool_size`` bounds the connections the calls use (plus
    one for LISTEN and one for the watchdog's lock). Call :meth:`close` when done.
    Raises StorageError if the database cannot be reached or holds a newer/foreign schema."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time,
                 watchdog_interval: float = 1.0, migrate: bool = False, pool_size: int = 8,
                 copy_records: bool = True, connect_timeout: float = 10.0) -> None:
        if not watchdog_interval > 0:
            raise InvalidArgument(f"watchdog_interval must be > 0, not {watchdog_interval!r}")
        import psycopg
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self.url = url
        self.safe_url = _safe(url)  # for logs: without a password
        self._clock = clock
        self._interval = float(watchdog_interval)
        self._started = time.monotonic()
        del copy_records  # every record read is unpickled afresh: nothing is shared
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout) as conn:
                self.schema = prepare(conn, migrate=migrate)
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL at {_safe(url)}: {_first_line(exc)}") from None
        # A call waits at most 2 s for a connection: while the database is down, calls fail
        # (StorageError) instead of piling up; the pool reconnects in the background.
        # psycopg prepares nothing itself (prepare_threshold None): after a rollback it
        # would DEALLOCATE ALL, the fast paths' prepared statements too (see pq.py).
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=True,
                                    kwargs={"autocommit": True, "connect_timeout": 5,
                                            "prepare_threshold": None},
                                    timeout=2.0, num_workers=1, name="mpstore")
        self._listener = Listener(url, self._run_watchdog_quietly, self._interval)
        self._cache = RowCache()
        self._fast = FastPaths(self._pool, self._cache, clock)
        #: The hot writes, sent by a server's loop itself (see .pipeline); unused in process.
        # Its calls wait for nothing but their results: a connection that stops answering
        # without closing (a network partition) is given up by the kernel within 30 s
        # (keepalives, tcp_user_timeout), and its calls go to the full path.
        self.pipeline = StatementPipeline(lambda: psycopg.connect(
            url, autocommit=True, connect_timeout=5, prepare_threshold=None,
            application_name=PIPELINE_APPLICATION, keepalives_idle=10,
            keepalives_interval=5, keepalives_count=3, tcp_user_timeout=30_000), {
                "add_span": self._plan_add_span,
                "dequeue_rollout": self._plan_dequeue,
                "enqueue_rollout": self._plan_enqueue,
                "update_attempt": self._plan_update_attempt})
        self._init_operations()
        self._init_requests()

    durable = False  # commits are the database's: no group commit to batch in the server
    #: Calls wait on the database: a server runs each in a worker thread, so the calls of
    #: different clients overlap (and a slow query holds up only its own caller).
    blocking_io = True

    # ----------------------------------------------------------------- the call path
    def _call(self, fn: Callable[[Tx], T], *, watchdog: bool = True,
              answer: Callable[[T], Any] | None = None) -> T:
        """``fn(tx)`` in one transaction (after the watchdog's part, on REF's method set).
        A deadlock, or a lost connection before anything was written, is retried. Within
        ``once``, the reply (``answer(result)``: the method's result; SKIP: not remembered)
        is stored in the same transaction (see :mod:`.requests`)."""
        errors = self._psycopg.errors
        request = self._current()
        for attempt in range(_RETRIES):
            tx, remembered = None, False
            try:
                with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
                    tx = Tx(conn, self._clock(), watchdog)
                    result = fn(tx)
                    tx.flush()
                    if request is not None:
                        reply = result if answer is None else answer(result)
                        if reply is not SKIP:
                            tx.execute(REMEMBER, (*request, tx.now, _dumps(reply, 5)))
                            remembered = True
                self._remember(tx.rows_after)
                if remembered:
                    self._remembered()
                return result
            except errors.UniqueViolation as exc:
                if exc.diag.constraint_name == ANSWERED_KEY:
                    raise Answered() from None
                raise StorageError(f"PostgreSQL: {_first_line(exc)}") from None
            except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                failure: Exception = exc
            except self._psycopg.OperationalError as exc:
                if tx is not None and tx.wrote:
                    raise StorageError(f"PostgreSQL: {_first_line(exc)} (the change may or "
                                       "may not have been committed)") from None
                failure = exc
            except self._psycopg.Error as exc:
                if request is not None and exc.sqlstate == FORGOTTEN:
                    raise forgotten(*request) from None
                raise StorageError(f"PostgreSQL: {_first_line(exc)}") from None
            except Exception as exc:
                if _is_pool_timeout(exc):  # no connection to be had: the database is down
                    raise StorageError(f"PostgreSQL unreachable: {exc}") from None
                raise
            time.sleep(0.05 * (attempt + 1))
        raise StorageError(f"PostgreSQL: {_first_line(failure)}")

    def _remember(self, rows: dict[str, tuple[int, bytes, bool] | None]) -> None:
        for rid, row in rows.items():
            if row is None:
                self._cache.drop(rid)
            else:
                self._cache.put(rid, *row)

    def _rollout_unit(self, tx: Tx, rollout_id: str) -> Unit:
        units = tx.load(_BY_ID + " FOR UPDATE", (rollout_id,))
        if not units:
            raise RolloutNotFound(rollout_id)
        return units[0]

    # ----------------------------------------------------------------- create
    @staticmethod
    def _fields(input: Any, mode: Any, resources_id: Any, config: Any, metadata: Any,
                rollout_id: Any = None) -> dict[str, Any]:
        return {"input": input, "mode": v.mode(mode),
                "resources_id": v.optional_str(resources_id, "resources_id"),
                "config": v.config(config), "metadata": v.metadata(metadata),
                "rollout_id": v.chosen_id(rollout_id)}

    def _create(self, tx: Tx, items: list[dict[str, Any]], status: RolloutStatus,
                worker: str | None = None) -> list[Unit]:
        """New rollouts (fields validated), queued at the tail or already claimed."""
        latest: Any = UNSET
        units = []
        for fields in items:
            chosen = fields.get("rollout_id")
            if chosen:  # caller-chosen and already stored (or earlier in the batch): as it is
                known = tx.units.get(chosen) or next(iter(tx.load(_BY_ID + " FOR UPDATE",
                                                                  (chosen,))), None)
                if known is not None:
                    units.append(known)
                    continue
            resources_id = fields["resources_id"]
            if not resources_id:  # REF Q12: the latest resources at creation ("" too)
                if latest is UNSET:
                    row = tx.one("SELECT resources_id FROM mpstore_resources "
                                 "ORDER BY updated DESC LIMIT 1")
                    latest = None if row is None else row[0]
                    self._fast.latest_resources = "" if row is None else row[0]
                resources_id = latest
            rollout = Rollout(chosen or new_rollout_id(), fields["input"], tx.now, None,
                              fields["mode"],
                              resources_id, _QUEUING, fields["config"],
                              {} if fields["metadata"] is None else fields["metadata"])
            unit = tx.add(Unit(rollout, [], False, new=True))
            if status is _QUEUING:
                unit.write_status(_QUEUING, tx.now)
            else:
                unit.new_attempt(worker, tx.now)
            units.append(unit)
        return units

    def start_rollout(self, input: Any, mode: str | None = None, resources_id: str | None = None,
                      config: Any = None, metadata: dict[str, Any] | None = None,
                      worker_id: str | None = None, *, rollout_id: str | None = None
                      ) -> AttemptedRollout:
        """Create a rollout already claimed: status preparing, attempt 1; not queued (E2).
        With ``rollout_id`` (caller-chosen) already stored, that rollout is returned
        unchanged with its latest attempt; InvalidArgument if it has none."""
        fields = self._fields(input, mode, resources_id, config, metadata, rollout_id)
        worker = v.optional_str(worker_id, "worker_id")

        def run(tx: Tx) -> AttemptedRollout:
            unit = self._create(tx, [fields], _PREPARING, worker)[0]
            if not unit.new:
                attempt = unit.latest()
                if attempt is None:
                    raise InvalidArgument(
                        f"Rollout {unit.rollout_id} exists and was never started; "
                        f"start_attempt({unit.rollout_id!r}) starts it")
                return AttemptedRollout.of(unit.rollout.snapshot(), attempt.snapshot())
            attempt = unit.attempts[-1]
            return AttemptedRollout.of(unit.rollout.snapshot(), attempt.snapshot())

        return self._call(run)

    def enqueue_rollout(self, input: Any, mode: str | None = None, resources_id: str | None = None,
                        config: Any = None, metadata: dict[str, Any] | None = None, *,
                        rollout_id: str | None = None) -> Rollout:
        """Create a rollout at the queue's tail, status queuing, no attempt (E1). With
        ``rollout_id`` (caller-chosen) already stored, that rollout is returned unchanged."""
        fields = self._fields(input, mode, resources_id, config, metadata, rollout_id)
        request = self._current()
        fast = None if fields["rollout_id"] else self._fast.enqueue(fields, request)
        if fast is not None:
            if request is not None:
                self._remembered()
            return fast
        return self._call(lambda tx: self._create(tx, [fields], _QUEUING)[0].rollout.snapshot())

    def enqueue_many_rollouts(self, requests: Sequence[dict[str, Any]]) -> list[Rollout]:
        """Enqueue several rollouts in order, atomically (dicts of enqueue_rollout's args)."""
        if isinstance(requests, (str, bytes, dict)) or not isinstance(requests, Sequence):
            raise InvalidArgument("enqueue_many_rollouts takes a list of dicts")
        items = [v.enqueue_request(r, i) for i, r in enumerate(requests)]
        return self._call(
            lambda tx: [u.rollout.snapshot() for u in self._create(tx, items, _QUEUING)])

    def delete_rollouts(self, rollout_ids: Sequence[str]) -> int:
        """Delete rollouts with their attempts, spans and counters, atomically; running ones
        too (their later spans and updates get RolloutNotFound). Unknown ids are ignored;
        returns how many were deleted. Frees their rows (spans are kept until deleted)."""
        ids = v.string_list(rollout_ids, "rollout_ids")

        def run(tx: Tx) -> int:
            tx.wrote = True
            tx.execute("DELETE FROM mpstore_spans WHERE rollout_id = ANY(%s)", (ids,))
            tx.execute("DELETE FROM mpstore_counters WHERE rollout_id = ANY(%s)", (ids,))
            deleted = tx.rows("DELETE FROM mpstore_rollouts WHERE rollout_id = ANY(%s) "
                              "RETURNING rollout_id", (ids,))
            for row in deleted:
                tx.units.pop(row[0], None)
                tx.rows_after[row[0]] = None
            return len(deleted)

        return self._call(run)

    # ----------------------------------------------------------------- claim
    def dequeue_rollout(self, worker_id: str | None = None, *, wait: float = 0.0
                        ) -> AttemptedRollout | None:
        """Claim the rollout at the head of the queue (E3), or None when the queue stays
        empty for ``wait`` seconds (D13)."""
        claimed = self._dequeue(1, worker_id, wait, lambda got: got[0])
        return claimed[0] if claimed else None

    def dequeue_many_rollouts(self, limit: int, worker_id: str | None = None, *,
                              wait: float = 0.0) -> list[AttemptedRollout]:
        """Claim up to ``limit`` rollouts from the head, in queue order, skipping rows other
        claimers hold; with ``wait`` > 0, block until one is available or the time is up
        (woken by NOTIFY from any server)."""
        return self._dequeue(limit, worker_id, wait, lambda got: got)

    def _dequeue(self, limit: int, worker_id: str | None, wait: float,
                 answer: Callable[[list[AttemptedRollout]], Any]) -> list[AttemptedRollout]:
        """Claim up to ``limit``, waiting up to ``wait`` for the first; ``answer`` shapes a
        claim into the method's reply (remembered for its request; an empty claim is not)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidArgument(f"limit must be an int >= 0, not {limit!r}")
        worker = v.optional_str(worker_id, "worker_id")
        wait = v.optional_float(wait, "wait") or 0.0

        def claim(tx: Tx) -> list[AttemptedRollout]:
            units = tx.load(f"SELECT {COLUMNS} FROM mpstore_rollouts WHERE queue_pos IS NOT "
                            "NULL ORDER BY queue_pos LIMIT %s FOR UPDATE SKIP LOCKED",
                            (limit,)) if limit else []
            claimed = [u.dequeue(worker, tx.now) for u in units[:limit]]
            if worker and limit and not claimed:  # the worker is idle (mpstore.workers)
                tx.wrote = True
                tx.worker_changes.append((worker, lambda ws, now: wk.dequeued_nothing(
                    ws, worker, now)))
            return claimed

        def attempt() -> list[AttemptedRollout]:
            request = self._current()
            fast = self._fast.claim(limit, worker, request, answer) if limit else []
            if fast is None:
                return self._call(claim, answer=lambda got: answer(got) if got else SKIP)
            if fast and request is not None:
                self._remembered()
            return fast

        claimed = attempt()
        if claimed or limit == 0 or wait <= 0:
            return claimed
        deadline = time.monotonic() + wait
        with self._listener.queue_waiter() as waiter:
            while True:
                claimed = attempt()
                if claimed or not waiter.wait(deadline):
                    return claimed

    def start_attempt(self, rollout_id: str, worker_id: str | None = None) -> AttemptedRollout:
        """A new attempt from any status; the rollout becomes preparing and leaves the queue
        (E4; max_attempts is not checked: this is the manual retry)."""
        v.identifier(rollout_id, "rollout_id")
        worker = v.optional_str(worker_id, "worker_id")

        def run(tx: Tx) -> AttemptedRollout:
            unit = self._rollout_unit(tx, rollout_id)
            attempt = unit.new_attempt(worker, tx.now)
            return AttemptedRollout.of(unit.rollout.snapshot(), attempt.snapshot())

        return self._call(run)

    # ----------------------------------------------------------------- wait
    def wait_for_rollouts(self, *, rollout_ids: Sequence[str], timeout: float | None = None
                          ) -> list[Rollout]:
        """The given rollouts that are finished, in input order (D11), once all known ones
        are finished or ``timeout`` seconds passed (None: no limit; <= 0: a snapshot).
        Unknown ids are omitted and not waited for; duplicates give duplicates."""
        ids = v.string_list(rollout_ids, "rollout_ids")
        timeout = v.optional_float(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout

        def look(tx: Tx) -> tuple[bool, list[Rollout]]:
            found = {}
            for row in tx.rows("SELECT rollout_id, record FROM mpstore_rollouts "
                               "WHERE rollout_id = ANY(%s)", (ids,)):
                found[row[0]] = _loads(row[1])[0]
            pending = any(r.status not in tr.TERMINAL for r in found.values())
            return pending, [found[i] for i in ids
                             if i in found and found[i].status in tr.TERMINAL]

        pending, done = self._call(look)
        if not pending or (timeout is not None and timeout <= 0):
            return done
        with self._listener.finish_waiter(ids) as waiter:
            while True:
                pending, done = self._call(look)
                if not pending or not waiter.wait(deadline):
                    return done

    # ----------------------------------------------------------------- update
    def update_rollout(self, rollout_id: str, input: Any = NOT_GIVEN, mode: Any = NOT_GIVEN,
                       resources_id: Any = NOT_GIVEN, status: Any = NOT_GIVEN,
                       config: Any = NOT_GIVEN, metadata: Any = NOT_GIVEN) -> Rollout:
        """Replace the given fields (UNSET: keep). A status is written as given, with its side
        effects (E5): queue membership, end_time for terminal statuses, waiters woken."""
        v.identifier(rollout_id, "rollout_id")
        changes = v.rollout_changes(input, mode, resources_id, status, config, metadata)

        def apply(unit: Unit, now: float) -> Rollout:
            unit.update_rollout(dict(changes), now)
            return unit.rollout.snapshot()

        fast = self._fast.write(rollout_id, apply, self._current())
        if fast is not None:
            self._remembered()
            return fast[0]
        return self._call(lambda tx: apply(self._rollout_unit(tx, rollout_id), tx.now))

    def update_attempt(self, rollout_id: str, attempt_id: str, status: Any = NOT_GIVEN,
                       worker_id: Any = NOT_GIVEN, last_heartbeat_time: Any = NOT_GIVEN,
                       metadata: Any = NOT_GIVEN) -> Attempt:
        """Replace the given fields of an attempt (``"latest"`` allowed). Setting a status on
        the latest attempt re-derives the rollout with P (E6), except a cancelled one (D2);
        an update without status never does (D3)."""
        _, apply = self._attempt_change(rollout_id, attempt_id, status, worker_id,
                                        last_heartbeat_time, metadata)
        fast = self._fast.write(rollout_id, apply, self._current())
        if fast is not None:
            self._remembered()
            return fast[0]
        return self._call(lambda tx: apply(self._rollout_unit(tx, rollout_id), tx.now))

    @staticmethod
    def _attempt_change(rollout_id: str, attempt_id: str, status: Any = NOT_GIVEN,
                        worker_id: Any = NOT_GIVEN, last_heartbeat_time: Any = NOT_GIVEN,
                        metadata: Any = NOT_GIVEN
                        ) -> tuple[str, Callable[[Unit, float], Attempt]]:
        """update_attempt's arguments checked: the rollout, and the change applied to it."""
        v.identifier(rollout_id, "rollout_id")
        v.identifier(attempt_id, "attempt_id")
        changes = v.attempt_changes(status, worker_id, last_heartbeat_time, metadata)

        def apply(unit: Unit, now: float) -> Attempt:
            attempt = unit.attempt(attempt_id)
            unit.update_attempt(attempt, changes, now)
            return attempt.snapshot()  # type: ignore[attr-defined, no-any-return]

        return rollout_id, apply

    # ----------------------------------------------------------------- the pipeline's plans
    # A server's loop sends these calls' statements itself (see .pipeline): each takes the
    # call's arguments and request id and returns its statement, or None (not taken: the
    # call runs as any other). The writes other than add_span only with a request id, so
    # that a statement lost with its connection is resent exactly once (by ``once``).
    def _plan_add_span(self, args: tuple[Any, ...], kwds: dict[str, Any],
                       request: Any) -> Planned | None:
        span = v.span(_span_argument(*args, **kwds))
        return self._fast.plan_span(span, _dumps(span, 5))

    def _plan_update_attempt(self, args: tuple[Any, ...], kwds: dict[str, Any],
                             request: Any) -> Planned | None:
        if not _request_id(request):
            return None
        rollout_id, apply = self._attempt_change(*args, **kwds)
        return self._fast.plan_write(rollout_id, apply, request)

    def _plan_dequeue(self, args: tuple[Any, ...], kwds: dict[str, Any],
                      request: Any) -> Planned | None:
        if not _request_id(request):
            return None
        worker_id, wait = _dequeue_arguments(*args, **kwds)
        no_wait = wait is None or (type(wait) in (int, float) and wait == 0)
        if worker_id is not None or not no_wait:
            return None  # a worker's claim, or one that may wait: the full path
        return self._fast.plan_claim(request)

    def _plan_enqueue(self, args: tuple[Any, ...], kwds: dict[str, Any],
                      request: Any) -> Planned | None:
        if not _request_id(request):
            return None
        fields = _enqueue_fields(*args, **kwds)
        return None if fields["rollout_id"] else self._fast.plan_enqueue(fields, request)

    def close(self) -> None:
        """Close the connections (and give up the watchdog's lead); idempotent. Not served
        remotely."""
        self.pipeline.close()
        self._listener.close()
        self._close_operations()
        self._pool.close()


def _record(row: Any) -> Any:
    return None if row is None else _loads(row[0])


def _span_argument(span: Any) -> Any:
    """add_span's argument, bound as add_span binds it."""
    return span


def _dequeue_arguments(worker_id: Any = None, *, wait: Any = 0.0) -> tuple[Any, Any]:
    """dequeue_rollout's arguments, bound as it binds them (unchecked: a plan takes only
    the plain case, and the full path refuses bad ones)."""
    return worker_id, wait


def _enqueue_fields(input: Any, mode: str | None = None, resources_id: str | None = None,
                    config: Any = None, metadata: dict[str, Any] | None = None, *,
                    rollout_id: str | None = None) -> dict[str, Any]:
    """enqueue_rollout's arguments, bound as it binds them, and checked."""
    return PostgresStore._fields(input, mode, resources_id, config, metadata, rollout_id)


def _request_id(request: Any) -> bool:
    return (isinstance(request, tuple) and len(request) == 2 and isinstance(request[0], str)
            and type(request[1]) is int)


def _is_pool_timeout(exc: Exception) -> bool:
    return type(exc).__name__ == "PoolTimeout"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _safe(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return url
