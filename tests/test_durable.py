"""Durability in process: what a restart restores, and how bad data directories fail.

The crash harness with a real server killed by SIGKILL is in tests/test_crash.py.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from mpstore import LLM, InMemoryStore, Span, SpansEvicted, StorageError
from mpstore.durable import DB_NAME
from tests.conftest import FakeClock


def reopen(store: InMemoryStore, clock: FakeClock, data_dir: Path, **kw: object) -> InMemoryStore:
    store.close()
    return InMemoryStore(clock=clock, data_dir=data_dir, **kw)  # type: ignore[arg-type]


def test_restart_restores_queue_order_after_requeue(tmp_path: Path, clock: FakeClock) -> None:
    store = InMemoryStore(clock=clock, data_dir=tmp_path)
    retry = {"max_attempts": 2, "retry_condition": ["failed"]}
    first = store.enqueue_rollout("a", config=retry)
    second = store.enqueue_rollout("b")
    claimed = store.dequeue_rollout()
    assert claimed is not None and claimed.rollout_id == first.rollout_id
    store.update_attempt(first.rollout_id, "latest", status="failed")  # requeued behind "b"
    third = store.enqueue_rollout("c")
    store = reopen(store, clock, tmp_path)
    order = [store.dequeue_rollout() for _ in range(3)]
    assert [c.rollout_id for c in order if c] == [
        second.rollout_id, first.rollout_id, third.rollout_id
    ]
    assert store.dequeue_rollout() is None
    assert store.query_attempts(first.rollout_id)[-1].sequence_id == 2
    store.close()


def test_running_attempt_keeps_its_clock_across_restart(tmp_path: Path, clock: FakeClock) -> None:
    store = InMemoryStore(clock=clock, data_dir=tmp_path)
    store.enqueue_rollout("a", config={"timeout_seconds": 10.0})
    claimed = store.dequeue_rollout()
    assert claimed is not None
    clock.advance(6.0)
    store = reopen(store, clock, tmp_path)
    assert store.get_latest_attempt(claimed.rollout_id).status == "preparing"  # type: ignore[union-attr]
    clock.advance(5.0)  # 11 s after the attempt started, 5 s after the restart
    assert store.get_latest_attempt(claimed.rollout_id).status == "timeout"  # type: ignore[union-attr]
    assert store.get_rollout_by_id(claimed.rollout_id).status == "failed"  # type: ignore[union-attr]
    store.close()


def test_spans_counters_resources_and_eviction_marks(tmp_path: Path, clock: FakeClock) -> None:
    store = InMemoryStore(clock=clock, data_dir=tmp_path, eviction_threshold=20_000,
                          safe_threshold=0)
    done = store.start_rollout("old")
    for seq in (3, 1, 2):
        store.add_span(Span(done.rollout_id, done.attempt.attempt_id, seq, f"s{seq}"))
    store.update_attempt(done.rollout_id, "latest", status="succeeded")
    live = store.start_rollout("new")
    store.add_span(Span(live.rollout_id, live.attempt.attempt_id, 7, "kept"))
    assert store.get_next_span_sequence_id(live.rollout_id, live.attempt.attempt_id) == 8
    first = store.add_resources({"llm": LLM(endpoint="http://x", model="m")})
    store.update_resources("v1", {"llm": LLM(endpoint="http://y", model="m")})
    store.update_resources("v1", {"llm": LLM(endpoint="http://z", model="m")})
    store = reopen(store, clock, tmp_path, eviction_threshold=20_000, safe_threshold=0)
    assert [s.sequence_id for s in store.query_spans(done.rollout_id)] == [1, 2, 3]
    assert store.get_next_span_sequence_id(live.rollout_id, "any") == 9
    latest = store.get_latest_resources()
    assert latest is not None and (latest.resources_id, latest.version) == ("v1", 2)
    assert store.get_resources_by_id(first.resources_id) is not None
    # Fill past the threshold: the finished rollout goes first (D8), and stays evicted.
    for seq in range(10, 110):  # well over 20,000 bytes of spans
        store.add_span(Span(live.rollout_id, live.attempt.attempt_id, seq, "fill"))
    with pytest.raises(SpansEvicted):
        store.query_spans(done.rollout_id)
    store = reopen(store, clock, tmp_path, eviction_threshold=20_000, safe_threshold=0)
    with pytest.raises(SpansEvicted):
        store.query_spans(done.rollout_id)
    assert store.statistics()["evicted_rollouts"] >= 1
    store.close()


def test_second_store_on_same_directory_is_refused(tmp_path: Path) -> None:
    store = InMemoryStore(data_dir=tmp_path)
    with pytest.raises(StorageError, match="in use by another mpstore server"):
        InMemoryStore(data_dir=tmp_path)
    store.close()
    InMemoryStore(data_dir=tmp_path).close()  # released on close


def test_newer_schema_version_is_a_clear_error(tmp_path: Path) -> None:
    InMemoryStore(data_dir=tmp_path).close()
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as db, db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StorageError, match="schema version 99"):
        InMemoryStore(data_dir=tmp_path)


def test_a_database_open_in_another_program_is_a_clear_error(tmp_path: Path) -> None:
    first = InMemoryStore(data_dir=tmp_path)
    first.enqueue_rollout("kept")
    first.close()
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as other:
        other.execute("SELECT COUNT(*) FROM rollouts").fetchone()  # an sqlite3 shell, say
        with pytest.raises(StorageError, match="open in another program"):
            InMemoryStore(data_dir=tmp_path)
    store = InMemoryStore(data_dir=tmp_path)  # once it has let go
    assert [r.input for r in store.query_rollouts()] == ["kept"]
    store.close()


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as db, db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StorageError, match="not an mpstore database"):
        InMemoryStore(data_dir=tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_file_is_an_error_not_an_empty_store(tmp_path: Path, damage: str) -> None:
    store = InMemoryStore(data_dir=tmp_path)
    for i in range(200):
        store.enqueue_rollout({"i": i, "pad": "x" * 500})
    store.close()
    path = tmp_path / DB_NAME
    assert not os.path.exists(f"{path}-wal")  # closing checkpointed it into the main file
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not sqlite" * 10 + data[180:])
    else:
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StorageError):
        InMemoryStore(data_dir=tmp_path)


def test_without_data_dir_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    monkeypatch.chdir(tmp_path)
    store = InMemoryStore()
    store.enqueue_rollout("a")
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_heartbeat_of_a_span_that_changed_no_status_survives(tmp_path: Path,
                                                             clock: FakeClock) -> None:
    store = InMemoryStore(clock=clock, data_dir=tmp_path)
    claimed = store.start_rollout("a", config={"unresponsive_seconds": 5.0})
    aid = claimed.attempt.attempt_id
    store.add_span(Span(claimed.rollout_id, aid, 1, "first"))  # preparing -> running
    clock.advance(4.0)
    store.add_span(Span(claimed.rollout_id, aid, 2, "second"))  # a heartbeat only
    store = reopen(store, clock, tmp_path)
    attempt = store.get_latest_attempt(claimed.rollout_id)
    assert attempt is not None and attempt.last_heartbeat_time == clock.now
    clock.advance(4.0)  # 8 s after the first span, 4 s after the second: still responsive
    assert store.get_rollout_by_id(claimed.rollout_id).status == "running"  # type: ignore[union-attr]
    assert store.get_next_span_sequence_id(claimed.rollout_id, aid) == 3
    store.close()


def test_deferred_commits_commit_once_at_the_end(tmp_path: Path) -> None:
    store = InMemoryStore(data_dir=tmp_path)
    journal = store._journal
    assert journal is not None
    with store.deferred_commits():
        for i in range(3):
            store.enqueue_rollout(i)
        assert journal._committed < journal._staged  # staged, not yet on disk
    assert journal._committed == journal._staged  # one commit at the end of the block
    ids = [r.rollout_id for r in store.query_rollouts()]
    store.close()
    reopened = InMemoryStore(data_dir=tmp_path)
    assert [r.rollout_id for r in reopened.query_rollouts()] == ids
    reopened.close()
