"""Thread safety of one InMemoryStore under many threads, and event-driven wake-ups (D5, D13).

No sleeps: threads synchronise with Barrier/Event, every loop is bounded, every join has a
timeout. The wake-up tests use a clock that signals when the waiting thread has read it: the
store reads its clock under the lock just before it waits, so a writer that then takes the lock
necessarily writes while the waiter is waiting (or about to, with the lock released in wait()).
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from mpstore import InMemoryStore, Span
from tests.conftest import FakeClock

PRODUCERS = 6
CONSUMERS = 8
READERS = 3
ROLLOUTS_PER_PRODUCER = 40
SPANS_PER_ROLLOUT = 6
JOIN = 60.0


def start(target: Callable[[], Any], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def test_hammer() -> None:
    store = InMemoryStore()
    total = PRODUCERS * ROLLOUTS_PER_PRODUCER
    threads_count = PRODUCERS + CONSUMERS + READERS + 1
    assert threads_count >= 16
    barrier = threading.Barrier(threads_count)
    enqueued: list[list[str]] = [[] for _ in range(PRODUCERS)]
    claimed: list[list[tuple[str, str, int]]] = [[] for _ in range(CONSUMERS)]
    sequences: dict[str, list[int]] = collections.defaultdict(list)
    seq_lock = threading.Lock()
    produced_all = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []
    waited: list[Any] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
                done.set()
        return run

    def producer(index: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(index)
            barrier.wait(JOIN)
            made = 0
            while made < ROLLOUTS_PER_PRODUCER:
                if rng.random() < 0.3 and made + 3 <= ROLLOUTS_PER_PRODUCER:
                    batch = store.enqueue_many_rollouts(
                        [{"input": (index, made + i)} for i in range(3)]
                    )
                    enqueued[index].extend(r.rollout_id for r in batch)
                    made += 3
                else:
                    r = store.enqueue_rollout((index, made), metadata={"producer": index})
                    enqueued[index].append(r.rollout_id)
                    made += 1
        return run

    def consumer(index: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(100 + index)
            barrier.wait(JOIN)
            for _ in range(total * 4):  # bounded; exits much earlier
                if done.is_set():
                    return
                if rng.random() < 0.2:
                    got_many = store.dequeue_many_rollouts(2, worker_id=f"c{index}")
                else:
                    one = store.dequeue_rollout(worker_id=f"c{index}", wait=0.01)
                    got_many = [one] if one is not None else []
                if not got_many:
                    if produced_all.is_set() and store.statistics()["queue_length"] == 0:
                        return
                    continue
                for got in got_many:
                    rid, aid = got.rollout_id, got.attempt.attempt_id
                    claimed[index].append((rid, aid, got.attempt.sequence_id))
                    local = []
                    for n in range(SPANS_PER_ROLLOUT - 2):
                        seq = store.get_next_span_sequence_id(rid, aid)
                        local.append(seq)
                        store.add_span(Span(rid, aid, seq, f"span-{n}"))
                    pair = store.get_many_span_sequence_ids([(rid, aid), (rid, aid)])
                    local.extend(pair)
                    store.add_many_spans([Span(rid, aid, s, "batch") for s in pair])
                    with seq_lock:
                        sequences[rid].extend(local)
                    store.update_attempt(rid, aid, metadata={"worker": index})
                    store.update_attempt(rid, "latest", status="succeeded")
        return run

    def reader() -> None:
        barrier.wait(JOIN)
        for _ in range(10_000):
            if done.is_set():
                return
            stats = store.statistics()
            assert stats["total_spans"] <= total * SPANS_PER_ROLLOUT
            rollouts = store.query_rollouts(status=["succeeded"])
            assert all(r.status == "succeeded" for r in rollouts)
            for r in rollouts[-3:]:
                assert len(store.query_spans(r.rollout_id)) == SPANS_PER_ROLLOUT
            store.query_rollouts(status=["queuing", "requeuing"])

    def waiter() -> None:
        barrier.wait(JOIN)
        produced_all.wait(JOIN)
        ids = [rid for ids in enqueued for rid in ids]
        waited.extend(store.wait_for_rollouts(rollout_ids=ids, timeout=JOIN))

    threads = [start(guarded(producer(i)), f"producer-{i}") for i in range(PRODUCERS)]
    threads += [start(guarded(consumer(i)), f"consumer-{i}") for i in range(CONSUMERS)]
    readers = [start(guarded(reader), f"reader-{i}") for i in range(READERS)]
    waiter_thread = start(guarded(waiter), "waiter")
    for thread in threads[:PRODUCERS]:
        thread.join(JOIN)
    produced_all.set()
    for thread in threads[PRODUCERS:]:
        thread.join(JOIN)
    waiter_thread.join(JOIN)
    done.set()
    for thread in readers:
        thread.join(JOIN)
    assert not errors, errors
    assert not any(t.is_alive() for t in [*threads, *readers, waiter_thread])

    all_enqueued = [rid for ids in enqueued for rid in ids]
    all_claimed = [c for per in claimed for c in per]
    assert len(all_enqueued) == total == len(set(all_enqueued))
    # Every rollout dequeued exactly once, each with its one attempt.
    counts = collections.Counter(rid for rid, _, _ in all_claimed)
    assert set(counts) == set(all_enqueued)
    assert set(counts.values()) == {1}
    assert {seq for _, _, seq in all_claimed} == {1}
    # Each producer's rollouts were claimed in the order it enqueued them (FIFO), as far as
    # one consumer saw them.
    position = {rid: i for i, rid in enumerate(all_enqueued)}
    for per in claimed:
        for ids in enqueued:
            mine = [rid for rid, _, _ in per if rid in set(ids)]
            assert mine == sorted(mine, key=position.__getitem__)

    # Every span accounted for, in the store and in the statistics.
    for rid, aid, _ in all_claimed:
        spans = store.query_spans(rid)
        assert len(spans) == SPANS_PER_ROLLOUT
        assert {s.attempt_id for s in spans} == {aid}
        assert sorted(s.sequence_id for s in spans) == sorted(sequences[rid])
        assert sorted(sequences[rid]) == list(range(1, SPANS_PER_ROLLOUT + 1))
        attempts = store.query_attempts(rid)
        assert len(attempts) == 1
        assert attempts[0].status == "succeeded" and attempts[0].end_time is not None
        assert attempts[0].metadata is not None and "worker" in attempts[0].metadata
    stats = store.statistics()
    assert stats["total_rollouts"] == total
    assert stats["total_attempts"] == total
    assert stats["total_spans"] == total * SPANS_PER_ROLLOUT
    assert stats["queue_length"] == 0
    assert stats["rollouts_by_status"]["succeeded"] == total
    assert sum(stats["rollouts_by_status"].values()) == total
    assert {r.status for r in store.query_rollouts()} == {"succeeded"}
    assert store.dequeue_rollout() is None
    # The waiter saw them all finish, in input order.
    assert [r.rollout_id for r in waited] == all_enqueued


def test_concurrent_sequence_ids_are_unique() -> None:
    store = InMemoryStore()
    ar = store.start_rollout("x")
    rid, aid = ar.rollout_id, ar.attempt.attempt_id
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    got: list[list[int]] = [[] for _ in range(threads_count)]

    def run(index: int) -> None:
        barrier.wait(JOIN)
        for i in range(50):
            if i % 2:
                got[index].append(store.get_next_span_sequence_id(rid, aid))
            else:
                got[index].extend(store.get_many_span_sequence_ids([(rid, aid)] * 2))

    threads = [start(lambda i=i: run(i), f"seq-{i}") for i in range(threads_count)]
    for thread in threads:
        thread.join(JOIN)
    values = [v for per in got for v in per]
    assert sorted(values) == list(range(1, len(values) + 1))
    assert all(per == sorted(per) for per in got)


def test_concurrent_resource_updates() -> None:  # REF §3.6: 50 concurrent updates all stored
    store = InMemoryStore()
    barrier = threading.Barrier(50)

    def run(i: int) -> None:
        barrier.wait(JOIN)
        store.update_resources(f"v{i}", {})

    threads = [start(lambda i=i: run(i), f"res-{i}") for i in range(50)]
    for thread in threads:
        thread.join(JOIN)
    assert all(store.get_resources_by_id(f"v{i}") is not None for i in range(50))
    assert store.get_latest_resources().resources_id in {f"v{i}" for i in range(50)}
    assert store.statistics()["total_resources"] == 50


def test_concurrent_duplicate_spans_stored_once() -> None:  # D7 under contention
    store = InMemoryStore()
    ar = store.start_rollout("x")
    span = Span(ar.rollout_id, ar.attempt.attempt_id, 1, "retried")
    barrier = threading.Barrier(16)
    results: list[Span] = []

    def run() -> None:
        barrier.wait(JOIN)
        results.append(store.add_span(span))

    threads = [start(run, f"dup-{i}") for i in range(16)]
    for thread in threads:
        thread.join(JOIN)
    assert len(results) == 16 and all(r == span for r in results)
    assert store.query_spans(ar.rollout_id) == [span]
    assert store.statistics()["total_spans"] == 1


# =========================================================================== wake-ups
class SignallingClock(FakeClock):
    """Sets ``read`` when a thread named ``waiter`` reads the clock."""

    def __init__(self) -> None:
        super().__init__()
        self.read = threading.Event()

    def __call__(self) -> float:
        if threading.current_thread().name == "waiter":
            self.read.set()
        return super().__call__()


def store_for_wakeups() -> tuple[InMemoryStore, SignallingClock]:
    clock = SignallingClock()
    # Ticks far apart: only the event under test can wake the waiter in time.
    return InMemoryStore(clock=clock, watchdog_interval=60.0), clock


def in_waiter(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), name="waiter", daemon=True)
    thread.start()
    return thread, out


def finish_waiter(thread: threading.Thread, started: float) -> float:
    thread.join(10)
    assert not thread.is_alive(), "the waiter was not woken"
    return time.monotonic() - started


@pytest.mark.parametrize("how", ["attempt succeeded", "rollout cancelled", "retries exhausted"])
def test_wait_for_rollouts_wakes_on_completion(how: str) -> None:
    store, clock = store_for_wakeups()
    config = {"max_attempts": 1, "retry_condition": ["failed"]}
    rids = [store.start_rollout(i, config=config).rollout_id for i in range(2)]
    store.update_attempt(rids[0], "latest", status="succeeded")
    started = time.monotonic()
    thread, out = in_waiter(lambda: store.wait_for_rollouts(rollout_ids=rids, timeout=30))
    assert clock.read.wait(10)
    if how == "attempt succeeded":
        store.update_attempt(rids[1], "latest", status="succeeded")
    elif how == "rollout cancelled":
        store.update_rollout(rids[1], status="cancelled")
    else:
        store.update_attempt(rids[1], "latest", status="failed")
    assert finish_waiter(thread, started) < 5  # far below the 30 s timeout
    assert [r.rollout_id for r in out[0]] == rids


def test_wait_not_woken_by_unrelated_rollout() -> None:
    store, clock = store_for_wakeups()
    mine = store.start_rollout("mine").rollout_id
    other = store.start_rollout("other").rollout_id
    thread, out = in_waiter(lambda: store.wait_for_rollouts(rollout_ids=[mine], timeout=30))
    assert clock.read.wait(10)
    clock.read.clear()
    store.update_rollout(other, status="succeeded")  # reads the clock itself: clear after
    clock.read.clear()
    # A finished rollout wakes only its own waiters: this one does not even re-check (a
    # woken waiter would read the clock at once). A negative needs a window; 0.3 s is many
    # times what a wake-up takes.
    assert not clock.read.wait(0.3)
    assert thread.is_alive()
    started = time.monotonic()
    store.update_rollout(mine, status="failed")
    assert finish_waiter(thread, started) < 5
    assert [r.rollout_id for r in out[0]] == [mine]


def test_wait_woken_by_run_watchdog_from_a_ticker() -> None:
    store, clock = store_for_wakeups()
    rid = store.start_rollout("x", config={"timeout_seconds": 10}).rollout_id
    started = time.monotonic()
    thread, out = in_waiter(lambda: store.wait_for_rollouts(rollout_ids=[rid], timeout=30))
    assert clock.read.wait(10)
    clock.advance(11)
    assert store.run_watchdog() == 1  # what the server's ticker does
    assert finish_waiter(thread, started) < 5
    assert [(r.rollout_id, r.status) for r in out[0]] == [(rid, "failed")]


@pytest.mark.parametrize("how", ["enqueue", "enqueue_many", "requeue", "update_rollout"])
def test_dequeue_long_poll_wakes_on_enqueue(how: str) -> None:
    store, clock = store_for_wakeups()
    retry = {"max_attempts": 2, "retry_condition": ["failed"]}
    running = store.start_rollout("r", config=retry).rollout_id
    started = time.monotonic()
    thread, out = in_waiter(lambda: store.dequeue_rollout("w", wait=30))
    assert clock.read.wait(10)
    if how == "enqueue":
        expected = store.enqueue_rollout("new").rollout_id
    elif how == "enqueue_many":
        expected = store.enqueue_many_rollouts([{"input": 1}, {"input": 2}])[0].rollout_id
    elif how == "requeue":
        store.update_attempt(running, "latest", status="failed")
        expected = running
    else:
        store.update_rollout(running, status="queuing")
        expected = running
    assert finish_waiter(thread, started) < 5
    got = out[0]
    assert got is not None and got.rollout_id == expected and got.attempt.worker_id == "w"


def test_every_long_poller_gets_one() -> None:
    store = InMemoryStore(watchdog_interval=60.0)
    pollers = 6
    ready = threading.Barrier(pollers + 1)
    out: list[Any] = []
    lock = threading.Lock()

    def poll() -> None:
        ready.wait(JOIN)
        got = store.dequeue_rollout(wait=20)
        with lock:
            out.append(got)

    threads = [start(poll, f"poller-{i}") for i in range(pollers)]
    ready.wait(JOIN)
    started = time.monotonic()
    ids = [r.rollout_id for r in store.enqueue_many_rollouts([{"input": i}
                                                                for i in range(pollers)])]
    for thread in threads:
        thread.join(JOIN)
    assert time.monotonic() - started < 10
    assert sorted(g.rollout_id for g in out if g is not None) == sorted(ids)
    assert store.dequeue_rollout() is None


def test_dequeue_many_long_poll() -> None:
    store, clock = store_for_wakeups()
    started = time.monotonic()
    thread, out = in_waiter(lambda: store.dequeue_many_rollouts(5, wait=30))
    assert clock.read.wait(10)
    rid = store.enqueue_rollout("x").rollout_id
    assert finish_waiter(thread, started) < 5
    assert [g.rollout_id for g in out[0]] == [rid]
