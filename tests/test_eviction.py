"""Span memory accounting and eviction (REF §4.2, SPEC D8): threshold resolution, which
rollouts lose their spans and in what order, and what an evicted rollout still does."""

from __future__ import annotations

from typing import Any

import pytest

from mpstore import InMemoryStore, InvalidArgument, Span, SpansEvicted
from mpstore.eviction import resolve_thresholds, span_size
from tests.conftest import FakeClock

#: Every span of these tests has this shape, hence the same estimated size.
SIZE = span_size(Span("ro-x", "at-y", 1, "s"))


def make_span(rid: str, aid: str, seq: int) -> Span:
    return Span(rid, aid, seq, "s")


def store_with(clock: FakeClock, eviction: float, safe: float) -> InMemoryStore:
    """A store whose thresholds are given in spans of SIZE bytes."""
    return InMemoryStore(clock=clock, eviction_threshold=int(eviction * SIZE),
                         safe_threshold=int(safe * SIZE))


def started(store: InMemoryStore) -> tuple[str, str]:
    ar = store.start_rollout("x")
    return ar.rollout_id, ar.attempt.attempt_id


def evicted(store: InMemoryStore, rid: str) -> bool:
    try:
        store.query_spans(rid)
    except SpansEvicted:
        return True
    return False


def check_accounting(store: InMemoryStore, rids: list[str]) -> None:
    """statistics() agrees with what query_spans still returns."""
    kept = [s for rid in rids if not evicted(store, rid) for s in store.query_spans(rid)]
    stats = store.statistics()
    assert stats["total_spans"] == len(kept)
    assert stats["span_bytes"] == sum(span_size(s) for s in kept)
    assert stats["evicted_rollouts"] == sum(evicted(store, rid) for rid in rids)
    assert stats["span_bytes"] <= stats["eviction_threshold_bytes"]


# =========================================================================== thresholds
class TestResolveThresholds:
    def test_bytes(self) -> None:  # REF example
        t = resolve_thresholds(150, 20, capacity=10_000)
        assert (t.eviction, t.safe, t.capacity) == (150, 20, 10_000)

    def test_ratios(self) -> None:  # REF example
        t = resolve_thresholds(0.6, 0.0, capacity=200)
        assert (t.eviction, t.safe) == (120, 0)

    def test_safe_not_below_eviction(self) -> None:  # REF example
        with pytest.raises(InvalidArgument,
                           match="safe_threshold must be smaller than eviction_threshold"):
            resolve_thresholds(50, 100, capacity=10_000)
        with pytest.raises(InvalidArgument, match="must be smaller"):
            resolve_thresholds(50, 50, capacity=10_000)
        with pytest.raises(InvalidArgument, match="must be smaller"):
            resolve_thresholds(None, 0.9, capacity=1000)  # 900 >= the default 700

    def test_defaults(self) -> None:
        t = resolve_thresholds(None, None, capacity=1000)
        assert (t.eviction, t.safe) == (700, 560)  # 0.7 of RAM, safe 0.8 of that
        t = resolve_thresholds(500, None, capacity=1000)
        assert (t.eviction, t.safe) == (500, 400)
        t = resolve_thresholds(1.0, 0.5, capacity=1000)
        assert (t.eviction, t.safe) == (1000, 500)
        t = resolve_thresholds(5000, 1.0, capacity=1000)  # bytes may exceed RAM
        assert (t.eviction, t.safe) == (5000, 1000)

    def test_default_capacity_is_total_ram(self) -> None:
        import psutil

        t = resolve_thresholds(None, None)
        assert t.capacity == psutil.virtual_memory().total
        assert t.eviction == int(t.capacity * 0.7)

    @pytest.mark.parametrize(("eviction", "safe", "message"), [
        (0.0, None, "eviction_threshold ratio must be greater than 0 and at most 1"),
        (1.5, None, "eviction_threshold ratio must be greater than 0 and at most 1"),
        (-0.5, None, "eviction_threshold ratio must be greater than 0 and at most 1"),
        (-1, None, "eviction_threshold must be non-negative"),
        (0, None, "eviction_threshold must be at least 1 bytes"),
        (0.001, None, "eviction_threshold must be at least 1 bytes"),  # 0.2 bytes of 200
        (100, 1.5, "safe_threshold ratio must be between 0 and 1 inclusive"),
        (100, -0.1, "safe_threshold ratio must be between 0 and 1 inclusive"),
        (100, -1, "safe_threshold must be non-negative"),
        ("100", None, "eviction_threshold"),
        (100, True, "safe_threshold"),
    ])
    def test_invalid(self, eviction: Any, safe: Any, message: str) -> None:
        with pytest.raises(InvalidArgument, match=message) as info:
            resolve_thresholds(eviction, safe, capacity=200)
        assert isinstance(info.value, ValueError)

    def test_capacity_must_be_positive(self) -> None:
        with pytest.raises(ValueError):
            resolve_thresholds(None, None, capacity=0)

    def test_store_uses_them(self) -> None:
        store = InMemoryStore(eviction_threshold=150, safe_threshold=20)
        stats = store.statistics()
        assert (stats["eviction_threshold_bytes"], stats["safe_threshold_bytes"]) == (150, 20)
        store = InMemoryStore(eviction_threshold=0.5)
        stats = store.statistics()
        assert stats["eviction_threshold_bytes"] == int(stats["memory_capacity_bytes"] * 0.5)
        assert stats["safe_threshold_bytes"] == int(stats["eviction_threshold_bytes"] * 0.8)
        with pytest.raises(InvalidArgument):
            InMemoryStore(eviction_threshold=50, safe_threshold=100)


# =========================================================================== sizes
def test_span_size_grows_with_payload() -> None:
    small = span_size(Span("r", "a", 1, "s"))
    big = span_size(Span("r", "a", 1, "s", attributes={"prompt": "x" * 10_000}))
    assert small > 0
    assert big >= small + 10_000
    listed = span_size(Span("r", "a", 1, "s", attributes={"tags": ["a"] * 10}))
    assert listed > small


BIG = "x" * 100_000


@pytest.mark.parametrize("shape", [
    {"attributes": {"prompt": BIG}},
    {"attributes": {"raw": BIG.encode()}},
    {"attributes": {"messages": [{"role": "user", "content": BIG}]}},  # chat messages
    {"attributes": {"nested": {"deeper": {"content": BIG}}}},
    {"attributes": {"chunks": ["y" * 1000] * 100}},  # long lists count past their head
    {"attributes": {"table": {f"k{i}": "y" * 1000 for i in range(100)}}},
    {"events": [{"name": "exception", "attributes": {"exception.stacktrace": BIG}}]},
    {"links": [{"context": {}, "attributes": {"note": BIG}}]},
])
def test_span_size_counts_nested_payload(shape: dict[str, Any]) -> None:
    # Eviction thresholds only mean something if large payloads count wherever they sit.
    assert span_size(Span("r", "a", 1, "s", **shape)) >= 100_000


def test_span_size_of_deep_nesting_is_bounded() -> None:
    deep: Any = "leaf"
    for _ in range(5000):
        deep = [deep]
    assert 0 < span_size(Span("r", "a", 1, "s", attributes={"deep": deep})) < 100_000


# =========================================================================== eviction
class TestEviction:
    def test_ref_worked_example(self, clock: FakeClock) -> None:
        # REF §4.2: evict above 2.5 spans, down to a quarter; one span per rollout.
        store = store_with(clock, 2.5, 0.25)
        rollouts = [started(store) for _ in range(4)]
        rids = [rid for rid, _ in rollouts]
        for i, (rid, aid) in enumerate(rollouts[:2]):
            store.add_span(make_span(rid, aid, 1))
            check_accounting(store, rids)
            assert not evicted(store, rid), i
        store.add_span(make_span(*rollouts[2], 1))  # 3 spans > 2.5: all three go
        assert [evicted(store, rid) for rid in rids] == [True, True, True, False]
        store.add_span(make_span(*rollouts[3], 1))
        assert [len(store.query_spans(rids[3]))] == [1]
        check_accounting(store, rids)
        assert store.statistics()["span_bytes"] == SIZE

    def test_finished_first_oldest_first(self, clock: FakeClock) -> None:  # D8
        store = store_with(clock, 4.5, 3.5)
        a, b, c, d = (started(store) for _ in range(4))
        for rid, aid in (a, b, c, d):
            store.add_span(make_span(rid, aid, 1))
        store.update_attempt(b[0], "latest", status="succeeded")
        store.update_rollout(c[0], status="cancelled")
        rids = [a[0], b[0], c[0], d[0]]
        check_accounting(store, rids)
        store.add_span(make_span(*d, 2))  # 5 spans > 4.5: back to <= 3.5
        # Finished rollouts go first, oldest first; the older unfinished one stays.
        assert [evicted(store, rid) for rid in rids] == [False, True, True, False]
        assert len(store.query_spans(a[0])) == 1 and len(store.query_spans(d[0])) == 2
        check_accounting(store, rids)

    def test_oldest_finished_only_when_enough(self, clock: FakeClock) -> None:
        store = store_with(clock, 4.5, 4.0)
        old_done, young_done, running = started(store), started(store), started(store)
        store.add_span(make_span(*old_done, 1))
        store.add_span(make_span(*young_done, 1))
        store.update_attempt(old_done[0], "latest", status="failed")
        store.update_attempt(young_done[0], "latest", status="succeeded")
        for seq in range(1, 4):
            store.add_span(make_span(*running, seq))  # 5 spans > 4.5: drop one rollout
        rids = [old_done[0], young_done[0], running[0]]
        assert [evicted(store, rid) for rid in rids] == [True, False, False]
        check_accounting(store, rids)

    def test_unfinished_only_if_needed(self, clock: FakeClock) -> None:
        store = store_with(clock, 3.5, 1.5)
        old_running, done, young_running = started(store), started(store), started(store)
        store.add_span(make_span(*old_running, 1))
        store.add_span(make_span(*old_running, 2))
        store.add_span(make_span(*done, 1))
        store.update_attempt(done[0], "latest", status="succeeded")
        store.add_span(make_span(*young_running, 1))  # 4 > 3.5: done (3), then old (1)
        rids = [old_running[0], done[0], young_running[0]]
        assert [evicted(store, rid) for rid in rids] == [True, True, False]
        check_accounting(store, rids)

    def test_evicted_for_ever(self, clock: FakeClock) -> None:  # D8, REF Q8
        store = store_with(clock, 1.5, 0.0)
        rid, aid = started(store)
        store.add_span(make_span(rid, aid, 1))
        store.add_span(make_span(rid, aid, 2))  # 2 > 1.5: evicted (the one just stored too)
        for attempt_id in (None, "latest", aid, "at-other"):
            with pytest.raises(SpansEvicted, match=f"^Spans for rollout {rid} have been evicted$"):
                store.query_spans(rid, attempt_id)
        with pytest.raises(RuntimeError):
            store.query_spans(rid)
        before = store.statistics()
        # Later spans count as heartbeats but are not kept.
        clock.advance(7)
        store.add_span(make_span(rid, aid, 40))
        store.add_many_spans([make_span(rid, aid, 41)])
        attempt = store.get_latest_attempt(rid)
        assert attempt.last_heartbeat_time == clock.now
        assert attempt.status == "running"
        with pytest.raises(SpansEvicted):
            store.query_spans(rid)
        after = store.statistics()
        assert (after["total_spans"], after["span_bytes"]) == (0, 0)
        assert (after["total_spans"], after["span_bytes"]) == (
            before["total_spans"], before["span_bytes"]
        )
        assert after["evicted_rollouts"] == 1
        # The counter still follows them, and the records are all there.
        assert store.get_next_span_sequence_id(rid, aid) == 42
        assert len(store.query_attempts(rid)) == 1

    def test_later_span_still_revives(self, clock: FakeClock) -> None:
        store = store_with(clock, 1.5, 0.0)
        config = {"unresponsive_seconds": 5, "max_attempts": 2,
                  "retry_condition": ["unresponsive"]}
        store.enqueue_rollout("x", config=config)
        ar = store.dequeue_rollout()
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        store.add_span(make_span(rid, aid, 1))
        store.add_span(make_span(rid, aid, 2))
        assert evicted(store, rid)
        clock.advance(6)
        assert store.get_rollout_by_id(rid).status == "requeuing"
        store.add_span(make_span(rid, aid, 3))  # not kept, but a heartbeat: D4 revival
        assert store.get_latest_attempt(rid).status == "running"
        assert store.get_rollout_by_id(rid).status == "running"
        assert store.dequeue_rollout() is None

    def test_other_rollouts_unaffected(self, clock: FakeClock) -> None:
        store = store_with(clock, 2.5, 1.0)
        first, second = started(store), started(store)
        for seq in (1, 2, 3):
            store.add_span(make_span(*first, seq))  # 3 > 2.5: first goes
        assert evicted(store, first[0])
        store.add_span(make_span(*second, 1))
        store.add_span(make_span(*second, 2))
        assert [s.sequence_id for s in store.query_spans(second[0])] == [1, 2]
        assert store.query_spans("ro-unknown") == []
        check_accounting(store, [first[0], second[0]])

    def test_no_eviction_below_threshold(self, clock: FakeClock) -> None:
        store = store_with(clock, 10.5, 5.0)
        rollouts = [started(store) for _ in range(10)]
        for rid, aid in rollouts:
            store.add_span(make_span(rid, aid, 1))
        rids = [rid for rid, _ in rollouts]
        assert not any(evicted(store, rid) for rid in rids)
        stats = store.statistics()
        assert (stats["total_spans"], stats["span_bytes"]) == (10, 10 * SIZE)
        check_accounting(store, rids)
