"""The fast paths of the calls the cycle makes: fewer round trips, little Python per call.

* **From a cached row** (:mod:`.cache`): ``add_span`` and single-rollout updates apply the
  rules to the row this server last saw and write it with one statement
  (``mpstore_write_span`` / ``mpstore_write``) that applies only if the row is still at that
  version and, for REF's method set, no rollout is due for the watchdog.
* **Claims** as a short transaction in two round trips (no rollout due, or the full path
  runs the watchdog first): lock the head ``FOR UPDATE SKIP LOCKED``, write the claims. On a
  server, the loop's pipeline claims without a lock instead (:meth:`FastPaths.plan_claim`):
  the head read, then written at the version read.
* **Enqueue** with one statement (``mpstore_insert``), given the latest resources this
  server saw are still the latest (REF Q12: a new rollout takes their id).

Each returns None where the full path (:class:`~.db.Tx`) must decide; they never decide
differently from it. Statements go through :class:`~.pq.Session` (libpq directly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import StorageError, StoreError, StoreUnavailable
from ..types import AttemptedRollout, Rollout, RolloutStatus, Span, new_rollout_id
from .cache import RowCache
from .db import COLUMNS, decode_unit, encode_unit, unit_values
from .pq import DbError, Session
from .requests import ANSWERED_KEY, FORGOTTEN, Answered
from .requests import REMEMBER as _REMEMBER
from .schema import any_due
from .unit import Unit

__all__ = ["ADD_SPAN", "STATEMENTS", "FastPaths", "Planned"]

T = TypeVar("T")
_loads = pickle.loads
_WRITE = "SELECT mpstore_write(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
ADD_SPAN = "SELECT mpstore_write_span(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
_INSERT = "SELECT mpstore_insert(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
_ANY_DUE = "SELECT " + any_due("%s")
_HEAD = (f"SELECT {COLUMNS} FROM mpstore_rollouts WHERE queue_pos IS NOT NULL "
         "ORDER BY queue_pos LIMIT %s FOR UPDATE SKIP LOCKED")
_UPDATE = ("UPDATE mpstore_rollouts SET status = %s, queue_pos = CASE WHEN %s THEN "
           "nextval('mpstore_queue_pos') WHEN %s THEN queue_pos END, check_at = %s, "
           "attempts = %s, record = %s, version = version + 1, finished = NULL "
           "WHERE rollout_id = %s")
#: Rows a pipelined claim reads at the head: more than the claims a server has in flight
#: at once, so that each takes a rollout of its own.
CLAIM_LOOKAHEAD = 8
_CLAIM_HEAD = (f"SELECT {any_due('%s')}, h.* FROM (SELECT 1) one LEFT JOIN LATERAL "
               f"(SELECT {COLUMNS} FROM mpstore_rollouts WHERE queue_pos IS NOT NULL "
               f"ORDER BY queue_pos LIMIT {CLAIM_LOOKAHEAD}) h ON true")
#: What mpstore_write_span returns for a duplicate span (D7).
_DUPLICATE = 0
_UNIQUE = "23505"
_dumps = pickle.dumps
Request = tuple[str, int] | None
#: The statements a Planned may hold (the pipeline prepares them all).
STATEMENTS = (ADD_SPAN, _WRITE, _INSERT, _CLAIM_HEAD)


@dataclasses.dataclass(slots=True)
class Planned:
    """One write as one statement, decided on the cached row: ``sql`` and its ``params``,
    the rollout it writes, and ``finish(code)``, which takes the statement's result (the
    function's return code) to ``(the call's result,)``, or None if the full path must
    decide (nothing was written). ``finish`` is called once whatever happens: with None
    when there is no result (the statement failed, or the connection was lost with it)."""

    sql: str
    params: tuple[Any, ...]
    rollout_id: str
    finish: Callable[[Any], tuple[Any] | Planned | None]
    #: finish takes every row of the result (not the first value), and may return the
    #: call's next statement (a claim's write, planned on the head it read)
    all_rows: bool = False


def _one_step(outcome: tuple[T] | Planned | None) -> tuple[T] | None:
    """The outcome of a plan of one statement (a plan of two is the pipeline's)."""
    assert not isinstance(outcome, Planned), "a plan of two statements ran on a pool"
    return outcome


def _unworked(unit: Unit, now: float) -> AttemptedRollout:
    """``unit`` claimed with no worker (the only claims the fast paths take)."""
    return unit.dequeue(None, now)


def _reply(request: Request, reply: Any) -> tuple[Any, ...]:
    """mpstore_remember's arguments for ``request`` (NULLs without one)."""
    if request is None:
        return (None, None, None)
    return (request[0], request[1], _dumps(reply, 5))


class FastPaths:
    """See the module docstring; ``pool``, ``cache`` and ``clock`` are the store's."""

    def __init__(self, pool: Any, cache: RowCache, clock: Callable[[], float]) -> None:
        self._pool, self._cache, self._clock = pool, cache, clock
        #: rollouts this server's pipelined claims are writing (until their finish)
        self._claiming: set[str] = set()
        #: the latest resources id as last seen ("": none), None: not seen yet
        self.latest_resources: str | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A pooled connection as a Session; a database error becomes StorageError."""
        try:
            with self._pool.connection() as conn:
                yield Session(conn)
        except DbError as exc:
            if exc.sqlstate == FORGOTTEN:
                raise StoreUnavailable("a request was sent again after its reply was forgotten "
                                       "(see mpstore.replies); it may have been applied"
                                       ) from None
            if exc.sqlstate == _UNIQUE and ANSWERED_KEY in str(exc):
                raise Answered() from None  # nothing of this attempt was applied
            raise StorageError(f"PostgreSQL: {exc}") from None
        except Exception as exc:
            if type(exc).__name__ == "PoolTimeout":
                raise StorageError(f"PostgreSQL unreachable: {exc}") from None
            raise

    def _unit(self, rollout_id: str) -> Unit | None:
        entry = self._cache.get(rollout_id)
        if entry is None:
            return None
        rollout, attempts = _loads(entry[1])
        return Unit(rollout, attempts, entry[2], version=entry[0])

    # ----------------------------------------------------------------- cached rows
    def write(self, rollout_id: str, apply: Callable[[Unit, float], T], request: Request = None
              ) -> tuple[T] | None:
        """``apply(unit, now)`` on the cached row, written if still current (a 1-tuple);
        with a ``request`` id, its reply (the result) is stored by the same statement."""
        planned = self.plan_write(rollout_id, apply, request)
        return None if planned is None else self.run(planned)

    def add_span(self, span: Span, record: bytes) -> tuple[Span] | None:
        """``(span,)`` once stored; None for the full path (also for a duplicate, D7: the
        full path answers with the stored span)."""
        planned = self.plan_span(span, record)
        if planned is None:
            return None
        try:
            with self._pool.connection() as conn:
                code = Session(conn).run(ADD_SPAN, planned.params)[0][0]
        except DbError as exc:
            self._cache.drop(span.rollout_id)
            if exc.broken:
                return None  # lost: the full path (add_span is idempotent)
            raise StorageError(f"PostgreSQL: {exc}") from None
        return _one_step(planned.finish(code))

    def run(self, planned: Planned) -> tuple[Any] | None:
        """A planned statement of one step on a pooled connection: its ``finish``."""
        with self.session() as db:
            return _one_step(planned.finish(db.run(planned.sql, planned.params)[0][0]))

    # The statements, planned: run here (above) or by the server loop's pipeline.
    def plan_write(self, rollout_id: str, apply: Callable[[Unit, float], Any],
                   request: Request = None) -> Planned | None:
        """:meth:`write`'s statement; None if the full path must decide."""
        unit = self._unit(rollout_id)
        return None if unit is None else self._plan_on(unit, apply, request)

    def _plan_on(self, unit: Unit, apply: Callable[[Unit, float], Any], request: Request,
                 then: Callable[[], object] | None = None) -> Planned | None:
        """``apply`` on ``unit`` (a row as read at its version), as one mpstore_write;
        ``then()`` runs once its outcome is known."""
        now = self._clock()
        try:
            result = apply(unit, now)
        except StoreError:
            return None  # the row may be what is out of date: the full path decides
        if unit.worker_events:
            return None  # a worker's record changes too: the full path writes both
        record = encode_unit(unit)
        rollout_id = unit.rollout_id
        after = (rollout_id, unit.version + 1, record, unit.queued)

        def finish(code: int | None) -> tuple[Any] | None:
            if then is not None:
                then()
            return self._cached(code, after, result)

        return Planned(_WRITE, (rollout_id, unit.version, now, *unit_values(unit), record,
                                unit.finished, *_reply(request, result)), rollout_id, finish)

    def plan_claim(self, request: Request) -> Planned | None:
        """``dequeue_rollout()``'s statements (no worker, no wait), for the pipeline: the
        head of the queue read (a few rows, unlocked), then the claim of the first that no
        claim of this server is writing, at the version read (stale, or taken meanwhile
        by another server: the full path). An empty queue, or a rollout due for the
        watchdog, goes to the full path as well: it runs the watchdog first, and checks
        whether the request was answered before."""
        held = self._claiming

        def pick(rows: list[tuple[Any, ...]] | None) -> Planned | None:
            if not rows or rows[0][0] or rows[0][1] is None:
                return None  # no result, a rollout due, or an empty queue
            row = next((r for r in rows if r[1] not in held), None)
            if row is None:
                return None
            rollout_id = row[1]
            held.add(rollout_id)
            planned = None
            try:
                planned = self._plan_on(decode_unit(row[1:]), _unworked, request,
                                        lambda: held.discard(rollout_id))
            finally:
                if planned is None:  # not written: no finish will let go of it
                    held.discard(rollout_id)
            return planned

        return Planned(_CLAIM_HEAD, (self._clock(),), "", pick, all_rows=True)

    def plan_span(self, span: Span, record: bytes) -> Planned | None:
        """:meth:`add_span`'s statement (``record``: the span pickled), from the cached row
        with the attempt's heartbeat; None if the full path must decide."""
        unit = self._unit(span.rollout_id)
        if unit is None:
            return None
        try:
            attempt = unit.span_attempt(span.attempt_id)
        except StoreError:
            return None
        unit.heartbeat(attempt, self._clock())
        row = encode_unit(unit)
        after = (span.rollout_id, unit.version + 1, row, unit.queued)
        return Planned(ADD_SPAN, (span.rollout_id, span.attempt_id, span.span_id,
                                  span.sequence_id, len(record), record, unit.version,
                                  *unit_values(unit), row),
                       span.rollout_id, lambda code: self._cached(code, after, span))

    def _cached(self, code: int | None, after: tuple[str, int, bytes, bool], result: T
                ) -> tuple[T] | None:
        """A write's outcome: 1 written (the row after it is cached), else None (stale, a
        duplicate span, or no result at all: the full path decides). The row stays cached
        unless it is known to be stale: a write built on it is checked by its version."""
        if code == 1:
            self._cache.put(*after)
            return (result,)
        if code is not None and code != _DUPLICATE:
            self._cache.drop(after[0])
        return None

    # ----------------------------------------------------------------- claims
    def claim(self, limit: int, worker: str | None, request: Request = None,
              answer: Callable[[list[AttemptedRollout]], Any] | None = None
              ) -> list[AttemptedRollout] | None:
        """Claim up to ``limit`` from the head; None if a rollout is due for the watchdog, or
        for a claim by a worker (its record changes too: the full path writes both). With a
        ``request`` id, a claim's reply (``answer(claimed)``) is stored before the commit."""
        if worker is not None:
            return None
        written = []
        with self.session() as db:
            try:  # two round trips: the head read and locked, then the writes committed
                now = self._clock()
                _, due, head = db.batch([("BEGIN", ()), (_ANY_DUE, (now,)), (_HEAD, (limit,))])
                if due[0][0]:
                    db.script("ROLLBACK")
                    return None
                claimed, writes = [], []
                for row in head:
                    unit = decode_unit(row)
                    claimed.append(unit.dequeue(None, now))
                    record = encode_unit(unit)
                    writes.append((_UPDATE, (*unit_values(unit), record, unit.rollout_id)))
                    written.append((unit.rollout_id, unit.version + 1, record, unit.queued))
                if request is not None and claimed:
                    reply = claimed if answer is None else answer(claimed)
                    writes.append((_REMEMBER, (*request, now, _dumps(reply, 5))))
                db.batch([*writes, ("COMMIT", ())])
            except BaseException:
                with contextlib.suppress(Exception):
                    db.script("ROLLBACK")
                raise
        for entry in written:
            self._cache.put(*entry)
        return claimed

    # ----------------------------------------------------------------- enqueue
    def enqueue(self, fields: dict[str, Any], request: Request = None) -> Rollout | None:
        """A new queued rollout in one statement; None for the full path (no latest
        resources seen yet, they changed since, or a rollout is due for the watchdog)."""
        planned = self.plan_enqueue(fields, request)
        done = None if planned is None else self.run(planned)
        return None if done is None else done[0]  # type: ignore[no-any-return]

    def plan_enqueue(self, fields: dict[str, Any], request: Request = None
                     ) -> Planned | None:
        """:meth:`enqueue`'s statement; None if the full path must decide."""
        latest = self.latest_resources
        resources_id = fields["resources_id"]
        check = not resources_id  # REF Q12: then the rollout takes the latest resources
        if check:
            if latest is None:
                return None
            resources_id = latest or None
        now = self._clock()
        rollout = Rollout(new_rollout_id(), fields["input"], now, None, fields["mode"],
                          resources_id, RolloutStatus.QUEUING, fields["config"],
                          {} if fields["metadata"] is None else fields["metadata"])
        unit = Unit(rollout, [], False, new=True)
        unit.write_status(RolloutStatus.QUEUING, now)
        record = encode_unit(unit)

        def finish(code: int | None) -> tuple[Rollout] | None:
            if code != 1:
                self.latest_resources = None
                return None
            self._cache.put(rollout.rollout_id, 0, record, True)
            return (rollout,)

        return Planned(_INSERT, (rollout.rollout_id, now, rollout.status.value,
                                 unit.check_at(), 0, record, check, resources_id,
                                 *_reply(request, rollout)), rollout.rollout_id, finish)
