"""Hypothesis state machine: the real store against the naive model of tests/model.py.

After every step it compares rollout and attempt statuses, end times (exact values: the clock
is injected), sequence numbers, the queue order, ``wait_for_rollouts(timeout=0)``,
``statistics()`` and the invariants I1-I8 of REF §2.8 as adapted by D1-D14.

``StoreMachine.make_store`` is the one hook another transport overrides (see
tests/test_remote_state_machine.py): the machine only uses the public API, plus
``queue_order()`` which a subclass may answer from its own side.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from mpstore import UNSET, InMemoryStore, RolloutConfig, Span, StoreError
from mpstore.api import MUTATING, PACKED
from tests.conftest import FakeClock
from tests.model import TERMINAL, MConfig, Model, MRollout

ROLLOUT_STATUSES = ["queuing", "preparing", "running", "failed", "succeeded", "cancelled",
                    "requeuing"]
ATTEMPT_STATUSES = ["preparing", "running", "failed", "succeeded", "unresponsive", "timeout"]
RETRYABLE = ["failed", "timeout", "unresponsive"]
LIMITS = st.sampled_from([None, 1.0, 2.0, 3.0])

configs = st.builds(
    MConfig,
    timeout=LIMITS,
    unresponsive=LIMITS,
    max_attempts=st.integers(1, 3),
    retry=st.lists(st.sampled_from(RETRYABLE), unique=True).map(tuple),
)


#: The calls a client sends with a request id (as mpstore.manager.client does).
ONCE_CALLS = MUTATING - set(PACKED)


def to_config(c: MConfig) -> RolloutConfig:
    return RolloutConfig(c.timeout, c.unresponsive, c.max_attempts, list(c.retry))


#: Calls that must fail and change nothing (D1). Each takes (store, a known rollout id).
BAD_CALLS = {
    "bad rollout status": lambda s, rid: s.update_rollout(rid, status="bogus"),
    "bad attempt status": lambda s, rid: s.update_attempt(rid, "latest", status="queuing"),
    "max_attempts 0": lambda s, rid: s.update_rollout(rid, config={"max_attempts": 0}),
    "unknown config key": lambda s, rid: s.update_rollout(rid, config={"retries": 2}),
    "config of wrong type": lambda s, rid: s.update_rollout(rid, config=[1, 2]),
    "metadata not a dict": lambda s, rid: s.update_rollout(rid, status="failed", metadata=3),
    "unknown rollout": lambda s, rid: s.update_rollout("ro-nope", status="failed"),
    "unknown attempt": lambda s, rid: s.update_attempt(rid, "at-nope", status="failed"),
    "span on unknown attempt": lambda s, rid: s.add_span(Span(rid, "at-nope", 1, "x")),
    "batch with one bad span": lambda s, rid: s.add_many_spans(
        [Span(rid, "at-nope", 1, "x"), Span("ro-nope", "at-nope", 2, "y")]
    ),
    "batch with one bad rollout": lambda s, rid: s.enqueue_many_rollouts(
        [{"input": 1}, {"input": 2, "mode": "bogus"}]
    ),
    "bad mode": lambda s, rid: s.enqueue_rollout({"x": 1}, mode="nonsense"),
    "negative sequence": lambda s, rid: s.add_span(Span(rid, "at-x", -1, "x")),
    "status filter not a list": lambda s, rid: s.query_rollouts(status="queuing"),
}


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = self.make_store(self.clock)
        self.model = Model()
        self.span_ids = itertools.count()
        self.last_span: Span | None = None

    # ---------------------------------------------------------------- hooks
    def make_store(self, clock: FakeClock) -> Any:
        return InMemoryStore(clock=clock)

    def queue_order(self) -> list[str] | None:
        """The store's queue, head first, if this transport can see it (None: skip)."""
        return list(self.store._state.queue)

    # ---------------------------------------------------------------- helpers
    def rollout(self, data: st.DataObject) -> MRollout:
        return data.draw(st.sampled_from(list(self.model.rollouts.values())), label="rollout")

    def has_rollouts(self) -> bool:
        return bool(self.model.rollouts)

    def has_attempts(self) -> bool:
        return any(r.attempts for r in self.model.rollouts.values())

    # ---------------------------------------------------------------- rules
    @rule()
    def enqueue(self) -> None:
        rollout = self.store.enqueue_rollout({"task": len(self.model.rollouts)})
        assert rollout.status == "queuing"
        self.model.add(rollout.rollout_id, "queuing", self.clock.now)

    @rule(worker=st.sampled_from([None, "w1"]))
    def start_rollout(self, worker: str | None) -> None:
        claimed = self.store.start_rollout({"task": "direct"}, worker_id=worker)
        assert claimed.status == "preparing" and claimed.attempt.sequence_id == 1
        assert claimed.attempt.worker_id == worker
        self.model.add(claimed.rollout_id, "preparing", self.clock.now, claimed.attempt.attempt_id)

    @rule()
    def dequeue(self) -> None:
        head = self.model.queue[0] if self.model.queue else None
        claimed = self.store.dequeue_rollout(worker_id="w2")
        if head is None:
            assert claimed is None
            return
        assert claimed is not None and claimed.rollout_id == head  # FIFO (I3, I8)
        r = self.model.rollouts[head]
        assert claimed.attempt.sequence_id == len(r.attempts) + 1
        self.model.queue.pop(0)
        self.model.new_attempt(r, claimed.attempt.attempt_id, self.clock.now)

    @precondition(has_rollouts)
    @rule(data=st.data())
    def start_attempt(self, data: st.DataObject) -> None:
        r = self.rollout(data)
        claimed = self.store.start_attempt(r.rollout_id)
        self.model.new_attempt(r, claimed.attempt.attempt_id, self.clock.now)

    @precondition(has_rollouts)
    @rule(data=st.data(), status=st.sampled_from(ROLLOUT_STATUSES))
    def update_rollout_status(self, data: st.DataObject, status: str) -> None:
        r = self.rollout(data)
        updated = self.store.update_rollout(r.rollout_id, status=status)
        assert updated.status == status
        self.model.write(r, status, self.clock.now)

    @precondition(has_rollouts)
    @rule(data=st.data())
    def update_rollout_metadata(self, data: st.DataObject) -> None:
        r = self.rollout(data)
        self.store.update_rollout(r.rollout_id, metadata={"note": "only metadata"})

    @precondition(has_rollouts)
    @rule(data=st.data(), config=configs)
    def change_config(self, data: st.DataObject, config: MConfig) -> None:
        r = self.rollout(data)
        self.store.update_rollout(r.rollout_id, config=to_config(config))
        r.config = config

    @precondition(has_attempts)
    @rule(data=st.data(), status=st.sampled_from([*ATTEMPT_STATUSES, None]),
          by_latest=st.booleans(), heartbeat=st.booleans())
    def update_attempt(self, data: st.DataObject, status: str | None, by_latest: bool,
                       heartbeat: bool) -> None:
        r = data.draw(st.sampled_from([r for r in self.model.rollouts.values() if r.attempts]))
        a = r.attempts[-1] if by_latest else data.draw(st.sampled_from(r.attempts))
        self.store.update_attempt(
            r.rollout_id,
            "latest" if by_latest else a.attempt_id,
            status=UNSET if status is None else status,
            last_heartbeat_time=self.clock.now if heartbeat else UNSET,
            metadata={"step": 1},
        )
        self.model.update_attempt(r, a, status, self.clock.now if heartbeat else None,
                                  self.clock.now)

    @precondition(has_attempts)
    @rule(data=st.data(), explicit=st.sampled_from([None, 1, 5, 50]))
    def add_span(self, data: st.DataObject, explicit: int | None) -> None:
        r = data.draw(st.sampled_from([r for r in self.model.rollouts.values() if r.attempts]))
        a = data.draw(st.sampled_from(r.attempts))
        if explicit is None:
            seq = self.store.get_next_span_sequence_id(r.rollout_id, a.attempt_id)
            assert seq == r.counter + 1  # I7
            r.counter = seq
        else:
            seq = explicit
        span = Span(r.rollout_id, a.attempt_id, seq, "step", span_id=f"{next(self.span_ids):016x}")
        stored = self.store.add_span(span)
        assert stored == span
        assert self.model.add_span(r, a, span.span_id, seq, self.clock.now)
        self.last_span = span

    @precondition(lambda self: self.last_span is not None)
    @rule()
    def resend_span(self) -> None:
        """D7: a retried add_span is stored once and has no other effect."""
        assert self.last_span is not None
        stored = self.store.add_span(self.last_span)
        assert stored == self.last_span
        r = self.model.rollouts[self.last_span.rollout_id]
        a = next(a for a in r.attempts if a.attempt_id == self.last_span.attempt_id)
        assert not self.model.add_span(r, a, self.last_span.span_id, 0, self.clock.now)

    @precondition(has_rollouts)
    @rule(data=st.data())
    def next_sequence_id(self, data: st.DataObject) -> None:
        r = self.rollout(data)
        seq = self.store.get_next_span_sequence_id(r.rollout_id, "any-attempt")
        assert seq == r.counter + 1  # I7: strictly increasing, above every seq given
        r.counter = seq

    @rule(dt=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 10.0]), via_ticker=st.booleans())
    def advance_clock(self, dt: float, via_ticker: bool) -> None:
        self.clock.advance(dt)
        if via_ticker:
            self.store.run_watchdog()
        else:
            self.store.query_attempts("ro-any")  # any REF-set call runs the watchdog first
        self.model.watchdog(self.clock.now)

    @precondition(has_rollouts)
    @rule(data=st.data(), call=st.sampled_from(sorted(BAD_CALLS)))
    def invalid_input_changes_nothing(self, data: st.DataObject, call: str) -> None:
        r = self.rollout(data)
        before = self.snapshot()
        with pytest.raises(StoreError):
            BAD_CALLS[call](self.store, r.rollout_id)
        assert self.snapshot() == before, call

    # ---------------------------------------------------------------- checks
    def snapshot(self) -> Any:
        stats = self.store.statistics()
        # Clocks, and what counts since the process started (calls, commits).
        for moving in ("uptime", "time", "server", "since_start", "commits"):
            stats.pop(moving, None)
        # Workers are telemetry a data directory does not keep (README: Workers).
        stats.pop("total_workers")
        rollouts = self.store.query_rollouts()
        return (
            stats,
            rollouts,
            [self.store.query_attempts(r.rollout_id) for r in rollouts],
            self.queue_order(),
        )

    @invariant()
    def matches_model(self) -> None:
        model, now = self.model, self.clock.now
        model.watchdog(now)  # the reads below run the store's watchdog first
        rollouts = {r.rollout_id: r for r in self.store.query_rollouts()}
        assert list(rollouts) == list(model.rollouts)  # creation order
        for rid, m in model.rollouts.items():
            real = rollouts[rid]
            assert (real.status, real.end_time) == (m.status, m.end_time), rid
            attempts = self.store.query_attempts(rid)
            assert [a.sequence_id for a in attempts] == list(range(1, len(m.attempts) + 1))  # I2
            assert [(a.attempt_id, a.status, a.end_time, a.last_heartbeat_time)
                    for a in attempts] == [
                (a.attempt_id, a.status, a.end_time, a.heartbeat) for a in m.attempts
            ], rid
        order = self.queue_order()
        if order is not None:
            assert order == model.queue  # I1, I3
        assert sorted(model.queue) == sorted(
            rid for rid, r in model.rollouts.items() if r.status in ("queuing", "requeuing")
        )
        ids = list(model.rollouts)
        done = self.store.wait_for_rollouts(rollout_ids=[*ids, "ro-unknown"], timeout=0)
        assert [r.rollout_id for r in done] == model.terminal()  # I6, D11
        assert all(r.status in TERMINAL for r in done)
        stats = self.store.statistics()
        assert stats["total_rollouts"] == len(ids)
        assert stats["queue_length"] == len(model.queue)
        assert stats["total_attempts"] == sum(len(r.attempts) for r in model.rollouts.values())
        assert stats["total_spans"] == model.spans


StoreMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreMachine = StoreMachine.TestCase


class DurableStoreMachine(StoreMachine):
    """The same machine on a store with a data directory, plus a rule that restarts it: a
    restart must leave every observable result unchanged (SPEC §9)."""

    def make_store(self, clock: FakeClock) -> Any:
        self.data_dir = tempfile.mkdtemp(prefix="mpstore-sm-")
        return InMemoryStore(clock=clock, data_dir=self.data_dir)

    def restart_store(self) -> None:
        self.store.close()
        self.store = InMemoryStore(clock=self.clock, data_dir=self.data_dir)

    def close_store(self) -> None:
        self.store.close()

    @rule()
    def restart(self) -> None:
        before = self.snapshot()
        self.restart_store()
        assert self.snapshot() == before

    def teardown(self) -> None:
        self.close_store()
        shutil.rmtree(self.data_dir, ignore_errors=True)


DurableStoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDurableStoreMachine = DurableStoreMachine.TestCase


class _LossyStore:
    """A store reached through a connection that loses replies: each call that carries a
    request id (every write but the span adds) is answered through ``once``; while
    ``machine.losing`` is set, its first reply is dropped, the durable store may restart,
    and the call is sent again with the same id, which must answer the same, having been
    applied once (the model, which sees one call, must stay equal)."""

    def __init__(self, machine: LossyStoreMachine) -> None:
        self._machine = machine
        self._ids = itertools.count(1)

    def __getattr__(self, name: str) -> Any:
        store = self._machine.real_store
        if name not in ONCE_CALLS:
            return getattr(store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            request = ("machine", next(self._ids))
            first = self._machine.real_store.once(
                request, getattr(self._machine.real_store, name))(*args, **kwargs)
            if not self._machine.losing:
                return first
            if self._machine.restart_between:
                self._machine.restart_store()
            again = self._machine.real_store.once(
                request, getattr(self._machine.real_store, name))(*args, **kwargs)
            assert again == first, (name, first, again)
            self._machine.resent += 1
            return again

        return call


class LossyStoreMachine(DurableStoreMachine):
    """The durable machine through a lossy connection (issue 12): replies dropped at random
    and the requests sent again, with restarts in between."""

    def make_store(self, clock: FakeClock) -> Any:
        self.real_store = super().make_store(clock)
        self.losing, self.restart_between, self.resent = False, False, 0
        return _LossyStore(self)

    def queue_order(self) -> list[str] | None:
        return list(self.real_store._state.queue)

    def restart_store(self) -> None:
        self.real_store.close()
        self.real_store = InMemoryStore(clock=self.clock, data_dir=self.data_dir)

    def close_store(self) -> None:
        self.real_store.close()

    @rule(losing=st.booleans(), restart_between=st.booleans())
    def connection(self, losing: bool, restart_between: bool) -> None:
        self.losing, self.restart_between = losing, restart_between


LossyStoreMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLossyStoreMachine = LossyStoreMachine.TestCase
