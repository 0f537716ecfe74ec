"""The writes of :class:`~.store.PostgresStore` outside the rollouts: resources (a row each,
by first addition and by latest update) and workers' heartbeats (``update_worker``, through
:mod:`.worker_rows`, the rules of :mod:`mpstore.workers`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .. import validate as v
from .. import workers as wk
from ..types import UNSET, ResourcesUpdate, Worker, new_resources_id
from . import worker_rows
from .db import Tx

__all__ = ["Writes"]

T = TypeVar("T")
NOT_GIVEN: Any = UNSET
_dumps, _loads = pickle.dumps, pickle.loads


class Writes:
    """Methods of :class:`~.store.PostgresStore` (which provides ``_call``)."""

    if TYPE_CHECKING:
        def _call(self, fn: Callable[[Tx], T], *, watchdog: bool = True) -> T: ...

    # ----------------------------------------------------------------- resources
    def add_resources(self, resources: dict[str, Any]) -> ResourcesUpdate:
        """Store resources under a new ``rs-`` id; they become the latest."""
        checked = v.resources(resources)
        return self._call(lambda tx: _put_resources(tx, new_resources_id(), checked, False))

    def update_resources(self, resources_id: str, resources: dict[str, Any]) -> ResourcesUpdate:
        """Upsert resources under ``resources_id`` (version + 1); they become the latest."""
        v.identifier(resources_id, "resources_id")
        checked = v.resources(resources)
        return self._call(lambda tx: _put_resources(tx, resources_id, checked, True))

    # ----------------------------------------------------------------- workers
    def update_worker(self, worker_id: str, heartbeat_stats: Any = NOT_GIVEN) -> Worker:
        """A worker's heartbeat, as ``InMemoryStore.update_worker`` (creates the worker if
        it is new; its status is derived from its claims and attempts, never set here)."""
        v.identifier(worker_id, "worker_id")
        given = v.is_set(heartbeat_stats)
        stats = v.metadata(heartbeat_stats, "heartbeat_stats") if given else None

        def run(tx: Tx) -> Worker:
            tx.wrote = True
            return worker_rows.apply(tx.conn, [worker_id], [
                lambda ws, now: wk.heartbeat(ws, worker_id, stats, given, now)], tx.now
            )[worker_id]

        return self._call(run, watchdog=False)


def _record(row: Any) -> Any:
    return None if row is None else _loads(row[0])


def _put_resources(tx: Tx, resources_id: str, resources: dict[str, Any], upsert: bool
                   ) -> ResourcesUpdate:
    old = _record(tx.one("SELECT record FROM mpstore_resources WHERE resources_id = %s "
                         "FOR UPDATE", (resources_id,))) if upsert else None
    if old is None:
        update = ResourcesUpdate(resources_id, resources, tx.now, tx.now, 1)
    else:
        update = ResourcesUpdate(resources_id, resources, old.create_time, tx.now,
                                 old.version + 1)
    tx.wrote = True
    tx.execute("INSERT INTO mpstore_resources (resources_id, record) VALUES (%s, %s) "
               "ON CONFLICT (resources_id) DO UPDATE SET record = EXCLUDED.record, "
               "updated = nextval('mpstore_resources_updated_seq')",
               (resources_id, _dumps(update, 5)))
    return update
