"""Durability: the store's changes written to SQLite (stdlib ``sqlite3``, WAL mode).

Storage only moves bytes: records are pickled whole, rows are keyed by id, and this module
knows nothing of statuses or queues beyond "a rollout row has a queue position". Reads never
touch the database; it is read once, on open, to restore the state.

Write path (group commit). Under the store lock, ``stage()`` turns the state's ``Changes``
into SQL statements (pickling the records right there, so what is written is exactly what the
lock protected) and gives the change a ticket. After the lock is released, the caller's
``wait(ticket)`` returns once that ticket is committed: the first waiter to find no commit in
progress commits *every* staged change in one transaction, the others wait for it. So a reply
never leaves the server before its change is on disk, and concurrent callers share commits.

``synchronous`` (SPEC §9): ``normal`` (default) - in WAL mode a commit survives a killed server
process but not a power loss or OS crash; ``full`` - also survives those, at an fsync per commit.

Errors: :class:`~mpstore.errors.StorageError` for a foreign, damaged or newer database, for a
directory already used by another server, and for a failed write (after which every write is
refused: memory and disk would disagree).
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import sqlite3
import threading
from pathlib import Path
from typing import Any

from .errors import StorageError
from .state import Saved, StoreState

__all__ = ["SYNCHRONOUS", "Journal"]

logger = logging.getLogger(__name__)

#: Identifies mpstore's files (PRAGMA application_id; "mpst" in ASCII) and their layout.
APPLICATION_ID = 0x6D707374
SCHEMA_VERSION = 1  # bump on any change to _SCHEMA or to what a record holds
DB_NAME = "mpstore.sqlite3"
LOCK_NAME = "mpstore.lock"
#: The accepted ``synchronous`` levels and what SQLite calls them.
SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}

_SCHEMA = """
CREATE TABLE rollouts (rollout_id TEXT PRIMARY KEY, created INTEGER NOT NULL,
                       queue_position INTEGER, counter INTEGER NOT NULL,
                       ticket INTEGER NOT NULL, record BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE counters (rollout_id TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE spans (id INTEGER PRIMARY KEY, rollout_id TEXT NOT NULL, ticket INTEGER NOT NULL,
                    arrived REAL NOT NULL, record BLOB NOT NULL);
CREATE INDEX spans_by_rollout ON spans (rollout_id);
CREATE TABLE evicted (rollout_id TEXT PRIMARY KEY);
CREATE TABLE resources (resources_id TEXT PRIMARY KEY, record BLOB NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
"""

_PUT_ROLLOUT = "INSERT OR REPLACE INTO rollouts VALUES (?, ?, ?, ?, ?, ?)"
_PUT_COUNTER = "INSERT OR REPLACE INTO counters VALUES (?, ?)"
_ADD_SPAN = "INSERT INTO spans (rollout_id, ticket, arrived, record) VALUES (?, ?, ?, ?)"
_EVICT = "INSERT OR IGNORE INTO evicted VALUES (?)"
_DROP_SPANS = "DELETE FROM spans WHERE rollout_id = ?"
_PUT_RESOURCES = "INSERT OR REPLACE INTO resources VALUES (?, ?)"
_PUT_META = "INSERT OR REPLACE INTO meta VALUES (?, ?)"

Statement = tuple[str, tuple[Any, ...]]


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


class Journal:
    """One server's SQLite file in ``data_dir``; see the module docstring."""

    def __init__(self, data_dir: str | os.PathLike[str], synchronous: str = "normal") -> None:
        """Lock ``data_dir`` and open (or create) its database.

        Raises StorageError if another server holds the directory, or if the file is not an
        mpstore database of this schema version, or is damaged.
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
        self._cond = threading.Condition()
        self._pending: list[Statement] = []
        self._staged = 0  # last ticket handed out
        self._committed = 0  # last ticket on disk
        self._writing = False
        self._failure: BaseException | None = None

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
        try:
            db = sqlite3.connect(file, check_same_thread=False, isolation_level=None)
            if not fresh:
                self._check(db, file)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            if fresh:
                db.executescript(
                    f"BEGIN; {_SCHEMA} PRAGMA application_id={APPLICATION_ID}; "
                    f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"{file} is damaged or not an mpstore database: {exc}") from None
        return db

    @staticmethod
    def _check(db: sqlite3.Connection, file: Path) -> None:
        app, version = (db.execute(f"PRAGMA {p}").fetchone()[0]
                        for p in ("application_id", "user_version"))
        if app != APPLICATION_ID:
            raise StorageError(f"{file} is not an mpstore database (application_id {app:#x})")
        if version != SCHEMA_VERSION:
            raise StorageError(
                f"{file} has schema version {version}; this mpstore reads version "
                f"{SCHEMA_VERSION} (upgrade mpstore, or use another --data-dir)"
            )
        result = db.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise StorageError(f"{file} is damaged: {result}")

    def load(self) -> Saved:
        """Everything stored, for ``StoreState.restore``. Raises StorageError if a record
        cannot be read back."""
        saved, db = Saved(), self._db
        try:
            for created, position, counter, ticket, record in db.execute(
                "SELECT created, queue_position, counter, ticket, record FROM rollouts "
                "ORDER BY created"
            ):
                rollout, attempts = pickle.loads(record)
                saved.rollouts.append((created, position, counter, ticket, rollout, attempts))
            saved.counters = dict(db.execute("SELECT rollout_id, value FROM counters"))
            saved.spans = [
                (ticket, arrived, pickle.loads(record)) for ticket, arrived, record in
                db.execute("SELECT ticket, arrived, record FROM spans ORDER BY id")
            ]
            last = db.execute("SELECT MAX(ticket) FROM (SELECT ticket FROM rollouts "
                              "UNION ALL SELECT ticket FROM spans)").fetchone()[0]
            self._staged = self._committed = last or 0
            saved.evicted = [rid for (rid,) in db.execute("SELECT rollout_id FROM evicted")]
            saved.resources = [pickle.loads(r) for (r,) in
                               db.execute("SELECT record FROM resources")]
            row = db.execute("SELECT value FROM meta WHERE key = 'latest_resources_id'")
            latest = row.fetchone()
            saved.latest_resources_id = latest[0] if latest else None
        except (sqlite3.DatabaseError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise StorageError(f"{self.path / DB_NAME} is damaged: {exc}") from None
        return saved

    # ------------------------------------------------------------------ write
    def stage(self, state: StoreState) -> int:
        """Turn the state's changes into statements (call with the store lock held).

        Returns the ticket to ``wait`` for, or 0 when nothing changed. Raises StorageError
        if an earlier write failed.
        """
        changes = state.changes
        if not changes:
            return 0
        if self._failure is not None:
            raise StorageError(f"The data directory can no longer be written: {self._failure}")
        ticket = self._staged + 1  # only stage() moves it, and stage() runs under the lock
        statements: list[Statement] = []
        for rid in changes.rollouts:
            rollout = state.rollouts.get(rid)
            counter = state.sequence.get(rid, 0)
            if rollout is None:  # REF counts sequence ids for any id, known or not
                statements.append((_PUT_COUNTER, (rid, counter)))
                continue
            record = _dumps((rollout, state.attempts[rid]))
            row = (rid, state.created[rid], state.queue.get(rid), counter, ticket, record)
            statements.append((_PUT_ROLLOUT, row))
        statements.extend(
            (_ADD_SPAN, (s.rollout_id, ticket, arrived, _dumps(s))) for s, arrived in changes.spans
        )
        for rid in changes.evicted:
            statements.extend(((_EVICT, (rid,)), (_DROP_SPANS, (rid,))))
        for resources_id in changes.resources:
            record = _dumps(state.resources[resources_id])
            statements.append((_PUT_RESOURCES, (resources_id, record)))
        if changes.resources:
            statements.append((_PUT_META, ("latest_resources_id", state.latest_resources_id)))
        state.changes = type(changes)()
        with self._cond:
            self._pending.extend(statements)
            self._staged = ticket
        return ticket

    def wait(self, ticket: int) -> None:
        """Block until ``ticket`` is committed (call without the store lock).

        Raises StorageError if the commit failed.
        """
        with self._cond:
            while self._committed < ticket:
                if self._failure is not None:
                    raise StorageError(f"Writing to the data directory failed: {self._failure}")
                if self._writing:
                    self._cond.wait()
                    continue
                self._commit_pending()

    def _commit_pending(self) -> None:
        """Commit everything staged so far in one transaction (``_cond`` held on entry/exit)."""
        batch, last = self._pending, self._staged
        self._pending, self._writing = [], True
        self._cond.release()
        try:
            self._write(batch)
        except BaseException as exc:
            failure: BaseException | None = exc
            logger.error("Writing to %s failed: %s", self.path, exc)
        else:
            failure = None
        finally:
            self._cond.acquire()
            self._writing = False
        if failure is not None:
            self._failure = failure
        else:
            self._committed = last
        self._cond.notify_all()

    def _write(self, batch: list[Statement]) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            for sql, params in batch:
                db.execute(sql, params)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Commit what is staged, then close the database and release the directory."""
        try:
            self.wait(self._staged)
        finally:
            self._db.close()
            self._lock_file.close()
