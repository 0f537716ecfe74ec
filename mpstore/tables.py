"""The SQLite file's tables: their schema, the statements that write a
:class:`~mpstore.changes.ChangeSet`, reading everything back, and the migrations from older
schema versions. Only moves bytes: records are encoded by :mod:`mpstore.schema`;
:mod:`mpstore.durable` decides when statements run.

Errors: what sqlite3 and pickle raise, and ValueError for a row that does not fit its layout
(``UNREADABLE`` lists them, for the journal to turn into StorageError).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import pickle
import re
import sqlite3
from collections.abc import Callable
from typing import Any

from . import schema
from .changes import ChangeSet, RolloutRow, Saved

__all__ = ["COMPACTED_KEY", "LAYOUTS_KEY", "LOG_VERSIONS", "MIGRATIONS", "PUT_META",
           "SCHEMA_SQL", "SCHEMA_VERSION", "UNREADABLE", "Statement", "apply", "chunked",
           "deletes", "migrate", "plan", "read", "squash", "statements"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = schema.SCHEMA_VERSION
#: The meta key of the last ticket the database holds (the journal's log holds those after it).
COMPACTED_KEY = "compacted_ticket"

#: Spans are kept in *chunks*: one row holds the spans a rollout got in one compaction, as a
#: pickled tuple of ``(ticket, arrived, record)``; ``ticket`` is the last ticket among them.
#: Why: a row and an index entry per span were most of a compaction's work (a durable
#: in-process cycle, compactor CPU: 217 µs per cycle with a row per span; see chunked).
_SPANS_SQL = (
    "CREATE TABLE spans (id INTEGER PRIMARY KEY, rollout_id TEXT NOT NULL, "
    "ticket INTEGER NOT NULL, records BLOB NOT NULL)",
    "CREATE INDEX spans_by_rollout ON spans (rollout_id)",
)

SCHEMA_SQL = f"""
CREATE TABLE rollouts (rollout_id TEXT PRIMARY KEY, created INTEGER NOT NULL,
                       queue_position INTEGER, counter INTEGER NOT NULL,
                       ticket INTEGER NOT NULL, record BLOB NOT NULL,
                       finished INTEGER) WITHOUT ROWID;
CREATE TABLE counters (rollout_id TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
{_SPANS_SQL[0]};
{_SPANS_SQL[1]};
CREATE TABLE evicted (rollout_id TEXT PRIMARY KEY);
CREATE TABLE resources (resources_id TEXT PRIMARY KEY, record BLOB NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE replies (client TEXT NOT NULL, seq INTEGER NOT NULL, result BLOB NOT NULL,
                      PRIMARY KEY (client, seq)) WITHOUT ROWID;
"""

_PUT_ROLLOUT = "INSERT OR REPLACE INTO rollouts VALUES (?, ?, ?, ?, ?, ?, ?)"
#: Deleting a rollout (``delete_rollouts``): every row that names it.
_DELETE = tuple(f"DELETE FROM {table} WHERE rollout_id = ?"
                for table in ("rollouts", "spans", "counters", "evicted"))
_PUT_COUNTER = "INSERT OR REPLACE INTO counters VALUES (?, ?)"
#: The log's statement for one span added (as schema version 4's logs hold it too). It is
#: never run as it is: a compaction writes the spans of its batch as chunks (_chunked).
_ADD_SPAN = "INSERT INTO spans (rollout_id, ticket, arrived, record) VALUES (?, ?, ?, ?)"
_ADD_CHUNK = "INSERT INTO spans (rollout_id, ticket, records) VALUES (?, ?, ?)"
_EVICT = "INSERT OR IGNORE INTO evicted VALUES (?)"
_DROP_SPANS = "DELETE FROM spans WHERE rollout_id = ?"
_PUT_RESOURCES = "INSERT OR REPLACE INTO resources VALUES (?, ?)"
PUT_META = "INSERT OR REPLACE INTO meta VALUES (?, ?)"
_PUT_REPLY = "INSERT OR REPLACE INTO replies VALUES (?, ?, ?)"
_FORGET_REPLIES = "DELETE FROM replies WHERE client = ? AND seq <= ?"
#: The most parameters one statement binds: SQLite's SQLITE_MAX_VARIABLE_NUMBER before 3.32
#: (later ones allow 32,766), so that a build of any age runs a compaction's multi-row INSERTs.
_MAX_PARAMETERS = 999
#: The statements that write a whole row by its first parameter (its key).
_WHOLE_ROW = frozenset({_PUT_ROLLOUT, _PUT_COUNTER, _PUT_RESOURCES, PUT_META})
LAYOUTS_KEY = "layouts"
#: What reading a damaged file or record raises (a record's pickle, its layout).
UNREADABLE = (sqlite3.DatabaseError, pickle.UnpicklingError, EOFError, ValueError, TypeError,
               KeyError, AttributeError, IndexError)

Statement = tuple[str, tuple[Any, ...]]


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _rollout_row(row: RolloutRow, ticket: int) -> tuple[Any, ...]:
    record = _dumps(schema.encode_rollout(row.rollout, row.attempts))
    return (row.rollout.rollout_id, row.created, row.queue_position, row.counter, ticket,
            record, row.finished)


def statements(changes: ChangeSet, ticket: int) -> list[Statement]:
    """The SQL that writes ``changes`` under ``ticket``."""
    out: list[Statement] = [(_PUT_ROLLOUT, _rollout_row(row, ticket))
                            for row in changes.rollouts]
    out.extend((_PUT_COUNTER, pair) for pair in changes.counters)
    out.extend((_ADD_SPAN, (s.rollout_id, ticket, arrived, _dumps(schema.encode_span(s))))
               for s, arrived in changes.spans)
    for rid in changes.evicted:
        out.extend(((_EVICT, (rid,)), (_DROP_SPANS, (rid,))))
    out.extend((_PUT_RESOURCES, (r.resources_id, _dumps(schema.encode_resources(r))))
               for r in changes.resources)
    if changes.resources:
        out.append((PUT_META, ("latest_resources_id", changes.latest_resources_id)))
    for rid in changes.deleted:
        out.extend((sql, (rid,)) for sql in _DELETE)
    out.extend((_PUT_REPLY, (client, seq, _dumps(result)))
               for client, seq, result in changes.replies)
    out.extend((_FORGET_REPLIES, pair) for pair in changes.forgotten)
    return out


def deletes(batch: list[Statement]) -> bool:
    """Whether ``batch`` deletes rollouts (their pages are then given back, see the
    compactor's ``_shrink``)."""
    return any(sql in _DELETE for sql, _ in batch)


def squash(batch: list[Statement]) -> list[Statement]:
    """``batch`` less the statements whose effect a later one in it undoes, for a
    compaction: a row written again later (``INSERT OR REPLACE`` of a whole row: only its
    last write is kept) and a reply forgotten later. Running the result leaves the database
    as running ``batch`` would (tests/test_squash.py checks it, deletes included: the last
    write stays in its place, and what it replaced had no other effect)."""
    kept: list[Statement] = []
    written: set[tuple[str, Any]] = set()  # (statement, row key) written later in the batch
    floor: dict[str, int] = {}  # client -> the highest sequence number forgotten later
    for sql, params in reversed(batch):
        if sql in _WHOLE_ROW:
            if (sql, params[0]) in written:
                continue
            written.add((sql, params[0]))
        elif sql == _FORGET_REPLIES:
            floor[params[0]] = max(floor.get(params[0], 0), params[1])
        elif sql == _PUT_REPLY and params[1] <= floor.get(params[0], 0):
            continue
        kept.append((sql, params))
    kept.reverse()
    return kept


def chunked(batch: list[Statement]) -> list[Statement]:
    """``batch`` as it is run: its spans added (``_ADD_SPAN``) written as one chunk per
    rollout (see _SPANS_SQL), in the order of their rollouts' first span, after the other
    statements. Dropping a rollout's spans (eviction, deletion) drops its chunk still being
    gathered too, so the spans left are those running ``batch`` one by one would leave, each
    rollout's in their order (tests/test_squash.py checks it)."""
    out: list[Statement] = []
    chunks: dict[str, list[tuple[int, float, bytes]]] = {}
    for sql, params in batch:
        if sql == _ADD_SPAN:
            chunks.setdefault(params[0], []).append(params[1:])
            continue
        if sql == _DROP_SPANS:
            chunks.pop(params[0], None)
        out.append((sql, params))
    out.extend(_chunk(rid, spans) for rid, spans in chunks.items())
    return out


def _chunk(rollout_id: str, spans: list[tuple[int, float, bytes]]) -> Statement:
    return _ADD_CHUNK, (rollout_id, max(ticket for ticket, _, _ in spans), _dumps(tuple(spans)))


def plan(batch: list[Statement]) -> list[Statement]:
    """What a compaction runs for ``batch``: squashed, chunked, then each table's statements
    together, in their order (statements on different tables commute), and each run of one
    INSERT as one multi-row INSERT. Why the last two: every ``execute`` lets go of the GIL
    and takes it back from the dispatcher, which in the compactor thread cost 30-100 µs of
    CPU per statement (against 4-15 µs for the same statement run alone); see
    benchmarks/README.md, "Durable, third round"."""
    tables: dict[str, list[Statement]] = {}
    for statement in chunked(squash(batch)):
        tables.setdefault(_table(statement[0]), []).append(statement)
    out: list[Statement] = []
    for statements_ in tables.values():
        for sql, run in itertools.groupby(statements_, key=lambda statement: statement[0]):
            rows = [params for _, params in run]
            if len(rows) == 1 or not sql.startswith("INSERT"):
                out.extend((sql, params) for params in rows)
                continue
            head, _, row = sql.partition(" VALUES ")
            step = max(1, _MAX_PARAMETERS // len(rows[0]))
            for at in range(0, len(rows), step):
                part = rows[at:at + step]
                out.append((f"{head} VALUES {', '.join([row] * len(part))}",
                            tuple(itertools.chain.from_iterable(part))))
    return out


@functools.lru_cache(maxsize=64)
def _table(sql: str) -> str:
    """The table a statement writes (each of ours writes one)."""
    found = re.search(r"\b(?:INTO|FROM) (\w+)", sql)
    assert found is not None, sql
    return found.group(1)


def apply(db: sqlite3.Connection, batch: list[Statement], last: int) -> None:
    """Run ``batch`` (see :func:`plan`) and record ``last`` as the last ticket held, in one
    transaction."""
    try:
        db.execute("BEGIN")
        for sql, params in plan(batch):
            db.execute(sql, params)
        db.execute(PUT_META, (COMPACTED_KEY, str(last)))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


# ---------------------------------------------------------------------- reading and migrating
def read(db: sqlite3.Connection) -> Saved:
    """Everything a database of the current schema holds. Raises ValueError (and the
    errors of sqlite3 and pickle) for a row that cannot be read back."""
    layouts = {kind: tuple(names) for kind, names in json.loads(
        db.execute("SELECT value FROM meta WHERE key = ?", (LAYOUTS_KEY,)).fetchone()[0]
    ).items()}
    decode, saved = schema.Decoder(layouts), Saved()
    for created, position, counter, ticket, record, finished in db.execute(
        "SELECT created, queue_position, counter, ticket, record, finished FROM rollouts "
        "ORDER BY created"
    ):
        rollout, attempts = decode.rollout(pickle.loads(record))
        row = RolloutRow(rollout, attempts, created, position, counter, finished)
        saved.rollouts.append((row, ticket))
    saved.counters = dict(db.execute("SELECT rollout_id, value FROM counters"))
    saved.spans = [
        (ticket, arrived, decode.span(pickle.loads(record)))
        for (records,) in db.execute("SELECT records FROM spans ORDER BY id")
        for ticket, arrived, record in pickle.loads(records)
    ]
    saved.evicted = [rid for (rid,) in db.execute("SELECT rollout_id FROM evicted")]
    saved.resources = [decode.resources(pickle.loads(r))
                       for (r,) in db.execute("SELECT record FROM resources")]
    saved.replies = [(client, seq, pickle.loads(result)) for client, seq, result in
                     db.execute("SELECT client, seq, result FROM replies")]
    latest = db.execute("SELECT value FROM meta WHERE key = 'latest_resources_id'").fetchone()
    saved.latest_resources_id = latest[0] if latest else None
    return saved


def _from_version_1(db: sqlite3.Connection) -> None:
    """Version 1 (mpstore 0.1.0) stored records as pickles of the record objects themselves
    (their loader and field tuple); this version's classes still read them. Rewrite every
    record in the explicit layouts of :mod:`mpstore.schema`."""
    rows = db.execute("SELECT rollout_id, record FROM rollouts").fetchall()
    for rid, record in rows:
        rollout, attempts = pickle.loads(record)
        db.execute("UPDATE rollouts SET record = ? WHERE rollout_id = ?",
                   (_dumps(schema.encode_rollout(rollout, attempts)), rid))
    for span_id, record in db.execute("SELECT id, record FROM spans").fetchall():
        db.execute("UPDATE spans SET record = ? WHERE id = ?",
                   (_dumps(schema.encode_span(pickle.loads(record))), span_id))
    for rid, record in db.execute("SELECT resources_id, record FROM resources").fetchall():
        db.execute("UPDATE resources SET record = ? WHERE resources_id = ?",
                   (_dumps(schema.encode_resources(pickle.loads(record))), rid))
    db.execute(PUT_META, (LAYOUTS_KEY, json.dumps(schema.LAYOUTS)))


def _from_version_2(db: sqlite3.Connection) -> None:
    """Version 3 numbers finished rollouts for the feed (``finished_rollouts``): those already
    finished get numbers in the order of their end times; and it remembers replies to
    requests (mpstore.replies), of which an older version kept none."""
    db.execute("ALTER TABLE rollouts ADD COLUMN finished INTEGER")
    db.execute("CREATE TABLE replies (client TEXT NOT NULL, seq INTEGER NOT NULL, "
               "result BLOB NOT NULL, PRIMARY KEY (client, seq)) WITHOUT ROWID")
    layouts = json.loads(db.execute("SELECT value FROM meta WHERE key = ?",
                                    (LAYOUTS_KEY,)).fetchone()[0])
    decode, ended = schema.Decoder({k: tuple(v) for k, v in layouts.items()}), []
    for rid, created, record in db.execute("SELECT rollout_id, created, record FROM rollouts"):
        rollout, _ = decode.rollout(pickle.loads(record))
        if rollout.status.is_finished:
            ended.append((rollout.end_time or 0.0, created, rid))
    for number, (_, _, rid) in enumerate(sorted(ended), start=1):
        db.execute("UPDATE rollouts SET finished = ? WHERE rollout_id = ?", (number, rid))


def _from_version_3(db: sqlite3.Connection) -> None:
    """Version 4 keeps the latest commits in a log file beside the database (see
    :mod:`mpstore.changelog`); the tables are the same. The version number changes so that
    an older mpstore, which would not read the log, refuses the database instead."""
    db.execute(PUT_META, (COMPACTED_KEY, "0"))


def _from_version_4(db: sqlite3.Connection) -> None:
    """Version 5 keeps spans in chunks (see _SPANS_SQL): a rollout's spans, a row each in
    version 4, become one chunk, in their order. Version 4's log needs nothing: its
    statements are this version's (``LOG_VERSIONS``)."""
    db.execute("DROP INDEX spans_by_rollout")
    db.execute("ALTER TABLE spans RENAME TO spans_v4")
    for sql in _SPANS_SQL:
        db.execute(sql)
    chunks: dict[str, list[tuple[int, float, bytes]]] = {}
    for rid, *span in db.execute("SELECT rollout_id, ticket, arrived, record FROM spans_v4 "
                                 "ORDER BY id"):
        chunks.setdefault(rid, []).append(tuple(span))  # type: ignore[arg-type]
    db.executemany(_ADD_CHUNK, [_chunk(rid, spans)[1] for rid, spans in chunks.items()])
    db.execute("DROP TABLE spans_v4")


#: How to bring a database of each older schema version to the next one.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _from_version_1, 2: _from_version_2, 3: _from_version_3, 4: _from_version_4,
}
#: The schema versions whose log frames this version applies (version 4's statements are
#: this version's: only how a compaction writes spans changed).
LOG_VERSIONS = frozenset({4, SCHEMA_VERSION})


def migrate(db: sqlite3.Connection, version: int) -> None:
    """Bring a database to the current schema, in one transaction (all or nothing)."""
    if version == SCHEMA_VERSION:
        return
    logger.warning("Migrating the data directory from schema version %d to %d",
                   version, SCHEMA_VERSION)
    try:
        db.execute("BEGIN IMMEDIATE")
        while version != SCHEMA_VERSION:
            MIGRATIONS[version](db)
            version += 1
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: INCREMENTAL
        # Takes effect only through a VACUUM (a copy of the file): once, here.
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("VACUUM")
