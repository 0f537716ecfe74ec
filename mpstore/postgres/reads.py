"""The reads of :class:`~.store.PostgresStore`: paged queries, the feed, resources, workers.

Arguments are checked by :mod:`mpstore.validate` and :mod:`mpstore.query`, as in memory.
A page is one query: the filters become the ``WHERE`` clause, the store's order (creation,
or first appearance) an ``ORDER BY`` on an indexed column, ``limit``/``offset`` the SQL ones,
and ``total`` a window count, so an unsorted page reads about a page, however many rows the
table holds. A ``sort_by`` on a column the table has (``rollout_id``, ``status``) is sorted
by the database too (``COLLATE "C"``: code point order, as Python compares str; ``None``
last ascending, first descending, as :mod:`mpstore.query` does; ties in the store's order).
A ``sort_by`` on a field that is only inside the pickled record reads every match and pages
them with :func:`mpstore.query.page` (the rollout's attempts and spans are always paged so:
they are a rollout's, not the run's).

The feed (``finished_rollouts``) reads rollouts by their feed number (``finished``, from a
database sequence taken under :data:`~.schema.FEED_LOCK` at the finish's commit), so a
cursor is valid on every server; its waits are woken by the finish notifications.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .. import query as q
from .. import validate as v
from ..types import (
    Attempt,
    AttemptedRollout,
    FinishedRollouts,
    Page,
    ResourcesUpdate,
    Rollout,
    Worker,
)
from .db import Tx

if TYPE_CHECKING:
    from .notify import Listener

__all__ = ["Reads", "sql_page"]

T = TypeVar("T")
_loads = pickle.loads
_FEED = ("SELECT record, finished FROM mpstore_rollouts WHERE finished > %s "
         "ORDER BY finished LIMIT %s")
_FINISHED_TOTAL = "SELECT count(*) FROM mpstore_rollouts WHERE finished IS NOT NULL"


def sql_page(tx: Tx, table: str, where: list[str], params: list[Any], logic: str,
             paging: q.Paging, order: str, columns: frozenset[str],
             decode: Callable[[Any], Any]) -> Page:
    """The page of ``table``'s rows matching ``where`` (joined by ``logic``), in ``order``
    unless ``paging`` sorts; ``decode(record)`` makes the record of a row."""
    query = f"SELECT record, count(*) OVER () FROM {table}"
    if where:
        query += " WHERE " + f" {logic.upper()} ".join(f"({w})" for w in where)
    direction = " DESC" if paging.descending else ""
    if paging.sort_by is not None and paging.sort_by not in columns:
        rows = tx.rows(f"{query} ORDER BY {order}", params)  # sorted by a record's field
        return q.page([decode(row[0]) for row in rows], paging, None, len(rows))
    if paging.sort_by is None:
        query += f" ORDER BY {order}{direction}"
    else:
        query += f' ORDER BY {paging.sort_by} COLLATE "C"{direction}, {order}'
    if paging.limit >= 0:
        query += f" LIMIT {int(paging.limit)}"
    query += f" OFFSET {int(paging.offset)}"
    rows = tx.rows(query, params)
    if rows:
        total = int(rows[0][1])
    else:  # past the end (or nothing matches): count them
        counted = f"SELECT count(*) FROM {table}"
        if where:
            counted += " WHERE " + f" {logic.upper()} ".join(f"({w})" for w in where)
        total = int(tx.one(counted, params)[0])
    return Page([decode(row[0]) for row in rows], total, paging.limit, paging.offset)


def _rollout(record: Any) -> Rollout:
    return _loads(record)[0]  # type: ignore[no-any-return]


def _attempted(record: Any) -> Any:
    rollout, attempts = _loads(record)
    return AttemptedRollout.of(rollout, attempts[-1]) if attempts else rollout


class Reads:
    """Methods of :class:`~.store.PostgresStore` (which provides the attributes declared
    here)."""

    if TYPE_CHECKING:
        _listener: Listener

        def _call(self, fn: Callable[[Tx], T], *, watchdog: bool = True) -> T: ...

    # ----------------------------------------------------------------- rollouts
    def query_rollouts(
        self, *, status_in: Sequence[str] | None = None,
        rollout_id_in: Sequence[str] | None = None, rollout_id_contains: str | None = None,
        filter_logic: str = "and", sort_by: str | None = None, sort_order: str = "asc",
        limit: int = -1, offset: int = 0, status: Sequence[str] | None = None,
        rollout_ids: Sequence[str] | None = None, with_latest_attempt: bool = False,
    ) -> Page:
        """A page of rollouts, as ``InMemoryStore.query_rollouts`` (its arguments, its
        order); filters, creation order, paging and a sort by id or status run in the
        database, on its indexes."""
        f = q.rollout_filters(status_in, rollout_id_in, rollout_id_contains, filter_logic,
                              sort_by, sort_order, limit, offset, status, rollout_ids,
                              with_latest_attempt)
        statuses = None if f.statuses is None else [s.value for s in f.statuses]
        ids, contains, logic, paging = f.ids, f.contains, f.logic, f.paging
        where, params = [], []
        for clause, value in (("status = ANY(%s)", statuses), ("rollout_id = ANY(%s)", ids),
                              ("strpos(rollout_id, %s) > 0", contains)):
            if value is not None:
                where.append(clause)
                params.append(value)
        decode = _attempted if with_latest_attempt else _rollout
        return self._call(lambda tx: sql_page(
            tx, "mpstore_rollouts", where, params, logic, paging, "created",
            frozenset({"rollout_id", "status"}), decode))

    def get_rollout_by_id(self, rollout_id: str) -> Rollout | None:
        v.identifier(rollout_id, "rollout_id")
        return self._call(lambda tx: _by_id(tx, rollout_id, lambda r, a: r))

    def query_attempts(self, rollout_id: str, *, sort_by: str | None = "sequence_id",
                       sort_order: str = "asc", limit: int = -1, offset: int = 0) -> Page:
        """A page of the rollout's attempts, by sequence_id unless sorted otherwise; empty
        for an unknown rollout (REF Q11)."""
        v.identifier(rollout_id, "rollout_id")
        paging = q.check_paging(None if sort_by == "sequence_id" and sort_order == "asc"
                                else sort_by, sort_order, limit, offset, q.ATTEMPT_SORT_FIELDS)

        def run(tx: Tx) -> Page:
            attempts = _by_id(tx, rollout_id, lambda r, a: a) or []
            return q.page(attempts, paging, None, len(attempts))

        return self._call(run)

    def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        v.identifier(rollout_id, "rollout_id")
        return self._call(lambda tx: _by_id(tx, rollout_id, lambda r, a: a[-1] if a else None))

    # ----------------------------------------------------------------- the feed
    def finished_rollouts(self, after: int = 0, limit: int = 1000, *, wait: float = 0.0
                          ) -> FinishedRollouts:
        """The feed, as ``InMemoryStore.finished_rollouts``: rollouts finished after cursor
        ``after`` in the order they finished (their feed numbers, shared by every server),
        at most ``limit``, the next cursor and how many are finished now; with ``wait`` > 0,
        blocks until one is there (woken by any server's finish) or the time is up."""
        v.count(after, "after")
        v.count(limit, "limit")
        wait = v.optional_float(wait, "wait") or 0.0

        def page(tx: Tx) -> FinishedRollouts:
            rows = tx.rows(_FEED, (after, limit)) if limit else []
            total = int(tx.one(_FINISHED_TOTAL)[0])
            cursor = int(rows[-1][1]) if rows else after
            return FinishedRollouts([_rollout(row[0]) for row in rows], cursor, total)

        result = self._call(page)
        if result.rollouts or limit == 0 or wait <= 0:
            return result
        deadline = time.monotonic() + wait
        with self._listener.feed_waiter() as waiter:
            while True:
                result = self._call(page)
                if result.rollouts or not waiter.wait(deadline):
                    return result

    # ----------------------------------------------------------------- resources
    def get_resources_by_id(self, resources_id: str) -> ResourcesUpdate | None:
        v.identifier(resources_id, "resources_id")
        return self._call(lambda tx: _record(tx.one(
            "SELECT record FROM mpstore_resources WHERE resources_id = %s", (resources_id,))))

    def get_latest_resources(self) -> ResourcesUpdate | None:
        return self._call(lambda tx: _record(tx.one(
            "SELECT record FROM mpstore_resources ORDER BY updated DESC LIMIT 1")))

    def query_resources(self, *, resources_id: str | None = None,
                        resources_id_contains: str | None = None, sort_by: str | None = None,
                        sort_order: str = "asc", limit: int = -1, offset: int = 0) -> Page:
        """A page of the stored resources, in the order they were first added unless
        sorted; ``resources_id`` and ``resources_id_contains`` combine with AND."""
        exact = v.optional_str(resources_id, "resources_id")
        contains = q.check_contains(resources_id_contains, "resources_id_contains")
        paging = q.check_paging(sort_by, sort_order, limit, offset, q.RESOURCES_SORT_FIELDS)
        where, params = [], []
        for clause, value in (("resources_id = %s", exact),
                              ("strpos(resources_id, %s) > 0", contains)):
            if value is not None:
                where.append(clause)
                params.append(value)
        return self._call(lambda tx: sql_page(
            tx, "mpstore_resources", where, params, "and", paging, "added",
            frozenset({"resources_id"}), _loads))

    # ----------------------------------------------------------------- workers
    def query_workers(self, *, status_in: Sequence[str] | None = None,
                      worker_id_contains: str | None = None, filter_logic: str = "and",
                      sort_by: str | None = None, sort_order: str = "asc", limit: int = -1,
                      offset: int = 0) -> Page:
        """A page of the workers (see :mod:`mpstore.workers`), in the order they first
        appeared unless sorted (about one per runner: paged in Python)."""
        predicate, paging = q.worker_filters(status_in, worker_id_contains, filter_logic,
                                             sort_by, sort_order, limit, offset)

        def run(tx: Tx) -> Page:
            workers = [_loads(row[0]) for row in
                       tx.rows("SELECT record FROM mpstore_workers ORDER BY added")]
            return q.page(workers, paging, predicate, None if predicate else len(workers))

        return self._call(run)

    def get_worker_by_id(self, worker_id: str) -> Worker | None:
        v.identifier(worker_id, "worker_id")
        return self._call(lambda tx: _record(tx.one(
            "SELECT record FROM mpstore_workers WHERE worker_id = %s", (worker_id,))))


def _by_id(tx: Tx, rollout_id: str, pick: Callable[[Rollout, list[Any]], Any]) -> Any:
    row = tx.one("SELECT record FROM mpstore_rollouts WHERE rollout_id = %s", (rollout_id,))
    return None if row is None else pick(*_loads(row[0]))


def _record(row: Any) -> Any:
    return None if row is None else _loads(row[0])
