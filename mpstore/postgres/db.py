"""One call's transaction: rows in, :class:`~.unit.Unit` s, rows out.

Every store call is one transaction on a pooled connection in pipeline mode, so statements
that do not depend on each other's results travel together: a typical write is two round
trips (lock and read the rows; write them back and commit), a read one or two. On entry of
REF's method set the watchdog's query (rollouts due by now, ``FOR UPDATE SKIP LOCKED``) rides
along with the call's first read; only when it finds something is the call's read repeated
after the watchdog has written its verdicts, so the call sees their effect (D12).

A psycopg error rolls the transaction back and becomes :class:`~mpstore.errors.StorageError`
(nothing of the call is written); a deadlock or a lost connection before anything was written
is retried by the store.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

from . import worker_rows
from .schema import FEED_LOCK, any_due
from .unit import Unit

__all__ = ["COLUMNS", "Tx", "decode_unit", "encode_unit"]

_dumps, _loads = pickle.dumps, pickle.loads
#: Columns every rollout query selects, in the order decode_unit reads them.
COLUMNS = "rollout_id, queue_pos IS NOT NULL, record, version"

#: The rollouts due, locked. any_due() first, as a one-time filter, so that the scan itself
#: (however it is planned) runs only when some rollout is due.
DUE = (f"SELECT {COLUMNS} FROM mpstore_rollouts WHERE {any_due('%s')} AND check_at <= %s "
       "ORDER BY created FOR UPDATE SKIP LOCKED")
INSERT = ("INSERT INTO mpstore_rollouts (rollout_id, status, queue_pos, check_at, attempts, "
          "record) VALUES (%s, %s, CASE WHEN %s THEN nextval('mpstore_queue_pos') END, %s, "
          "%s, %s)")
#: The feed's number (``finished``): a new one when the write finishes the rollout, the one
#: it has while it stays terminal, none once reopened (see schema.FEED_LOCK).
FEED_NUMBER = ("finished = CASE WHEN %s THEN nextval('mpstore_finish_seq') WHEN %s THEN "
               "finished END")
UPDATE = ("UPDATE mpstore_rollouts SET status = %s, queue_pos = CASE WHEN %s THEN "
          "nextval('mpstore_queue_pos') WHEN %s THEN queue_pos END, check_at = %s, "
          f"attempts = %s, record = %s, version = version + 1, {FEED_NUMBER} "
          "WHERE rollout_id = %s")
FEED_LOCK_SQL = f"SELECT pg_advisory_xact_lock({FEED_LOCK})"
#: A new span and its heartbeat in one statement: the rollout row is rewritten only if the
#: span was not already stored (D7: a duplicate has no effect at all).
SPAN_AND_HEARTBEAT = (
    "WITH new AS (INSERT INTO mpstore_spans (rollout_id, attempt_id, span_id, sequence_id, "
    "size, record) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1) "
    "UPDATE mpstore_rollouts SET status = %s, queue_pos = CASE WHEN %s THEN "
    "nextval('mpstore_queue_pos') WHEN %s THEN queue_pos END, check_at = %s, attempts = %s, "
    "record = %s, span_counter = GREATEST(span_counter, %s), version = version + 1, "
    "finished = CASE WHEN %s THEN finished END "
    "WHERE rollout_id = %s AND EXISTS (SELECT 1 FROM new)")
NOTIFY_FINISHED = "SELECT pg_notify('mpstore_finished', rid) FROM unnest(%s::text[]) AS rid"
NOTIFY_QUEUED = "SELECT pg_notify('mpstore_queued', %s)"


def decode_unit(row: Sequence[Any]) -> Unit:
    rollout, attempts = _loads(row[2])
    return Unit(rollout, attempts, bool(row[1]), version=row[3])


def encode_unit(unit: Unit) -> bytes:
    return _dumps((unit.rollout, unit.attempts), 5)


def unit_values(unit: Unit) -> tuple[Any, ...]:
    """UPDATE's columns before ``record``: status, appended, queued, check_at, attempts."""
    return (unit.rollout.status.value, unit.appended, unit.queued, unit.check_at(),
            len(unit.attempts))


class Tx:
    """The units one call loaded (by rollout id), the watchdog's part, and the write-back."""

    def __init__(self, conn: Any, now: float, watchdog: bool) -> None:
        self.conn = conn
        self.now = now
        self.units: dict[str, Unit] = {}
        self.wrote = False  # a write was sent: the call is no longer safe to repeat
        self.due = 0
        #: rows as they are once this transaction commits: id -> (version, record, queued),
        #: or None where that is not known
        self.rows_after: dict[str, tuple[int, bytes, bool] | None] = {}
        #: changes of worker records, beside those of the units (see .worker_rows)
        self.worker_changes: list[tuple[str, worker_rows.Change]] = []
        self._due_cursor = conn.execute(DUE, (now, now), binary=True) if watchdog else None

    def execute(self, query: str, params: Any = None) -> Any:
        return self.conn.execute(query, params, binary=True)

    def _settle(self) -> bool:
        """Run the watchdog's verdicts on the rollouts due (once); True if there were any."""
        cursor, self._due_cursor = self._due_cursor, None
        if cursor is None:
            return False
        rows = cursor.fetchall()
        for row in rows:
            unit = decode_unit(row)
            unit.watchdog(self.now)
            self.units[unit.rollout_id] = unit
        self.due = len(rows)
        return bool(rows)

    def watchdog(self) -> int:
        """Only the watchdog's part: how many rollouts were due."""
        self._settle()
        return self.due

    def rows(self, query: str, params: Any = None) -> list[Any]:
        """The rows of a read issued after the watchdog's part: if it found rollouts due,
        their verdicts are written first and the read repeated, so it sees them."""
        cursor = self.execute(query, params)
        if self._due_cursor is not None and self._settle():
            self.flush()
            cursor = self.execute(query, params)
        return cursor.fetchall()

    def one(self, query: str, params: Any = None) -> Any:
        rows = self.rows(query, params)
        return rows[0] if rows else None

    def load(self, query: str, params: Any = None) -> list[Unit]:
        """Units from rollout rows (``COLUMNS``), the ones already loaded taken as they are."""
        out = []
        for row in self.rows(query, params):
            unit = self.units.get(row[0])
            if unit is None:
                unit = self.units[row[0]] = decode_unit(row)
                self.rows_after[row[0]] = (row[3], bytes(row[2]), bool(row[1]))
            out.append(unit)
        return out

    def add(self, unit: Unit) -> Unit:
        """A new rollout, inserted at :meth:`flush`."""
        self.units[unit.rollout_id] = unit
        return unit

    def flush(self) -> None:
        """Write back every changed unit, in the order they were loaded or added, and queue
        the notifications for the commit."""
        self._settle()
        inserts, updates, finished, appended = [], [], [], 0
        for unit in self.units.values():
            if not unit.dirty:
                continue
            values = unit_values(unit)
            record = encode_unit(unit)
            if unit.new:
                inserts.append((unit.rollout_id, values[0], values[2], values[3], values[4],
                                record))
            else:
                updates.append((*values, record, unit.finished, unit.terminal,
                                unit.rollout_id))
                unit.version += 1
            self.rows_after[unit.rollout_id] = (unit.version, record, unit.queued)
            finished += [unit.rollout_id] if unit.finished else []
            appended += unit.appended
            self.worker_changes += [(a.worker_id or "", worker_rows.attempt_change(a, d))
                                    for a, d in unit.worker_events]
            unit.worker_events = []
            unit.dirty = unit.new = unit.appended = unit.finished = False
        self.notify(finished, appended)
        if finished:
            self.conn.execute(FEED_LOCK_SQL)
        if inserts:
            self.wrote = True
            self.conn.cursor().executemany(INSERT, inserts)
        if updates:
            self.wrote = True
            self.conn.cursor().executemany(UPDATE, updates)
        if self.worker_changes:
            self.wrote = True
            changes, self.worker_changes = self.worker_changes, []
            worker_rows.apply(self.conn, [wid for wid, _ in changes],
                              [change for _, change in changes], self.now)

    def notify(self, finished: list[str], appended: int) -> None:
        """Waiters on every server are told at commit (NOTIFY is transactional)."""
        if finished:
            self.conn.execute(NOTIFY_FINISHED, (finished,))
        if appended:
            self.conn.execute(NOTIFY_QUEUED, (str(appended),))
