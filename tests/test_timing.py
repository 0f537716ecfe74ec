"""Time-driven behaviour with an injected clock: timeouts, unresponsiveness, revival, retries,
requeue order, where the watchdog runs (REF §2.4, §3.0; SPEC D4, D12).

Time never passes on its own here: ``clock.advance()`` moves it. The only real waiting is in
the last tests, where a waiter must notice a timeout while nobody calls the store; those are
bounded by joins and synchronised with events, never by sleeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from mpstore import InMemoryStore, InvalidArgument, RolloutStatus, Span
from tests.conftest import FakeClock


def cfg(timeout: float | None = None, unresponsive: float | None = None, max_attempts: int = 1,
        retry: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"timeout_seconds": timeout, "unresponsive_seconds": unresponsive,
            "max_attempts": max_attempts, "retry_condition": list(retry)}


def raw_status(store: InMemoryStore, rid: str) -> tuple[str, str | None]:
    """Rollout and latest attempt status read from the state directly: no watchdog pass."""
    state = store._state
    attempts = state.attempts[rid]
    return state.rollouts[rid].status, (attempts[-1].status if attempts else None)


def drain(store: InMemoryStore) -> list[str]:
    out = []
    while (got := store.dequeue_rollout()) is not None:
        out.append(got.rollout_id)
    return out


def statuses(store: InMemoryStore, rid: str) -> tuple[str, str | None]:
    """Rollout and latest attempt status through the API (a watchdog pass first)."""
    rollout = store.get_rollout_by_id(rid)
    latest = store.get_latest_attempt(rid)
    assert rollout is not None
    return rollout.status, (latest.status if latest else None)


# =========================================================================== timeout
class TestTimeout:
    def test_strict_boundary_and_effects(self, memory_store: InMemoryStore,
                                         clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x", config=cfg(timeout=10)).rollout_id
        clock.advance(10)
        assert statuses(memory_store, rid) == ("preparing", "preparing")  # not > 10 yet
        clock.advance(0.001)
        assert statuses(memory_store, rid) == ("failed", "timeout")
        rollout = memory_store.get_rollout_by_id(rid)
        attempt = memory_store.get_latest_attempt(rid)
        assert rollout.end_time == clock.now
        assert attempt.end_time is None  # REF: no end_time for timeout

    def test_measured_from_the_attempt_start(self, memory_store: InMemoryStore,
                                             clock: FakeClock) -> None:
        rid = memory_store.enqueue_rollout("x", config=cfg(timeout=10)).rollout_id
        clock.advance(50)  # queued time does not count
        assert statuses(memory_store, rid) == ("queuing", None)
        memory_store.dequeue_rollout()
        clock.advance(9)
        assert statuses(memory_store, rid) == ("preparing", "preparing")
        clock.advance(1.5)
        assert statuses(memory_store, rid) == ("failed", "timeout")

    def test_spans_do_not_extend_it(self, memory_store: InMemoryStore,
                                    clock: FakeClock) -> None:
        ar = memory_store.start_rollout("x", config=cfg(timeout=10, unresponsive=5))
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        for seq in range(1, 4):
            clock.advance(3)
            memory_store.add_span(Span(rid, aid, seq, "s"))
            assert statuses(memory_store, rid) == ("running", "running")
        clock.advance(1.01)  # 10.01 s after the start, 1.01 s after the last span
        assert statuses(memory_store, rid) == ("failed", "timeout")  # timeout beats silence

    def test_start_attempt_restarts_the_clock(self, memory_store: InMemoryStore,
                                              clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x", config=cfg(timeout=10)).rollout_id
        clock.advance(8)
        memory_store.start_attempt(rid)
        clock.advance(3)
        assert statuses(memory_store, rid) == ("preparing", "preparing")
        first = memory_store.query_attempts(rid)[0]
        assert first.status == "preparing"  # a non-latest attempt is never checked
        clock.advance(7.01)
        assert statuses(memory_store, rid) == ("failed", "timeout")

    def test_config_change_applies_both_ways(self, memory_store: InMemoryStore,
                                             clock: FakeClock) -> None:
        shorter = memory_store.start_rollout("a", config=cfg(timeout=100)).rollout_id
        longer = memory_store.start_rollout("b", config=cfg(timeout=10)).rollout_id
        clock.advance(5)
        memory_store.update_rollout(shorter, config=cfg(timeout=10))
        memory_store.update_rollout(longer, config=cfg(timeout=100))
        clock.advance(5.5)
        assert statuses(memory_store, shorter) == ("failed", "timeout")
        assert statuses(memory_store, longer) == ("preparing", "preparing")
        clock.advance(89)  # 99.5 s
        assert statuses(memory_store, longer) == ("preparing", "preparing")
        clock.advance(1)
        assert statuses(memory_store, longer) == ("failed", "timeout")

    def test_limits_removed(self, memory_store: InMemoryStore, clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x", config=cfg(timeout=10, unresponsive=5)).rollout_id
        memory_store.update_rollout(rid, config=cfg())
        clock.advance(1000)
        assert statuses(memory_store, rid) == ("preparing", "preparing")


# =========================================================================== unresponsive
class TestUnresponsive:
    def test_without_heartbeat_from_start_time(self, memory_store: InMemoryStore,
                                               clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x", config=cfg(unresponsive=5)).rollout_id
        clock.advance(5)
        assert statuses(memory_store, rid) == ("preparing", "preparing")
        clock.advance(0.01)
        assert statuses(memory_store, rid) == ("failed", "unresponsive")
        assert memory_store.get_latest_attempt(rid).end_time is None

    def test_with_span_heartbeat(self, memory_store: InMemoryStore, clock: FakeClock) -> None:
        ar = memory_store.start_rollout("x", config=cfg(unresponsive=5))
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        clock.advance(3)
        memory_store.add_span(Span(rid, aid, 1, "s"))
        assert memory_store.get_latest_attempt(rid).last_heartbeat_time == clock.now
        clock.advance(5)  # 8 s after start, 5 s after the heartbeat
        assert statuses(memory_store, rid) == ("running", "running")
        clock.advance(0.01)
        assert statuses(memory_store, rid) == ("failed", "unresponsive")

    def test_with_explicit_heartbeat(self, memory_store: InMemoryStore,
                                     clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x", config=cfg(unresponsive=5)).rollout_id
        clock.advance(4)
        memory_store.update_attempt(rid, "latest", last_heartbeat_time=clock.now)
        # Rule 3a: a heartbeat promotes a preparing attempt on the next pass.
        assert statuses(memory_store, rid) == ("running", "running")
        clock.advance(4)
        assert statuses(memory_store, rid) == ("running", "running")
        clock.advance(1.01)
        assert statuses(memory_store, rid) == ("failed", "unresponsive")

    def test_heartbeat_in_the_past(self, memory_store: InMemoryStore, clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x", config=cfg(unresponsive=5)).rollout_id
        memory_store.update_attempt(rid, "latest", last_heartbeat_time=clock.now - 60)
        assert statuses(memory_store, rid) == ("failed", "unresponsive")

    def test_zero_heartbeat_counts_as_none(self, memory_store: InMemoryStore,
                                           clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x", config=cfg(unresponsive=5)).rollout_id
        memory_store.update_attempt(rid, "latest", last_heartbeat_time=0.0)
        assert statuses(memory_store, rid) == ("preparing", "preparing")  # not promoted
        clock.advance(5.01)  # measured from start_time, not from 0.0
        assert statuses(memory_store, rid) == ("failed", "unresponsive")


# =========================================================================== revival (D4)
class TestRevival:
    def test_span_revives_unresponsive_latest(self, memory_store: InMemoryStore,
                                              clock: FakeClock) -> None:
        config = cfg(unresponsive=5, max_attempts=3, retry=("unresponsive",))
        memory_store.enqueue_rollout("x", config=config)
        ar = memory_store.dequeue_rollout()
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        clock.advance(6)
        assert statuses(memory_store, rid) == ("requeuing", "unresponsive")
        clock.advance(1)
        memory_store.add_span(Span(rid, aid, 1, "late"))
        assert statuses(memory_store, rid) == ("running", "running")
        assert memory_store.dequeue_rollout() is None  # revived: out of the queue
        # Silence is measured again from the new heartbeat.
        clock.advance(5)
        assert statuses(memory_store, rid) == ("running", "running")
        clock.advance(0.01)
        assert statuses(memory_store, rid) == ("requeuing", "unresponsive")
        again = memory_store.dequeue_rollout()
        assert again is not None and again.attempt.sequence_id == 2

    def test_span_does_not_revive_timed_out_attempt(self, memory_store: InMemoryStore,
                                                    clock: FakeClock) -> None:
        config = cfg(timeout=10, max_attempts=2, retry=("timeout",))
        memory_store.enqueue_rollout("x", config=config)
        ar = memory_store.dequeue_rollout()
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        clock.advance(11)
        assert statuses(memory_store, rid) == ("requeuing", "timeout")
        clock.advance(1)
        memory_store.add_span(Span(rid, aid, 1, "late"))
        attempt = memory_store.get_latest_attempt(rid)
        assert attempt.status == "timeout" and attempt.last_heartbeat_time == clock.now
        assert statuses(memory_store, rid) == ("requeuing", "timeout")
        assert [g.rollout_id for g in memory_store.dequeue_many_rollouts(5)] == [rid]

    def test_stale_attempt_span_after_retry(self, memory_store: InMemoryStore,
                                            clock: FakeClock) -> None:
        config = cfg(unresponsive=5, max_attempts=2, retry=("unresponsive",))
        memory_store.enqueue_rollout("x", config=config)
        first = memory_store.dequeue_rollout()
        clock.advance(6)
        second = memory_store.dequeue_rollout()
        assert second is not None and second.attempt.sequence_id == 2
        memory_store.add_span(Span(first.rollout_id, first.attempt.attempt_id, 1, "stale"))
        old, new = memory_store.query_attempts(first.rollout_id)
        assert (old.status, new.status) == ("running", "preparing")
        assert memory_store.get_rollout_by_id(first.rollout_id).status == "preparing"


# =========================================================================== retries
class TestRetries:
    def test_up_to_max_attempts(self, memory_store: InMemoryStore, clock: FakeClock) -> None:
        rid = memory_store.enqueue_rollout(
            "x", config=cfg(timeout=10, max_attempts=3, retry=("timeout",))
        ).rollout_id
        for expected_seq, expected_status in ((1, "requeuing"), (2, "requeuing"), (3, "failed")):
            got = memory_store.dequeue_rollout()
            assert got is not None and got.attempt.sequence_id == expected_seq
            clock.advance(10.5)
            assert statuses(memory_store, rid) == (expected_status, "timeout")
        assert memory_store.dequeue_rollout() is None
        attempts = memory_store.query_attempts(rid)
        assert [(a.sequence_id, a.status) for a in attempts] == [
            (1, "timeout"), (2, "timeout"), (3, "timeout")
        ]
        assert memory_store.get_rollout_by_id(rid).end_time == clock.now

    def test_only_listed_outcomes_retry(self, memory_store: InMemoryStore,
                                        clock: FakeClock) -> None:
        rid = memory_store.enqueue_rollout(
            "x", config=cfg(timeout=10, max_attempts=3, retry=("failed", "unresponsive"))
        ).rollout_id
        memory_store.dequeue_rollout()
        clock.advance(11)
        assert statuses(memory_store, rid) == ("failed", "timeout")

    def test_mixed_outcomes(self, memory_store: InMemoryStore, clock: FakeClock) -> None:
        config = cfg(timeout=20, unresponsive=5, max_attempts=3,
                     retry=("timeout", "unresponsive", "failed"))
        rid = memory_store.enqueue_rollout("x", config=config).rollout_id
        memory_store.dequeue_rollout()
        clock.advance(6)  # silent: unresponsive
        assert statuses(memory_store, rid) == ("requeuing", "unresponsive")
        second = memory_store.dequeue_rollout()
        for seq in range(1, 6):  # keeps talking but runs too long: timeout
            clock.advance(4.1)
            memory_store.add_span(Span(rid, second.attempt.attempt_id, seq, "s"))
        assert statuses(memory_store, rid) == ("requeuing", "timeout")
        memory_store.dequeue_rollout()
        memory_store.update_attempt(rid, "latest", status="failed")  # 3 < 3 is false
        assert statuses(memory_store, rid) == ("failed", "failed")

    def test_timeout_reapplied_to_a_timed_out_attempt(self, memory_store: InMemoryStore,
                                                      clock: FakeClock) -> None:
        config = cfg(timeout=10, max_attempts=3, retry=("timeout",))
        rid = memory_store.enqueue_rollout("x", config=config).rollout_id
        memory_store.dequeue_rollout()
        clock.advance(11)
        assert statuses(memory_store, rid) == ("requeuing", "timeout")
        other = memory_store.enqueue_rollout("other").rollout_id
        memory_store.update_rollout(rid, status="running")  # by hand, out of the queue
        assert raw_status(memory_store, rid) == ("running", "timeout")
        assert statuses(memory_store, rid) == ("requeuing", "timeout")  # rule 2 again
        assert drain(memory_store) == [other, rid]  # re-entered at the tail


# =========================================================================== requeue order
class TestRequeueOrder:
    def test_same_pass_in_creation_order_behind_the_queue(self, memory_store: InMemoryStore,
                                                          clock: FakeClock) -> None:
        retry = {"max_attempts": 2, "retry_condition": ["timeout"]}
        a = memory_store.start_rollout("a", config={"timeout_seconds": 30, **retry}).rollout_id
        b = memory_store.start_rollout("b", config={"timeout_seconds": 10, **retry}).rollout_id
        c = memory_store.start_rollout("c", config={"timeout_seconds": 20, **retry}).rollout_id
        waiting = memory_store.enqueue_rollout("w").rollout_id
        clock.advance(31)  # all three are due in the same pass, b's deadline first
        assert memory_store.run_watchdog() == 3
        assert drain(memory_store) == [waiting, a, b, c]

    def test_later_timeouts_go_to_the_tail(self, memory_store: InMemoryStore,
                                           clock: FakeClock) -> None:
        retry = {"max_attempts": 2, "retry_condition": ["timeout"]}
        late = memory_store.start_rollout("late", config={"timeout_seconds": 20, **retry})
        early = memory_store.start_rollout("early", config={"timeout_seconds": 10, **retry})
        clock.advance(11)
        memory_store.run_watchdog()
        queued = memory_store.enqueue_rollout("q").rollout_id
        clock.advance(10)
        memory_store.run_watchdog()
        assert drain(memory_store) == [early.rollout_id, queued, late.rollout_id]


# =========================================================================== where it runs
def _other(store: InMemoryStore) -> tuple[str, str]:
    ar = store.start_rollout("other")
    return ar.rollout_id, ar.attempt.attempt_id


#: Each call gets (store, a rollout id and attempt id of a rollout without limits).
CALLS_WITH_WATCHDOG: dict[str, Callable[[InMemoryStore, str, str], Any]] = {
    "start_rollout": lambda s, r, a: s.start_rollout("y"),
    "enqueue_rollout": lambda s, r, a: s.enqueue_rollout("y"),
    "enqueue_many_rollouts": lambda s, r, a: s.enqueue_many_rollouts([{"input": "y"}]),
    "dequeue_rollout": lambda s, r, a: s.dequeue_rollout(),
    "dequeue_many_rollouts": lambda s, r, a: s.dequeue_many_rollouts(2),
    "start_attempt": lambda s, r, a: s.start_attempt(r),
    "query_rollouts": lambda s, r, a: s.query_rollouts(rollout_ids=[r]),
    "get_rollout_by_id": lambda s, r, a: s.get_rollout_by_id(r),
    "query_attempts": lambda s, r, a: s.query_attempts(r),
    "get_latest_attempt": lambda s, r, a: s.get_latest_attempt(r),
    "add_resources": lambda s, r, a: s.add_resources({}),
    "update_resources": lambda s, r, a: s.update_resources("v1", {}),
    "get_resources_by_id": lambda s, r, a: s.get_resources_by_id("v1"),
    "get_latest_resources": lambda s, r, a: s.get_latest_resources(),
    "wait_for_rollouts": lambda s, r, a: s.wait_for_rollouts(rollout_ids=[r], timeout=0),
    "query_spans": lambda s, r, a: s.query_spans(r),
    "update_rollout": lambda s, r, a: s.update_rollout(r, metadata={"m": 1}),
    "update_attempt": lambda s, r, a: s.update_attempt(r, a, metadata={"m": 1}),
    # Not in REF (no statistics there); mpstore counts statuses after the due timeouts.
    "statistics": lambda s, r, a: s.statistics(),
    "run_watchdog": lambda s, r, a: s.run_watchdog(),
}
CALLS_WITHOUT_WATCHDOG: dict[str, Callable[[InMemoryStore, str, str], Any]] = {
    "add_span": lambda s, r, a: s.add_span(Span(r, a, 1, "s")),
    "add_many_spans": lambda s, r, a: s.add_many_spans([Span(r, a, 1, "s")]),
    "get_next_span_sequence_id": lambda s, r, a: s.get_next_span_sequence_id(r, a),
    "get_many_span_sequence_ids": lambda s, r, a: s.get_many_span_sequence_ids([(r, a)]),
    "ping": lambda s, r, a: s.ping(),
}


@pytest.mark.parametrize("name", sorted(CALLS_WITH_WATCHDOG))
def test_watchdog_runs_on_entry(memory_store: InMemoryStore, clock: FakeClock,
                                name: str) -> None:
    due = memory_store.start_rollout("due", config=cfg(timeout=10)).rollout_id
    rid, aid = _other(memory_store)
    clock.advance(11)
    assert raw_status(memory_store, due) == ("preparing", "preparing")
    CALLS_WITH_WATCHDOG[name](memory_store, rid, aid)
    assert raw_status(memory_store, due) == ("failed", "timeout")


@pytest.mark.parametrize("name", sorted(CALLS_WITHOUT_WATCHDOG))
def test_watchdog_does_not_run_in(memory_store: InMemoryStore, clock: FakeClock,
                                  name: str) -> None:  # REF §3.0
    due = memory_store.start_rollout("due", config=cfg(timeout=10)).rollout_id
    rid, aid = _other(memory_store)
    clock.advance(11)
    CALLS_WITHOUT_WATCHDOG[name](memory_store, rid, aid)
    assert raw_status(memory_store, due) == ("preparing", "preparing")
    memory_store.run_watchdog()
    assert raw_status(memory_store, due) == ("failed", "timeout")


def test_span_on_due_rollout_revives_before_the_watchdog_sees_it(
        memory_store: InMemoryStore, clock: FakeClock) -> None:
    ar = memory_store.start_rollout("x", config=cfg(timeout=10, unresponsive=5))
    rid, aid = ar.rollout_id, ar.attempt.attempt_id
    clock.advance(11)
    memory_store.add_span(Span(rid, aid, 1, "s"))  # no watchdog: a plain heartbeat
    assert raw_status(memory_store, rid) == ("running", "running")
    assert statuses(memory_store, rid) == ("failed", "timeout")  # the next read applies it


def test_read_returns_the_state_after_the_pass(memory_store: InMemoryStore,
                                               clock: FakeClock) -> None:
    rid = memory_store.start_rollout("x", config=cfg(timeout=10)).rollout_id
    clock.advance(11)
    # The very call that runs the pass already reports its outcome (one critical section).
    assert memory_store.query_rollouts(status=["failed"])[0].rollout_id == rid
    assert memory_store.statistics()["rollouts_by_status"]["failed"] == 1


class TestRunWatchdog:
    def test_counts_due_rollouts_only(self, memory_store: InMemoryStore,
                                      clock: FakeClock) -> None:
        for i in range(50):  # queued: never visited
            memory_store.enqueue_rollout(i, config=cfg(timeout=1))
        for i in range(20):  # running without limits: never visited
            memory_store.start_rollout(i)
        watched = [memory_store.start_rollout(i, config=cfg(timeout=5)).rollout_id
                   for i in range(3)]
        assert memory_store.run_watchdog() == 0
        clock.advance(6)
        assert memory_store.run_watchdog() == 3
        assert all(raw_status(memory_store, rid) == ("failed", "timeout") for rid in watched)
        clock.advance(100)
        assert memory_store.run_watchdog() == 0  # finished rollouts are not re-armed

    def test_finished_rollouts_leave_the_schedule(self, memory_store: InMemoryStore,
                                                  clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x", config=cfg(timeout=5)).rollout_id
        memory_store.update_attempt(rid, "latest", status="succeeded")
        clock.advance(6)
        memory_store.run_watchdog()
        assert raw_status(memory_store, rid) == ("succeeded", "succeeded")
        assert memory_store.run_watchdog() == 0

    def test_repair_rule(self, memory_store: InMemoryStore, clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x").rollout_id
        memory_store.update_attempt(rid, "latest", status="failed")
        memory_store.update_rollout(rid, status="running")
        assert raw_status(memory_store, rid) == ("running", "failed")
        memory_store.run_watchdog()
        assert raw_status(memory_store, rid) == ("failed", "failed")


# =========================================================================== D12: no-op writes
class TestUnchangedPropagationWritesNothing:
    def test_end_time_not_restamped(self, memory_store: InMemoryStore, clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x").rollout_id
        memory_store.update_attempt(rid, "latest", status="succeeded")
        stamped = clock.now
        assert memory_store.get_rollout_by_id(rid).end_time == stamped
        clock.advance(5)
        attempt = memory_store.update_attempt(rid, "latest", status="succeeded")
        assert attempt.end_time == clock.now  # the attempt's own write is re-stamped (REF)
        assert memory_store.get_rollout_by_id(rid).end_time == stamped  # the rollout: no write
        clock.advance(5)
        # An explicit rollout write is a write: re-stamped (REF E5).
        assert memory_store.update_rollout(rid, status="succeeded").end_time == clock.now

    def test_failed_twice(self, memory_store: InMemoryStore, clock: FakeClock) -> None:
        rid = memory_store.start_rollout("x").rollout_id
        memory_store.update_attempt(rid, "latest", status="failed")
        stamped = clock.now
        clock.advance(1)
        memory_store.update_attempt(rid, "latest", status="timeout")  # P is failed again
        assert memory_store.get_rollout_by_id(rid).end_time == stamped

    def test_requeuing_twice_keeps_queue_position(self, memory_store: InMemoryStore,
                                                  clock: FakeClock) -> None:
        retry = cfg(max_attempts=3, retry=("failed", "timeout"))
        rid = memory_store.start_rollout("x", config=retry).rollout_id
        memory_store.update_attempt(rid, "latest", status="failed")
        other = memory_store.enqueue_rollout("other").rollout_id
        memory_store.update_attempt(rid, "latest", status="timeout")  # P: requeuing again
        assert drain(memory_store) == [rid, other]

    def test_waiters_not_woken_by_a_noop(self, clock: FakeClock) -> None:
        store = InMemoryStore(clock=clock)
        rid = store.start_rollout("x").rollout_id
        store.update_attempt(rid, "latest", status="succeeded")
        writes = store._state.terminal_writes
        store.update_attempt(rid, "latest", status="succeeded")
        assert store._state.terminal_writes == writes


# =========================================================================== background
class ArmedClock(FakeClock):
    """A fake clock that reports, through an event, that the store read it after ``arm()``.
    The store reads the clock under its lock right before deciding to wait, so once the event
    is set the waiter has started its waiting loop."""

    def __init__(self) -> None:
        super().__init__()
        self.read = threading.Event()
        self._armed = False

    def arm(self) -> None:
        self._armed = True

    def __call__(self) -> float:
        if self._armed:
            self.read.set()
        return super().__call__()


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # pragma: no cover - reported by the assertion
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_waiter_sees_a_timeout_while_nobody_calls() -> None:  # D12
    clock = ArmedClock()
    store = InMemoryStore(clock=clock, watchdog_interval=0.05)
    rid = store.start_rollout("x", config=cfg(timeout=10)).rollout_id
    clock.arm()
    started = time.monotonic()
    thread, out = run_in_thread(lambda: store.wait_for_rollouts(rollout_ids=[rid], timeout=30))
    assert clock.read.wait(5)
    clock.advance(11)  # no store call from here on: only the waiter's own ticks
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 5  # well before its 30 s timeout
    assert len(out) == 1 and [(r.rollout_id, r.status) for r in out[0]] == [(rid, "failed")]


def test_long_poll_sees_a_requeue_while_nobody_calls() -> None:  # D12 + D13
    clock = ArmedClock()
    store = InMemoryStore(clock=clock, watchdog_interval=0.05)
    config = cfg(timeout=10, max_attempts=2, retry=("timeout",))
    store.enqueue_rollout("x", config=config)
    first = store.dequeue_rollout()
    clock.arm()
    started = time.monotonic()
    thread, out = run_in_thread(lambda: store.dequeue_rollout("w2", wait=30))
    assert clock.read.wait(5)
    clock.advance(11)
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 5
    got = out[0]
    assert got.rollout_id == first.rollout_id
    assert got.attempt.sequence_id == 2 and got.attempt.worker_id == "w2"


def test_watchdog_interval_must_be_positive() -> None:
    for bad in (0, -1.0):
        with pytest.raises(InvalidArgument):
            InMemoryStore(watchdog_interval=bad)


def test_statuses_are_enums_in_the_state(memory_store: InMemoryStore, clock: FakeClock) -> None:
    rid = memory_store.start_rollout("x", config=cfg(timeout=1)).rollout_id
    memory_store.update_rollout(rid, status="running")
    clock.advance(2)
    memory_store.run_watchdog()
    assert memory_store._state.rollouts[rid].status is RolloutStatus.FAILED
