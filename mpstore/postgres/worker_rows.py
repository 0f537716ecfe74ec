"""Worker records in ``mpstore_workers``: the rules of :mod:`mpstore.workers`, applied to the
rows a call touches.

A call that claims, updates an attempt's status or worker, or has the watchdog judge an
attempt collects :attr:`~.unit.Unit.worker_events`; an empty claim by a worker and
``update_worker`` add their own. :func:`apply` then, in the call's transaction, makes sure
each worker has a row, locks those rows (in id order: no deadlock between calls), applies the
rules in the order the events happened, and writes the records back: three statements
whatever the number of workers.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any

from .. import workers as wk
from ..types import Attempt, Worker

__all__ = ["apply", "load"]

_dumps, _loads = pickle.dumps, pickle.loads
_ENSURE = ("INSERT INTO mpstore_workers (worker_id, record) SELECT * FROM "
           "unnest(%s::text[], %s::bytea[]) ON CONFLICT DO NOTHING")
_LOCK = ("SELECT worker_id, record FROM mpstore_workers WHERE worker_id = ANY(%s) "
         "ORDER BY worker_id FOR UPDATE")
_WRITE = ("UPDATE mpstore_workers AS w SET record = h.record FROM unnest(%s::text[], "
          "%s::bytea[]) AS h(worker_id, record) WHERE w.worker_id = h.worker_id")

#: One change of a worker's record: ``change(workers, now)`` with the locked records by id.
Change = Callable[[dict[str, Worker], float], None]


def attempt_change(attempt: Attempt, dequeued: bool) -> Change:
    return lambda workers, now: wk.attempt_changed(workers, attempt, now, dequeued)


def load(conn: Any, ids: Sequence[str]) -> dict[str, Worker]:
    """The workers ``ids`` (rows created as needed), locked until the transaction ends."""
    ids = sorted(set(ids))
    conn.execute(_ENSURE, (ids, [_dumps(Worker(i), 5) for i in ids]), binary=True)
    return {row[0]: _loads(row[1]) for row in
            conn.execute(_LOCK, (ids,), binary=True).fetchall()}


def apply(conn: Any, ids: Sequence[str], changes: Sequence[Change], now: float
          ) -> dict[str, Worker]:
    """Lock the workers ``ids``, apply ``changes`` in order, write them back; returns them."""
    workers = load(conn, ids)
    for change in changes:
        change(workers, now)
    conn.execute(_WRITE, (list(workers), [_dumps(w, 5) for w in workers.values()]),
                 binary=True)
    return workers
