"""The durable journal's log files, and their compaction into SQLite in a thread of its own.

A commit appends its statements to the current log, ``mpstore.log`` (one frame, see
:mod:`mpstore.changelog`). Once the log passes ``COMPACT_AFTER`` bytes it is *sealed*:
renamed to ``mpstore.log.1`` and replaced by an empty one. The compactor thread then runs the
sealed statements against the database in one transaction (``tables.apply``: squashed, spans
in chunks, each table's rows in multi-row INSERTs, see ``tables.plan``; and recording the last
ticket applied as ``compacted_ticket`` in the same transaction) and deletes the sealed file.
Commits never wait for it: one log is sealed at a time, and while it is being
applied the current one grows past the bound. Why a thread: compaction was a tenth of a
durable server's busy time (benchmarks/README.md, "durable"), and the dispatcher that commits
is the server's bottleneck.

A failed compaction (a full disk) is retried every ``RETRY_COMPACTION`` seconds; meanwhile
both files hold everything. Opening the directory (``replay``) applies both files' frames past
``compacted_ticket``, sealed first, so a frame applied before a crash is never applied twice.

Thread-safety: ``append`` is called by one committer at a time; the database connection is
used under ``_db_lock`` only (by the thread, ``replay``, ``flush`` and ``backup``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sqlite3
import threading
from pathlib import Path

from .changelog import LogFile
from .tables import COMPACTED_KEY, LOG_VERSIONS, SCHEMA_VERSION, Statement, deletes
from .tables import apply as apply_statements

__all__ = ["COMPACT_AFTER", "LOG_NAME", "RETRY_COMPACTION", "SEALED_NAME", "Logs"]

logger = logging.getLogger(__name__)

LOG_NAME = "mpstore.log"
SEALED_NAME = "mpstore.log.1"
#: Log bytes past which the log is sealed and compacted: about 100 cycles of the benchmark,
#: a transaction of ~15 ms in the compactor. Larger saves little (each page is written once
#: per compaction either way); smaller writes the same hot pages more often.
COMPACT_AFTER = 1 << 20
#: Seconds between tries of a compaction that failed.
RETRY_COMPACTION = 1.0
#: Pages given back to the file system after a compaction that deleted rollouts (16 MiB,
#: about 0.3 s); the rest is given back by later ones and on close. Freed pages are reused
#: by new rows meanwhile, so the file never grows because of them.
_VACUUM_PAGES = 4096


class Logs:
    """The log files in ``directory`` beside the database ``db``; see the module docstring.
    With ``sync``, every append is on the device when it returns."""

    def __init__(self, directory: Path, db: sqlite3.Connection, sync: bool) -> None:
        self._db, self._sync = db, sync
        self._path, self._sealed_path = directory / LOG_NAME, directory / SEALED_NAME
        self._current = LogFile(self._path, sync)  # raises OSError
        self._logged: list[Statement] = []  # the current log's statements past the database
        self.last_ticket = 0  # the last ticket either log holds
        self._sealed: list[Statement] | None = None  # the sealed log's, until applied
        self._sealed_last = 0
        self._vacuum = False  # rollouts were deleted: give their pages back (db lock held)
        self._db_lock = threading.Lock()
        self._cond = threading.Condition()  # guards _sealed and _stopping
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mpstore-compactor",
                                        daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        """Bytes in the current log."""
        return self._current.size

    # ------------------------------------------------------------------ the committer
    def append(self, batch: list[Statement], first: int, last: int) -> None:
        """Append one commit (tickets ``first``..``last``); committed once this returns.
        Raises OSError, with the log as it was."""
        payload = pickle.dumps((SCHEMA_VERSION, first, last, batch), pickle.HIGHEST_PROTOCOL)
        self._current.append(payload)
        self._logged.extend(batch)
        self.last_ticket = last
        if self._current.size >= COMPACT_AFTER:
            self._seal()

    def _seal(self) -> None:
        with self._cond:
            if self._sealed is not None:
                return  # the last one is still being applied: this one grows on
            try:
                os.rename(self._path, self._sealed_path)
                fresh = LogFile(self._path, self._sync)
            except OSError as exc:
                if not self._path.exists():
                    with contextlib.suppress(OSError):
                        os.rename(self._sealed_path, self._path)
                logger.warning("Cannot start a new %s (%s); the log grows on", LOG_NAME, exc)
                return
            self._current.close()
            self._current = fresh
            self._sealed, self._sealed_last, self._logged = self._logged, self.last_ticket, []
            self._cond.notify_all()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._sealed is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._sealed
            try:
                self._apply_sealed(batch)
            except (sqlite3.Error, OSError) as exc:
                logger.warning("Applying %s to the database failed (%s); it is kept, and "
                               "tried again in %.0f s", SEALED_NAME, exc, RETRY_COMPACTION)
                with self._cond:
                    if not self._stopping:
                        self._cond.wait(RETRY_COMPACTION)

    def _apply_sealed(self, batch: list[Statement] | None) -> None:
        """Apply the sealed log, unless someone else (``flush``) has meanwhile."""
        with self._db_lock:
            with self._cond:
                if batch is None or self._sealed is not batch:
                    return
                last = self._sealed_last
            self._apply(self._db, batch, last)
            with self._cond:
                self._sealed = None
                self._cond.notify_all()  # wait_compacted
            with contextlib.suppress(OSError):  # if it stays, replay skips its frames
                self._sealed_path.unlink()
            if self._vacuum:
                self._shrink(_VACUUM_PAGES)

    def _apply(self, db: sqlite3.Connection, batch: list[Statement], last: int) -> None:
        """``tables.apply``, noting (for the database's own connection) that deleted rows'
        pages can be given back."""
        apply_statements(db, batch, last)
        if db is self._db and deletes(batch):
            self._vacuum = True

    def _shrink(self, pages: int | None) -> None:
        """Give up to ``pages`` free pages (None: all) back to the file system (lock held).
        (executescript steps the pragma to its end: execute would free one page.)"""
        self._db.executescript(f"PRAGMA incremental_vacuum{'' if pages is None else f'({pages})'};")
        if not self._db.execute("PRAGMA freelist_count").fetchone()[0]:
            self._vacuum = False

    def wait_compacted(self, timeout: float) -> bool:
        """Wait until no sealed log is waiting to be applied; False if ``timeout`` seconds
        passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._sealed is None, timeout)

    # ------------------------------------------------------------------ everything at once
    def flush(self) -> None:
        """Apply both logs to the database now and empty them (no commit may run
        meanwhile). Raises sqlite3.Error or OSError; then nothing applied is lost either."""
        with self._db_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._cond:
            sealed, sealed_last = self._sealed, self._sealed_last
        if sealed is not None:
            self._apply(self._db, sealed, sealed_last)
            with self._cond:
                self._sealed = None
                self._cond.notify_all()
            with contextlib.suppress(OSError):
                self._sealed_path.unlink()
        if self._logged:
            self._apply(self._db, self._logged, self.last_ticket)
            self._logged = []
        if self._current.size:
            self._current.clear()  # if this fails, replay skips the frames by their tickets

    def backup(self, target: str | os.PathLike[str]) -> None:
        """Flush, then copy the database into a new SQLite file ``target``. Raises
        sqlite3.Error or OSError."""
        with self._db_lock:
            self._flush_locked()
            copy = sqlite3.connect(target)
            try:
                self._db.backup(copy)
            finally:
                copy.close()

    def replay(self) -> sqlite3.Connection:
        """Read both logs back (on open, and after a failed append) and apply them; return
        the connection to read the state from: the database's own, or, if it cannot be
        written now (a full disk), an in-memory copy with the logs applied (they are then
        kept, and the thread tries them again). Raises sqlite3.Error, OSError, ValueError
        and pickle's errors for files it cannot read."""
        with self._db_lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?",
                                   (COMPACTED_KEY,)).fetchone()
            compacted = int(row[0]) if row else 0
            sealed, sealed_last = [], compacted
            if self._sealed_path.exists():
                old = LogFile(self._sealed_path, self._sync)
                try:
                    sealed, sealed_last = _past(old.frames(), compacted)
                finally:
                    old.close()
            logged, logged_last = _past(self._current.frames(), sealed_last)
            with self._cond:
                self._sealed, self._sealed_last = (sealed or None), sealed_last
            self._logged, self.last_ticket = logged, max(sealed_last, logged_last)
            try:
                self._flush_locked()
                return self._db
            except (sqlite3.Error, OSError) as exc:
                logger.warning("Cannot apply %s to the database now (%s); reading through a "
                               "copy in memory", LOG_NAME, exc)
            copy = sqlite3.connect(":memory:")
            self._db.backup(copy)
            with self._cond:  # what the failed flush left, in order
                if self._sealed is not None:
                    self._apply(copy, self._sealed, self._sealed_last)
                self._cond.notify_all()  # the thread tries the sealed log again
            self._apply(copy, self._logged, self.last_ticket)
        return copy

    def close(self, flush: bool) -> None:
        """Stop the thread; with ``flush``, apply both logs (a failure is logged: the next
        open applies them) and give freed pages back."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        try:
            if flush:
                with self._db_lock:
                    self._flush_locked()
                    if self._vacuum:
                        self._shrink(None)
        except (sqlite3.Error, OSError) as exc:
            logger.warning("Left %s beside the database: %s", LOG_NAME, exc)
        finally:
            self._current.close()


def _past(payloads: list[bytes], ticket: int) -> tuple[list[Statement], int]:
    """The statements of the frames after ``ticket``, and the last ticket they hold."""
    statements: list[Statement] = []
    last = ticket
    for payload in payloads:
        version, _first, end, batch = pickle.loads(payload)
        if version not in LOG_VERSIONS:
            raise ValueError(f"{LOG_NAME} was written for schema version {version}")
        if end > ticket:
            statements.extend(batch)
            last = end
    return statements, last
