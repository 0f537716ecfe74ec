"""The feed of finished rollouts, deletion and caller-chosen ids, in process and through a
server (the ``store`` fixture), and across restarts of a durable store."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from mpstore import InMemoryStore, InvalidArgument, RolloutNotFound, Span
from tests.conftest import FakeClock


def finish(store: Any, rollout_id: str, status: str = "succeeded") -> None:
    store.update_attempt(rollout_id, "latest", status=status)


def claim_all(store: Any, n: int) -> list[str]:
    return [c.rollout_id for c in store.dequeue_many_rollouts(n)]


def read_feed(store: Any, after: int = 0, limit: int = 1000) -> tuple[list[str], int]:
    page = store.finished_rollouts(after, limit)
    return [r.rollout_id for r in page.rollouts], page.next_after


# ---------------------------------------------------------------------------- the feed
def test_feed_lists_finishes_in_the_order_they_happened(store: Any) -> None:
    ids = [store.enqueue_rollout(i).rollout_id for i in range(5)]
    claim_all(store, 5)
    order = [ids[3], ids[0], ids[4]]
    for rid in order:
        finish(store, rid)
    page = store.finished_rollouts()
    assert [r.rollout_id for r in page.rollouts] == order
    assert all(r.status == "succeeded" for r in page.rollouts)
    assert page.total == 3
    # Nothing new after the cursor; then the next finishes, and only those.
    assert read_feed(store, page.next_after) == ([], page.next_after)
    finish(store, ids[1], "failed")
    store.update_rollout(ids[2], status="cancelled")
    assert read_feed(store, page.next_after)[0] == [ids[1], ids[2]]


def test_feed_pages_never_miss_or_repeat(store: Any) -> None:
    ids = [store.enqueue_rollout(i).rollout_id for i in range(7)]
    claim_all(store, 7)
    for rid in reversed(ids):
        finish(store, rid)
    seen, cursor = [], 0
    for _ in range(10):  # bounded: 7 rollouts in pages of 3
        page, cursor = read_feed(store, cursor, limit=3)
        if not page:
            break
        assert len(page) <= 3
        seen += page
    assert seen == list(reversed(ids))


def test_a_rollout_finished_again_appears_again_later(store: Any) -> None:
    first, second = (store.enqueue_rollout(i).rollout_id for i in range(2))
    claim_all(store, 2)
    finish(store, first)
    finish(store, second)
    _, cursor = read_feed(store)
    store.update_rollout(first, status="queuing")  # reopened: not finished now
    assert read_feed(store) == ([second], cursor)  # skipped while it is not finished
    claim_all(store, 1)
    finish(store, first)
    again, _ = read_feed(store, cursor)
    assert again == [first]
    assert read_feed(store)[0] == [second, first]  # once each, at its latest finish


def test_feed_waits_for_a_finish(store: Any) -> None:
    rid = store.enqueue_rollout("x").rollout_id
    claim_all(store, 1)
    assert store.finished_rollouts(0, wait=0.05).rollouts == []  # the time is up: empty
    finisher = threading.Timer(0.2, finish, (store, rid))
    finisher.start()
    try:
        page = store.finished_rollouts(0, wait=30.0)  # returns on the finish, not at 30 s
    finally:
        finisher.join()
    assert [r.rollout_id for r in page.rollouts] == [rid]


@pytest.mark.parametrize("args", [(-1, 10), (0, -1), ("0", 10), (0, True), (0.5, 10)])
def test_feed_refuses_bad_cursors_and_limits(store: Any, args: tuple[Any, Any]) -> None:
    with pytest.raises(InvalidArgument):
        store.finished_rollouts(*args)


def test_feed_and_cursor_survive_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    store = InMemoryStore(clock=clock, data_dir=tmp_path)
    ids = [store.enqueue_rollout(i).rollout_id for i in range(4)]
    store.dequeue_many_rollouts(4)
    for rid in (ids[2], ids[0], ids[3]):
        finish(store, rid)
    before, cursor = read_feed(store, 0, limit=2)
    store.close()
    store = InMemoryStore(clock=clock, data_dir=tmp_path)
    assert read_feed(store, 0, limit=2) == (before, cursor)
    finish(store, ids[1])
    assert read_feed(store, cursor)[0] == [ids[3], ids[1]]
    store.close()


def test_feed_cost_does_not_depend_on_what_is_stored() -> None:
    """A page walks its own entries only: with 20,000 rollouts finished before the cursor,
    reading after it touches the entries after it (counted by the state's own log)."""
    store = InMemoryStore()
    store.enqueue_many_rollouts([{"input": i} for i in range(20_000)])
    for c in store.dequeue_many_rollouts(20_000):
        finish(store, c.rollout_id)
    _, cursor = read_feed(store, 0, limit=20_000)
    new = store.start_rollout("late").rollout_id
    finish(store, new)
    looked_at: list[str] = []
    log = store._state.finishes
    page = log.page(cursor, 10, lambda rid: looked_at.append(rid) or True)
    assert page[0] == [new] and looked_at == [new]


# ---------------------------------------------------------------------------- deletion
def test_delete_forgets_everything_and_is_idempotent(store: Any) -> None:
    keep = store.enqueue_rollout("keep").rollout_id
    gone = store.start_rollout("gone")
    rid, aid = gone.rollout_id, gone.attempt.attempt_id
    store.add_span(Span(rid, aid, 1, "s"))
    finish(store, rid)
    assert store.delete_rollouts([rid, "ro-unknown"]) == 1
    assert store.delete_rollouts([rid]) == 0
    assert store.get_rollout_by_id(rid) is None
    assert store.query_attempts(rid) == [] and store.query_spans(rid) == []
    assert [r.rollout_id for r in store.query_rollouts()] == [keep]
    assert store.finished_rollouts().rollouts == []
    stats = store.statistics()
    assert (stats["total_rollouts"], stats["total_attempts"], stats["total_spans"]) == (1, 0, 0)
    assert stats["span_bytes"] == 0 and stats["queue_length"] == 1


def test_a_deleted_running_rollout_refuses_what_its_runner_sends(store: Any) -> None:
    claimed = store.start_rollout("running")
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    store.delete_rollouts([rid])
    with pytest.raises(RolloutNotFound):
        store.add_span(Span(rid, aid, 1, "late"))
    with pytest.raises(RolloutNotFound):
        store.update_attempt(rid, aid, status="succeeded")
    assert store.get_next_span_sequence_id(rid, aid) == 1  # its counter went with it


def test_delete_wakes_waiters_of_the_deleted(store: Any) -> None:
    rid = store.enqueue_rollout("x").rollout_id
    deleter = threading.Timer(0.2, store.delete_rollouts, ([rid],))
    deleter.start()
    try:
        assert store.wait_for_rollouts(rollout_ids=[rid], timeout=30.0) == []
    finally:
        deleter.join()


def test_delete_refuses_a_bad_list(store: Any) -> None:
    rid = store.enqueue_rollout("x").rollout_id
    for bad in ("ro-x", [rid, 3], None):
        with pytest.raises(InvalidArgument):
            store.delete_rollouts(bad)
    assert store.get_rollout_by_id(rid) is not None


def test_delete_is_durable(tmp_path: Path) -> None:
    store = InMemoryStore(data_dir=tmp_path)
    gone = store.start_rollout("gone")
    store.add_span(Span(gone.rollout_id, gone.attempt.attempt_id, 1, "s"))
    kept = store.enqueue_rollout("kept").rollout_id
    store.delete_rollouts([gone.rollout_id])
    store.close()
    store = InMemoryStore(data_dir=tmp_path)
    assert [r.rollout_id for r in store.query_rollouts()] == [kept]
    assert store.statistics()["total_spans"] == 0
    store.close()


# ---------------------------------------------------------------------------- chosen ids
def test_a_chosen_id_creates_once(store: Any) -> None:
    first = store.enqueue_rollout({"q": 1}, rollout_id="task-1")
    again = store.enqueue_rollout({"q": "other"}, rollout_id="task-1", metadata={"x": 1})
    assert first.rollout_id == again.rollout_id == "task-1"
    assert again.input == {"q": 1} and again.metadata == {}  # returned unchanged
    assert store.statistics()["total_rollouts"] == 1
    assert store.dequeue_rollout().rollout_id == "task-1"


def test_start_rollout_with_a_chosen_id(store: Any) -> None:
    started = store.start_rollout("a", rollout_id="run-7", worker_id="w")
    again = store.start_rollout("b", rollout_id="run-7")
    assert again.rollout_id == "run-7" and again.attempt.attempt_id == started.attempt.attempt_id
    assert again.input == "a" and len(store.query_attempts("run-7")) == 1
    store.enqueue_rollout("queued", rollout_id="queued-1")
    with pytest.raises(InvalidArgument, match="never started"):
        store.start_rollout("c", rollout_id="queued-1")


def test_chosen_ids_in_a_batch_are_all_or_nothing(store: Any) -> None:
    store.enqueue_rollout("old", rollout_id="old")
    with pytest.raises(InvalidArgument):
        store.enqueue_many_rollouts([{"input": 1, "rollout_id": "new-1"},
                                     {"input": 2, "rollout_id": "has space"}])
    assert store.get_rollout_by_id("new-1") is None
    made = store.enqueue_many_rollouts([{"input": 1, "rollout_id": "new-1"},
                                        {"input": 2, "rollout_id": "old"},
                                        {"input": 3, "rollout_id": "new-1"}])
    assert [r.rollout_id for r in made] == ["new-1", "old", "new-1"]
    assert [r.input for r in made] == [1, "old", 1]
    assert store.statistics()["total_rollouts"] == 2


@pytest.mark.parametrize("bad", ["", "a b", "tab\there", "x" * 257, 12, b"bytes"])
def test_bad_chosen_ids_are_refused(store: Any, bad: Any) -> None:
    with pytest.raises(InvalidArgument):
        store.enqueue_rollout("x", rollout_id=bad)
    assert store.statistics()["total_rollouts"] == 0
