"""The journal's log file (mpstore.changelog) and what the journal does with it: commits
that only reached the log survive, and compaction moves them into the database once. (Older
schema versions: tests/test_durable_migration.py.)

The full disk (a real tmpfs) is in tests/test_storage_failure.py, the killed server in
tests/test_crash.py.
"""

from __future__ import annotations

import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import mpstore.compactor
from mpstore import InMemoryStore, Span
from mpstore.changelog import LogFile
from mpstore.compactor import LOG_NAME, SEALED_NAME


def test_frames_come_back_in_order_and_a_torn_tail_is_cut(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "log", sync=False)
    log.append(b"first")
    log.append(b"second" * 100)
    whole = log.size
    log.close()
    with open(tmp_path / "log", "ab") as handle:  # a frame cut short: its header, half of it
        handle.write((200).to_bytes(4, "little") + (0).to_bytes(4, "little") + b"x" * 100)
    again = LogFile(tmp_path / "log", sync=False)
    assert again.frames() == [b"first", b"second" * 100]
    assert (tmp_path / "log").stat().st_size == whole == again.size
    again.append(b"third")  # appends after the last whole frame, not after the torn one
    assert again.frames() == [b"first", b"second" * 100, b"third"]
    again.close()


def test_a_damaged_frame_ends_the_log(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "log", sync=True)
    log.append(b"kept")
    end_of_first = log.size
    log.append(b"damaged")
    log.append(b"after it")
    log.close()
    data = bytearray((tmp_path / "log").read_bytes())
    data[end_of_first + 8] ^= 0xFF  # the second payload's first byte
    (tmp_path / "log").write_bytes(bytes(data))
    again = LogFile(tmp_path / "log", sync=False)
    assert again.frames() == [b"kept"]
    assert (tmp_path / "log").stat().st_size == end_of_first
    again.close()


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG (a real short write, then an error)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_refused_append_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "log", sync=False)
    log.append(b"kept")
    size = log.size
    with file_size_limit(size + 1000), pytest.raises(OSError):
        log.append(b"y" * 5000)  # the first 1000 bytes are written, then EFBIG
    assert (tmp_path / "log").stat().st_size == size == log.size
    assert log.frames() == [b"kept"]
    log.close()


def _spans(store: InMemoryStore, rid: str) -> list[int]:
    return [s.sequence_id for s in store.query_spans(rid)]


def test_commits_in_the_log_survive_an_exit_without_close(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os
        from mpstore import InMemoryStore, Span
        store = InMemoryStore(data_dir={str(tmp_path)!r})
        for n in range(3):
            r = store.start_rollout(f"task {{n}}")
            store.add_span(Span(r.rollout_id, r.attempt.attempt_id, 1, "s"))
        print(r.rollout_id, flush=True)
        os._exit(0)  # no close: nothing is compacted, the log holds every commit
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    assert (tmp_path / LOG_NAME).stat().st_size > 0
    store = InMemoryStore(data_dir=tmp_path)
    assert [r.input for r in store.query_rollouts()] == ["task 0", "task 1", "task 2"]
    assert _spans(store, done.stdout.strip()) == [1]
    assert (tmp_path / LOG_NAME).stat().st_size == 0  # applied to the database on open
    store.close()


def _rows(store: InMemoryStore, table: str) -> int:
    logs = store._journal._logs  # type: ignore[union-attr]
    with logs._db_lock:  # the server has the file to itself: ask through its connection
        return int(logs._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_the_compactor_moves_sealed_logs_into_the_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpstore.compactor, "COMPACT_AFTER", 1)  # every commit seals the log
    store = InMemoryStore(data_dir=tmp_path)
    r = store.start_rollout("x")
    assert store._journal._logs.wait_compacted(30)  # type: ignore[union-attr]
    assert _rows(store, "rollouts") == 1 and _rows(store, "spans") == 0
    store.add_span(Span(r.rollout_id, r.attempt.attempt_id, 1, "s"))
    assert store._journal._logs.wait_compacted(30)  # type: ignore[union-attr]
    assert _rows(store, "spans") == 1
    assert not (tmp_path / SEALED_NAME).exists()
    assert (tmp_path / LOG_NAME).stat().st_size == 0
    store.close()


def test_a_failed_compaction_is_tried_again(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    failures = []
    real = mpstore.compactor.apply_statements

    def flaky(db: sqlite3.Connection, batch: list, last: int) -> None:
        if not failures:
            failures.append(last)
            raise sqlite3.OperationalError("database or disk is full")
        real(db, batch, last)

    monkeypatch.setattr(mpstore.compactor, "COMPACT_AFTER", 1)
    monkeypatch.setattr(mpstore.compactor, "RETRY_COMPACTION", 0.01)
    monkeypatch.setattr(mpstore.compactor, "apply_statements", flaky)
    store = InMemoryStore(data_dir=tmp_path)
    r = store.start_rollout("x")
    assert store._journal._logs.wait_compacted(30)  # type: ignore[union-attr]
    assert failures and _rows(store, "rollouts") == 1
    assert store.get_rollout_by_id(r.rollout_id) is not None
    store.close()
    again = InMemoryStore(data_dir=tmp_path)
    assert [x.rollout_id for x in again.query_rollouts()] == [r.rollout_id]
    again.close()


def test_a_log_not_emptied_after_its_compaction_is_not_applied_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the server died between a compaction's commit and emptying the log."""
    def refuse(self: LogFile) -> None:
        raise OSError("not now")

    monkeypatch.setattr(LogFile, "clear", refuse)
    store = InMemoryStore(data_dir=tmp_path)
    r = store.start_rollout("x")
    for seq in (1, 2, 3):
        store.add_span(Span(r.rollout_id, r.attempt.attempt_id, seq, "s"))
    store.close()  # the compaction on close: applied, but the log was not emptied
    assert (tmp_path / LOG_NAME).stat().st_size > 0
    monkeypatch.undo()
    store = InMemoryStore(data_dir=tmp_path)
    assert _spans(store, r.rollout_id) == [1, 2, 3]
    assert len(store.query_rollouts()) == 1
    store.close()
