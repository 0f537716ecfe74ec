"""The spans of :class:`~.store.PostgresStore`: sequence ids, adding (plain and
OpenTelemetry), and paged queries of one rollout's spans.

Spans are rows of ``mpstore_spans``, never evicted (retention on disk: ``delete_rollouts``
frees them). ``add_span`` is the hot call: one round trip from the cached row when it can
(:mod:`.fast`), else one statement in a transaction that writes the span and its heartbeat
together (a duplicate, D7, writes neither).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .. import otel
from .. import query as q
from .. import validate as v
from ..errors import InvalidArgument, RolloutNotFound
from ..types import Page, Span
from .db import COLUMNS, SPAN_AND_HEARTBEAT, Tx, encode_unit, unit_values

if TYPE_CHECKING:
    from .fast import FastPaths
    from .unit import Unit

__all__ = ["Spans"]

T = TypeVar("T")
_dumps, _loads = pickle.dumps, pickle.loads
NEXT_SEQUENCE = (
    "WITH r AS (UPDATE mpstore_rollouts SET span_counter = span_counter + 1 "
    "WHERE rollout_id = %s RETURNING span_counter), "
    "o AS (INSERT INTO mpstore_counters SELECT %s, 1 WHERE NOT EXISTS (SELECT 1 FROM r) "
    "ON CONFLICT (rollout_id) DO UPDATE SET value = mpstore_counters.value + 1 "
    "RETURNING value) "
    "SELECT span_counter FROM r UNION ALL SELECT value FROM o")
_STORED = ("SELECT record FROM mpstore_spans WHERE rollout_id = %s AND attempt_id = %s "
           "AND span_id = %s")


class Spans:
    """Methods of :class:`~.store.PostgresStore` (which provides the attributes declared
    here)."""

    if TYPE_CHECKING:
        _fast: FastPaths

        def _call(self, fn: Callable[[Tx], T], *, watchdog: bool = True,
                  answer: Callable[[T], Any] | None = None) -> T: ...

        def _current(self) -> tuple[str, int] | None: ...

        def _rollout_unit(self, tx: Tx, rollout_id: str) -> Unit: ...

    def get_next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        """The next number of the rollout's span counter (shared by its attempts; REF §3.5)."""
        return self._sequence_ids([(rollout_id, attempt_id)], lambda ids: ids[0])[0]

    def get_many_span_sequence_ids(self, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """One sequence id per (rollout_id, attempt_id), allocated in order, atomically."""
        return self._sequence_ids(pairs, None)

    def _sequence_ids(self, pairs: Sequence[tuple[str, str]],
                      answer: Callable[[list[int]], Any] | None) -> list[int]:
        """The ids; ``answer`` shapes them into the method's reply (for its request id)."""
        checked = v.pairs(pairs)
        if len(checked) == 1 and self._current() is None:  # one statement: atomic by itself
            with self._fast.session() as db:
                return [int(db.run(NEXT_SEQUENCE, (checked[0][0], checked[0][0]))[0][0])]

        def run(tx: Tx) -> list[int]:
            cursors = [tx.execute(NEXT_SEQUENCE, (rid, rid)) for rid, _ in checked]
            return [int(c.fetchone()[0]) for c in cursors]

        return self._call(run, watchdog=False, answer=answer)

    def add_span(self, span: Span) -> Span:
        """Store a span and count it as its attempt's heartbeat (E7, D4). Idempotent (D7): a
        span already stored under the same (rollout, attempt, span_id) is returned unchanged
        and nothing else happens. Raises RolloutNotFound / AttemptNotFound."""
        checked = v.span(span)
        record = _dumps(checked, 5)
        fast = self._fast.add_span(checked, record)
        if fast is not None:
            return checked

        def run(tx: Tx) -> Any:
            unit = self._rollout_unit(tx, checked.rollout_id)
            unit.heartbeat(unit.span_attempt(checked.attempt_id), tx.now)
            unit.dirty = tx.wrote = True
            # One statement: the span, and the heartbeat only if the span is new (D7). A
            # heartbeat never finishes nor queues a rollout: nothing to notify.
            cursor = tx.execute(SPAN_AND_HEARTBEAT, (
                checked.rollout_id, checked.attempt_id, checked.span_id, checked.sequence_id,
                len(record), record, *unit_values(unit), encode_unit(unit),
                checked.sequence_id, unit.terminal, checked.rollout_id))
            unit.dirty = False
            tx.rows_after[unit.rollout_id] = None  # written or not: known only at the sync
            return cursor

        if self._call(run, watchdog=False).rowcount:  # known once the pipeline synced
            return checked
        return self._stored_span(checked) or checked

    def _stored_span(self, span: Span) -> Span | None:
        return self._call(lambda tx: _record(tx.one(
            _STORED, (span.rollout_id, span.attempt_id, span.span_id))), watchdog=False)

    def add_many_spans(self, spans: Sequence[Span]) -> list[Span]:
        """``add_span`` for each, atomically: every span is checked before any is stored."""
        if isinstance(spans, (str, bytes, dict)) or not isinstance(spans, Sequence):
            raise InvalidArgument("add_many_spans takes a list of spans")
        given = [v.span(s) for s in spans]
        if not given:
            return []
        records = [_dumps(s, 5) for s in given]
        return self._call(lambda tx: add_spans(tx, given, records), watchdog=False)

    def add_otel_span(self, rollout_id: str, attempt_id: str, readable_span: Any,
                      sequence_id: int | None = None) -> Span | None:
        """As ``InMemoryStore.add_otel_span``: an OpenTelemetry span stored as ``add_span``
        does, taking the rollout counter's next number without ``sequence_id`` (in the same
        transaction); None when the attempt already has a span with its span_id."""
        kept = otel.checked_span(rollout_id, attempt_id, readable_span, sequence_id)

        def run(tx: Tx) -> Span | None:
            self._rollout_unit(tx, rollout_id).span_attempt(attempt_id)
            if tx.one(_STORED, (rollout_id, attempt_id, kept.span_id)) is not None:
                return None
            if sequence_id is None:
                kept.sequence_id = int(tx.one(NEXT_SEQUENCE, (rollout_id, rollout_id))[0])
            return add_spans(tx, [kept], [_dumps(kept, 5)])[0]

        return self._call(run, watchdog=False)

    def query_spans(
        self, rollout_id: str, attempt_id: str | None = None, *, trace_id: str | None = None,
        trace_id_contains: str | None = None, span_id: str | None = None,
        span_id_contains: str | None = None, parent_id: str | None = None,
        parent_id_contains: str | None = None, name: str | None = None,
        name_contains: str | None = None, filter_logic: str = "and", limit: int = -1,
        offset: int = 0, sort_by: str | None = "sequence_id", sort_order: str = "asc",
    ) -> Page:
        """A page of the rollout's spans, as ``InMemoryStore.query_spans`` (by sequence_id,
        ties in arrival order, D6); never SpansEvicted: spans are kept until deleted."""
        v.identifier(rollout_id, "rollout_id")
        v.optional_str(attempt_id, "attempt_id")
        predicate, paging = q.span_filters(
            trace_id, trace_id_contains, span_id, span_id_contains, parent_id,
            parent_id_contains, name, name_contains, filter_logic, limit, offset, sort_by,
            sort_order)

        def run(tx: Tx) -> Page:
            spans = _rollout_spans(tx, rollout_id, attempt_id)
            return q.page(spans, paging, predicate, None if predicate else len(spans))

        return self._call(run)


def _rollout_spans(tx: Tx, rollout_id: str, attempt_id: str | None) -> list[Span]:
    wanted = attempt_id
    if attempt_id == "latest":
        row = tx.one("SELECT record FROM mpstore_rollouts WHERE rollout_id = %s",
                     (rollout_id,))
        attempts = [] if row is None else _loads(row[0])[1]
        if not attempts:
            return []
        wanted = attempts[-1].attempt_id
    query = "SELECT record FROM mpstore_spans WHERE rollout_id = %s"
    params: list[Any] = [rollout_id]
    if wanted is not None:
        query += " AND attempt_id = %s"
        params.append(wanted)
    return [_loads(row[0]) for row in tx.rows(query + " ORDER BY sequence_id, arrival", params)]


def _record(row: Any) -> Any:
    return None if row is None else _loads(row[0])


def add_spans(tx: Tx, spans: list[Span], records: list[bytes]) -> list[Span]:
    """Check every span, store the new ones (one statement), then their heartbeats."""
    ids = sorted({s.rollout_id for s in spans})  # locked in one order: no deadlock between
    units = {u.rollout_id: u for u in tx.load(
        f"SELECT {COLUMNS} FROM mpstore_rollouts WHERE rollout_id = ANY(%s) "
        "ORDER BY rollout_id FOR UPDATE", (ids,))}
    attempts = []
    for span in spans:
        unit = units.get(span.rollout_id)
        if unit is None:
            raise RolloutNotFound(span.rollout_id)
        attempts.append(unit.span_attempt(span.attempt_id))
    tx.wrote = True
    inserted = {(r[0], r[1], r[2]) for r in tx.rows(
        "INSERT INTO mpstore_spans (rollout_id, attempt_id, span_id, sequence_id, size, record) "
        "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::int[], "
        "%s::bytea[]) ON CONFLICT DO NOTHING RETURNING rollout_id, attempt_id, span_id",
        ([s.rollout_id for s in spans], [s.attempt_id for s in spans],
         [s.span_id for s in spans], [s.sequence_id for s in spans],
         [len(r) for r in records], records))}
    out: list[Span] = []
    highest: dict[str, int] = {}
    missing = []
    for span, attempt in zip(spans, attempts, strict=True):
        key = (span.rollout_id, span.attempt_id, span.span_id)
        if key in inserted:
            inserted.discard(key)  # a second copy in the same batch is a duplicate
            units[span.rollout_id].heartbeat(attempt, tx.now)
            highest[span.rollout_id] = max(highest.get(span.rollout_id, 0), span.sequence_id)
            out.append(span)
        else:
            missing.append(len(out))
            out.append(span)
    if highest:
        tx.execute("UPDATE mpstore_rollouts AS r SET span_counter = GREATEST(r.span_counter, "
                   "h.seq) FROM unnest(%s::text[], %s::bigint[]) AS h(rid, seq) "
                   "WHERE r.rollout_id = h.rid", (list(highest), list(highest.values())))
    if missing:
        stored = {}
        for row in tx.rows(
                "SELECT rollout_id, attempt_id, span_id, record FROM mpstore_spans WHERE "
                "(rollout_id, attempt_id, span_id) IN (SELECT * FROM unnest(%s::text[], "
                "%s::text[], %s::text[]))",
                ([out[i].rollout_id for i in missing], [out[i].attempt_id for i in missing],
                 [out[i].span_id for i in missing])):
            stored[(row[0], row[1], row[2])] = _loads(row[3])
        for i in missing:
            s = out[i]
            out[i] = stored.get((s.rollout_id, s.attempt_id, s.span_id), s)
    return out
