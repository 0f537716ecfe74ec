"""Durability: the store's changes written to SQLite (stdlib ``sqlite3``, WAL mode).

Storage only moves bytes: records are encoded by :mod:`mpstore.schema` (plain values in
named, versioned layouts), rows are keyed by id, and this module knows nothing of statuses or
queues beyond "a rollout row has a queue position". Reads never touch the database; it is
read once, on open, to restore the state (and again after a failed write, see below).

Write path (group commit). Under the store lock, ``stage()`` takes a
:class:`~mpstore.state.ChangeSet` (what one critical section changed, pushed by the state)
and turns it into SQL statements, encoding the records right there, so what is written is
exactly what the lock protected; the change gets a ticket. After the lock is released, the
caller's ``wait(ticket)`` returns once that ticket is committed: the first waiter to find no
commit in progress commits *every* staged change in one transaction, the others wait for it.
So a reply never leaves the server before its change is on disk, and concurrent callers share
commits.

A failed commit (a full disk, an I/O error) fails every ticket staged until then: those
changes were applied in memory but not on disk, so the journal is *broken* until the store has
reloaded its state from the database (``recover``), which then again is exactly what is on
disk. After a failure the journal refuses writes for ``RETRY_AFTER`` seconds (doubling on each
further failure, up to ``RETRY_AFTER_MAX``), then lets the next write try the disk again;
``status()`` says which it is doing.

``synchronous`` (SPEC §9): ``normal`` (default) - in WAL mode a commit survives a killed server
process but not a power loss or OS crash; ``full`` - also survives those, at an fsync per commit.

Errors: :class:`~mpstore.errors.StorageError` for a foreign, damaged or newer database, for a
directory already used by another server, and for a failed or refused write.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pickle
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import schema
from .accounting import COMMIT_BUCKETS, Histogram
from .changes import ChangeSet, RolloutRow, Saved
from .errors import StorageError

__all__ = ["PRAGMAS", "RETRY_AFTER", "RETRY_AFTER_MAX", "SYNCHRONOUS", "Journal"]

logger = logging.getLogger(__name__)

#: Identifies mpstore's files (PRAGMA application_id; "mpst" in ASCII) and their layout.
APPLICATION_ID = 0x6D707374
SCHEMA_VERSION = schema.SCHEMA_VERSION
DB_NAME = "mpstore.sqlite3"
LOCK_NAME = "mpstore.lock"
#: The accepted ``synchronous`` levels and what SQLite calls them.
SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}
#: The connection's settings beyond WAL mode and ``synchronous``, each for a measured reason
#: (an in-process cycle committing every call, CPU per cycle: 976 µs as SQLite sets it,
#: 843 with the first, 784 with the second, 728 with both):
#: * ``locking_mode=EXCLUSIVE``: one server owns the file (the directory lock says so
#:   already), so a transaction no longer takes and drops the WAL's shared-memory locks.
#:   Another process cannot read the file while the server runs: ``Journal.backup`` copies it.
#:   Set before the first read, it also keeps the WAL's index in memory: no ``-shm`` file,
#:   which opening a database on a full disk could not create.
#: * ``wal_autocheckpoint`` of 16,384 pages (64 MiB) instead of 1,000: a checkpoint copies
#:   every page changed since the last one back into the database file (and syncs it); the
#:   cycle changes the same few pages again and again, so a rarer checkpoint copies each of
#:   them once for many more commits, and syncs 16 times less often. The cost: a WAL file of
#:   up to 64 MiB beside the database, read again when a killed server restarts.
PRAGMAS = {"locking_mode": "EXCLUSIVE", "wal_autocheckpoint": "16384"}
#: Seconds writes are refused after a failed commit, then doubled per further failure.
RETRY_AFTER = 1.0
RETRY_AFTER_MAX = 30.0
#: How many failed ticket ranges are remembered for their waiters (each is woken at once).
_FAILURES_KEPT = 64

_SCHEMA = """
CREATE TABLE rollouts (rollout_id TEXT PRIMARY KEY, created INTEGER NOT NULL,
                       queue_position INTEGER, counter INTEGER NOT NULL,
                       ticket INTEGER NOT NULL, record BLOB NOT NULL,
                       finished INTEGER) WITHOUT ROWID;
CREATE TABLE counters (rollout_id TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE spans (id INTEGER PRIMARY KEY, rollout_id TEXT NOT NULL, ticket INTEGER NOT NULL,
                    arrived REAL NOT NULL, record BLOB NOT NULL);
CREATE INDEX spans_by_rollout ON spans (rollout_id);
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
#: Pages given back to the file system after a commit that deleted rollouts (16 MiB, about
#: 0.3 s); the rest is given back by later such commits and on close. Freed pages are
#: reused by new rows meanwhile, so the file never grows because of them.
_VACUUM_PAGES = 4096
_PUT_COUNTER = "INSERT OR REPLACE INTO counters VALUES (?, ?)"
_ADD_SPAN = "INSERT INTO spans (rollout_id, ticket, arrived, record) VALUES (?, ?, ?, ?)"
_EVICT = "INSERT OR IGNORE INTO evicted VALUES (?)"
_DROP_SPANS = "DELETE FROM spans WHERE rollout_id = ?"
_PUT_RESOURCES = "INSERT OR REPLACE INTO resources VALUES (?, ?)"
_PUT_META = "INSERT OR REPLACE INTO meta VALUES (?, ?)"
_PUT_REPLY = "INSERT OR REPLACE INTO replies VALUES (?, ?, ?)"
_FORGET_REPLIES = "DELETE FROM replies WHERE client = ? AND seq <= ?"
_LAYOUTS_KEY = "layouts"
#: What reading a damaged file or record raises (a record's pickle, its layout).
_UNREADABLE = (sqlite3.DatabaseError, pickle.UnpicklingError, EOFError, ValueError, TypeError,
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
        out.append((_PUT_META, ("latest_resources_id", changes.latest_resources_id)))
    for rid in changes.deleted:
        out.extend((sql, (rid,)) for sql in _DELETE)
    out.extend((_PUT_REPLY, (client, seq, _dumps(result)))
               for client, seq, result in changes.replies)
    out.extend((_FORGET_REPLIES, pair) for pair in changes.forgotten)
    return out


class Journal:
    """One server's SQLite file in ``data_dir``; see the module docstring."""

    def __init__(self, data_dir: str | os.PathLike[str], synchronous: str = "normal",
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """Lock ``data_dir`` and open (or create, or migrate) its database.

        Raises StorageError if another server holds the directory, or if the file is not an
        mpstore database, is of a newer schema version, or is damaged.
        """
        if synchronous not in SYNCHRONOUS:
            raise StorageError(f"synchronous must be one of {sorted(SYNCHRONOUS)}")
        self.path = Path(data_dir)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = self._lock_directory()
        try:
            self._db = self._open(self.path / DB_NAME, SYNCHRONOUS[synchronous])
        except BaseException:
            self._lock_file.close()
            raise
        self._monotonic = monotonic
        self._cond = threading.Condition()
        self._pending: list[Statement] = []
        self._staged = 0  # last ticket handed out
        self._committed = 0  # last ticket on disk
        self._writing = False
        self._failed: list[tuple[int, int]] = []  # (first, last) ticket of failed commits
        self._broken: str | None = None  # memory is ahead of disk until recover()
        self._error: str | None = None  # the last failure, until a commit succeeds
        self._failures = 0  # consecutive failed commits
        self._refuse_until = 0.0  # monotonic; writes are refused before it
        self._vacuum = False  # rollouts were deleted: give their pages back
        # For operators: commit latency and failed commits in all (written under _cond).
        self._commit_seconds = Histogram(COMMIT_BUCKETS)
        self._commit_failures = 0

    # ------------------------------------------------------------------ open
    def _lock_directory(self) -> Any:
        handle = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StorageError(
                f"Data directory {self.path} is in use by another mpstore server (PID {holder})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _open(self, file: Path, synchronous: str) -> sqlite3.Connection:
        fresh = not file.exists() or file.stat().st_size == 0
        db = None
        try:
            db = sqlite3.connect(file, check_same_thread=False, isolation_level=None)
            for name, value in PRAGMAS.items():  # before the first read: see PRAGMAS
                db.execute(f"PRAGMA {name}={value}")
            if fresh:  # before the first table, and before WAL mode writes the header
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            else:
                version = self._check(db, file)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            if fresh:
                db.executescript(
                    f"BEGIN; {_SCHEMA} PRAGMA application_id={APPLICATION_ID}; "
                    f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )
                db.execute(_PUT_META, (_LAYOUTS_KEY, json.dumps(schema.LAYOUTS)))
            else:
                migrate(db, version)
        except _UNREADABLE as exc:
            if db is not None:
                db.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise StorageError(
                    f"{file} is open in another program (an sqlite3 shell?); the server "
                    "needs it to itself: close that program and start again") from None
            raise StorageError(f"{file} is damaged or not an mpstore database: {exc}") from None
        return db

    @staticmethod
    def _check(db: sqlite3.Connection, file: Path) -> int:
        """The database's schema version, if this mpstore can read it."""
        app, version = (db.execute(f"PRAGMA {p}").fetchone()[0]
                        for p in ("application_id", "user_version"))
        if app != APPLICATION_ID:
            raise StorageError(f"{file} is not an mpstore database (application_id {app:#x})")
        if version not in MIGRATIONS and version != SCHEMA_VERSION:
            raise StorageError(
                f"{file} has schema version {version}; this mpstore reads versions "
                f"{sorted({*MIGRATIONS, SCHEMA_VERSION})} (upgrade mpstore, or use another "
                f"--data-dir)"
            )
        result = db.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise StorageError(f"{file} is damaged: {result}")
        return int(version)

    def load(self) -> Saved:
        """Everything stored, for ``StoreState.restore``; also the next ticket's base on first
        open. Raises StorageError if a record cannot be read back."""
        try:
            saved = read(self._db)
        except _UNREADABLE as exc:
            raise StorageError(f"{self.path / DB_NAME} is damaged: {exc}") from None
        if not self._staged:
            last = self._db.execute("SELECT MAX(ticket) FROM (SELECT ticket FROM rollouts "
                                    "UNION ALL SELECT ticket FROM spans)").fetchone()[0]
            self._staged = self._committed = last or 0
        return saved

    # ------------------------------------------------------------------ write
    def stage(self, changes: ChangeSet) -> int:
        """Turn one critical section's changes into statements (call with the store lock
        held, right after the changes were made). Returns the ticket to ``wait`` for.

        Raises StorageError while writes are refused or the journal is broken (after a failed
        commit): the caller must then ``recover`` before releasing the lock, since the
        changes were already applied in memory.
        """
        if self._broken is not None or self._monotonic() < self._refuse_until:
            raise StorageError(self.refusal())
        ticket = self._staged + 1  # only stage() moves it, and stage() runs under the lock
        batch = statements(changes, ticket)
        if changes.deleted:
            self._vacuum = True  # read by the committer after its commit
        with self._cond:
            self._pending.extend(batch)
            self._staged = ticket
        return ticket

    def refusal(self) -> str:
        """Why writes are refused now, for the StorageError that says so."""
        return (f"The data directory {self.path} cannot be written ({self._error}); writes "
                f"are refused, and tried again in "
                f"{max(self._refuse_until - self._monotonic(), 0.0):.1f} s")

    @property
    def last_staged(self) -> int:
        """The last ticket staged: a read waits for it, so that what it saw is on disk."""
        return self._staged if self._staged > self._committed else 0

    def wait(self, ticket: int) -> None:
        """Block until ``ticket`` is committed (call without the store lock).

        Raises StorageError if its commit failed (the store must then ``recover``).
        """
        with self._cond:
            while True:
                for first, last in self._failed:
                    if first <= ticket <= last:
                        raise StorageError(
                            f"Writing to the data directory {self.path} failed: {self._error}"
                        )
                if self._committed >= ticket:
                    return
                if self._writing:
                    self._cond.wait()
                    continue
                self._commit_pending()

    def _commit_pending(self) -> None:
        """Commit everything staged so far in one transaction (``_cond`` held on entry/exit)."""
        batch, first, last = self._pending, self._committed + 1, self._staged
        self._pending, self._writing = [], True
        self._cond.release()
        began = time.perf_counter()
        try:
            self._write(batch)
        except Exception as exc:
            failure: Exception | None = exc
            logger.error("Writing to %s failed: %s", self.path, exc)
        else:
            failure = None
        finally:
            self._cond.acquire()
            self._writing = False
        if failure is None:
            self._committed, self._failures, self._error = last, 0, None
            self._commit_seconds.observe(time.perf_counter() - began)
        else:
            self._commit_failures += 1
            self._fail(first, failure)
        self._cond.notify_all()

    def commit_stats(self) -> dict[str, Any]:
        """Commits so far: ``{"bounds": seconds, "buckets": commits per latency bucket (not
        cumulative), "sum": seconds, "failures": n}``."""
        with self._cond:
            return {"bounds": list(self._commit_seconds.bounds),
                    **self._commit_seconds.snapshot(), "failures": self._commit_failures}

    def _fail(self, first: int, failure: Exception) -> None:
        """Fail every ticket from ``first`` on, staged or not yet committed (``_cond`` held)."""
        last = self._staged
        self._failed = [*self._failed[-_FAILURES_KEPT + 1:], (first, last)]
        self._pending = []
        self._committed = last  # nothing below it is waited for any more: it failed or landed
        self._error = self._broken = f"{type(failure).__name__}: {failure}"
        self._failures += 1
        pause = min(RETRY_AFTER * 2 ** (self._failures - 1), RETRY_AFTER_MAX)
        self._refuse_until = self._monotonic() + pause

    def _write(self, batch: list[Statement]) -> None:
        db = self._db
        try:
            db.execute("BEGIN")
            for sql, params in batch:
                db.execute(sql, params)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if self._vacuum:
            self._shrink(_VACUUM_PAGES)

    def _shrink(self, pages: int | None) -> None:
        """Give up to ``pages`` free pages (None: all) back to the file system. (executescript
        steps the pragma to its end: execute would free one page.)"""
        self._db.executescript(f"PRAGMA incremental_vacuum{'' if pages is None else f'({pages})'};")
        if not self._db.execute("PRAGMA freelist_count").fetchone()[0]:
            self._vacuum = False

    # ------------------------------------------------------------------ failure
    @property
    def broken(self) -> bool:
        """True after a failed commit, until ``recover``: memory is ahead of disk."""
        return self._broken is not None

    def recover(self) -> Saved:
        """What is on disk, for the store to rebuild its state from after a failed commit
        (call with the store lock held). Raises StorageError if it cannot be read."""
        saved = self.load()
        self._broken = None
        logger.warning("Reloaded the state from %s after a failed write; writes are tried "
                       "again from %s s on", self.path, f"{self._refuse_until:.1f}")
        return saved

    def writable(self) -> bool:
        """False while writes are refused (after a failed commit, see the module docstring)."""
        return self._broken is None and self._monotonic() >= self._refuse_until

    def status(self) -> dict[str, Any]:
        """The data directory's state, for ``statistics()``."""
        return {
            "path": str(self.path),
            "writable": self.writable(),
            "last_error": self._error,
            "consecutive_failures": self._failures,
            "retry_in_seconds": max(self._refuse_until - self._monotonic(), 0.0),
        }

    def backup(self, target: str | os.PathLike[str]) -> None:
        """Copy what is committed now into a new SQLite file ``target``, consistently,
        through this journal's own connection (while the server runs, no other process may
        open the file: see PRAGMAS). Commits wait meanwhile."""
        with self._cond:
            while self._writing:
                self._cond.wait()
            copy = sqlite3.connect(target)
            try:
                self._db.backup(copy)
            finally:
                copy.close()

    def close(self) -> None:
        """Commit what is staged, then close the database and release the directory."""
        try:
            if self._broken is None:
                self.wait(self._staged)
                if self._vacuum:
                    self._shrink(None)
        finally:
            self._db.close()
            self._lock_file.close()


# ---------------------------------------------------------------------- reading and migrating
def read(db: sqlite3.Connection) -> Saved:
    """Everything a database of the current schema holds. Raises ValueError (and the
    errors of sqlite3 and pickle) for a row that cannot be read back."""
    layouts = {kind: tuple(names) for kind, names in json.loads(
        db.execute("SELECT value FROM meta WHERE key = ?", (_LAYOUTS_KEY,)).fetchone()[0]
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
        (ticket, arrived, decode.span(pickle.loads(record))) for ticket, arrived, record in
        db.execute("SELECT ticket, arrived, record FROM spans ORDER BY id")
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
    db.execute(_PUT_META, (_LAYOUTS_KEY, json.dumps(schema.LAYOUTS)))


def _from_version_2(db: sqlite3.Connection) -> None:
    """Version 3 numbers finished rollouts for the feed (``finished_rollouts``): those already
    finished get numbers in the order of their end times; and it remembers replies to
    requests (mpstore.replies), of which an older version kept none."""
    db.execute("ALTER TABLE rollouts ADD COLUMN finished INTEGER")
    db.execute("CREATE TABLE replies (client TEXT NOT NULL, seq INTEGER NOT NULL, "
               "result BLOB NOT NULL, PRIMARY KEY (client, seq)) WITHOUT ROWID")
    layouts = json.loads(db.execute("SELECT value FROM meta WHERE key = ?",
                                    (_LAYOUTS_KEY,)).fetchone()[0])
    decode, ended = schema.Decoder({k: tuple(v) for k, v in layouts.items()}), []
    for rid, created, record in db.execute("SELECT rollout_id, created, record FROM rollouts"):
        rollout, _ = decode.rollout(pickle.loads(record))
        if rollout.status.is_finished:
            ended.append((rollout.end_time or 0.0, created, rid))
    for number, (_, _, rid) in enumerate(sorted(ended), start=1):
        db.execute("UPDATE rollouts SET finished = ? WHERE rollout_id = ?", (number, rid))


#: How to bring a database of each older schema version to the next one.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _from_version_1, 2: _from_version_2,
}


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
