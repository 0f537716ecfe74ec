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
commit in progress commits *every* staged change at once, the others wait for it. So a reply
never leaves the server before its change is on disk, and concurrent callers share commits.

A commit is one frame appended to the log file ``mpstore.log``: the statements, pickled, with
their tickets. Every ``COMPACT_AFTER`` bytes, a thread applies the log to the database in one
transaction (*compaction*, :mod:`mpstore.compactor`; also on close and before a backup), and
opening the directory applies what the logs hold past the last ticket applied. Why: the
cycle's commits changed ~1.4 KB of rows each, but a SQLite transaction per commit wrote ~10
whole pages of WAL for them and synced them again at every checkpoint; a compaction writes
each changed page once for ~100 cycles, off the dispatcher (benchmarks/README.md, "durable").
If the database cannot be written when the logs are read back (a full disk), the state is
read from an in-memory copy with the logs applied, and they stay until a compaction succeeds.

A failed commit (a full disk, an I/O error) fails every ticket staged until then: those
changes were applied in memory but not on disk, so the journal is *broken* until the store has
reloaded its state from the database (``recover``), which then again is exactly what is on
disk. After a failure the journal refuses writes for ``RETRY_AFTER`` seconds (doubling on each
further failure, up to ``RETRY_AFTER_MAX``), then lets the next write try the disk again;
``status()`` says which it is doing.

``synchronous`` (SPEC §9): ``normal`` (default) - a commit (a ``write`` to the log) survives
a killed server process but not a power loss or OS crash; ``full`` - also survives those, at
an ``fdatasync`` of the log per commit (and SQLite's ``synchronous=FULL`` for compactions).

Errors: :class:`~mpstore.errors.StorageError` for a foreign, damaged or newer database, for a
directory already used by another server, and for a failed or refused write.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import schema
from .accounting import COMMIT_BUCKETS, Histogram
from .changes import ChangeSet, Saved
from .compactor import LOG_NAME, Logs
from .errors import StorageError
from .tables import (
    LAYOUTS_KEY,
    MIGRATIONS,
    PUT_META,
    SCHEMA_SQL,
    UNREADABLE,
    Statement,
    migrate,
    read,
    statements,
)

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
        try:
            self._logs = Logs(self.path, self._db, sync=synchronous == "full")
        except OSError as exc:
            self._db.close()
            self._lock_file.close()
            raise StorageError(f"cannot open {self.path / LOG_NAME}: {exc}") from None
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
                    f"BEGIN; {SCHEMA_SQL} PRAGMA application_id={APPLICATION_ID}; "
                    f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )
                db.execute(PUT_META, (LAYOUTS_KEY, json.dumps(schema.LAYOUTS)))
            else:
                migrate(db, version)
        except UNREADABLE as exc:
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
        db = None
        try:
            db = self._logs.replay()
            saved = read(db)
            if not self._staged:
                last = db.execute("SELECT MAX(ticket) FROM (SELECT ticket FROM rollouts "
                                  "UNION ALL SELECT ticket FROM spans)").fetchone()[0]
                self._staged = self._committed = max(last or 0, self._logs.last_ticket)
        except UNREADABLE as exc:
            raise StorageError(f"{self.path} is damaged: {exc}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc}") from None
        finally:
            if db is not None and db is not self._db:
                db.close()
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
            self._write(batch, first, last)
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
        self._error = self._broken = _describe(failure)
        self._failures += 1
        pause = min(RETRY_AFTER * 2 ** (self._failures - 1), RETRY_AFTER_MAX)
        self._refuse_until = self._monotonic() + pause

    def _write(self, batch: list[Statement], first: int, last: int) -> None:
        """Append the batch to the log: committed once that returns (mpstore.compactor
        applies the log to the database later, in its own thread)."""
        if batch:
            self._logs.append(batch, first, last)

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
            try:
                self._logs.backup(target)
            except (sqlite3.Error, OSError) as exc:
                raise StorageError(f"cannot back up {self.path}: {exc}") from None

    def close(self) -> None:
        """Commit what is staged, then close the database and release the directory."""
        try:
            if self._broken is None:
                self.wait(self._staged)
        finally:
            try:
                self._logs.close(flush=self._broken is None)
            finally:
                self._db.close()
                self._lock_file.close()


def _describe(failure: Exception) -> str:
    """A failed write, for StorageError and ``status()``: SQLite says "database or disk is
    full", the log's ``write`` only ENOSPC; both read "full" to an operator."""
    if isinstance(failure, OSError) and failure.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the file system is full ({failure.strerror})"
    return f"{type(failure).__name__}: {failure}"
