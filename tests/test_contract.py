"""The contract suite: the whole public store API (SPEC §3, REF §2-§4, D1-D14).

Every test runs on the ``store`` fixture, once in process and once through a real server
(``connect()``), so it uses only the public API: no fake clock, no internals, no sleeping.
Timeouts are exercised with negative ``timeout_seconds``/``unresponsive_seconds`` (REF §1.2:
accepted, and due on the next watchdog pass), which needs no clock at all.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from mpstore import (
    LLM,
    UNSET,
    Attempt,
    AttemptedRollout,
    AttemptNotFound,
    AttemptStatus,
    InvalidArgument,
    NoAttempts,
    PromptTemplate,
    ProxyLLM,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutNotFound,
    RolloutStatus,
    Span,
    StoreError,
)

ROLLOUT_ID = re.compile(r"^ro-[0-9a-f]{12}$")
ATTEMPT_ID = re.compile(r"^at-[0-9a-f]{8}$")
RESOURCES_ID = re.compile(r"^rs-[0-9a-f]{12}$")

TERMINAL = {"failed", "succeeded", "cancelled"}
#: Keys SPEC §3 requires in statistics().
STAT_KEYS = {
    "total_rollouts", "total_attempts", "total_spans", "total_resources", "queue_length",
    "span_bytes", "uptime",
}
#: A config whose attempts time out on the very next watchdog pass (REF §1.2: negative values
#: are accepted and due at once), so timeouts are testable without a clock.
EXPIRED = {"timeout_seconds": -1.0}


def span(rid: str, aid: str, seq: int, name: str = "s", **kw: Any) -> Span:
    return Span(rid, aid, seq, name, **kw)


def claimed(store: Any, **kw: Any) -> AttemptedRollout:
    """A rollout enqueued then dequeued: preparing, with attempt 1."""
    store.enqueue_rollout({"task": 1}, **kw)
    got = store.dequeue_rollout()
    assert got is not None
    return got


def status_of(store: Any, rid: str) -> str:
    rollout = store.get_rollout_by_id(rid)
    assert rollout is not None
    return rollout.status


def refused(call: Callable[[], Any], case: Any, exc: type[BaseException] = InvalidArgument
            ) -> None:
    """``call()`` must raise ``exc``; a failure names the case. Families of bad calls share
    one store (one server in the remote run) and check afterwards that nothing changed."""
    try:
        call()
    except exc:
        return
    except Exception as other:
        pytest.fail(f"{case!r}: raised {type(other).__name__}: {other}, not {exc.__name__}")
    pytest.fail(f"{case!r}: accepted, should raise {exc.__name__}")


def drain(store: Any) -> list[str]:
    """Dequeue until empty; the ids in dequeue (= queue) order."""
    out = []
    while (got := store.dequeue_rollout()) is not None:
        out.append(got.rollout_id)
    return out


# =========================================================================== create
class TestEnqueue:
    def test_defaults(self, store: Any) -> None:
        before = time.time()
        r = store.enqueue_rollout({"q": "2+2"})
        after = time.time()
        assert type(r) is Rollout
        assert ROLLOUT_ID.match(r.rollout_id)
        assert r.input == {"q": "2+2"}
        assert r.status == "queuing" and r.status is RolloutStatus.QUEUING
        assert r.end_time is None
        assert r.mode is None and r.resources_id is None
        assert r.metadata == {}  # REF: None becomes {}
        assert r.config == RolloutConfig()
        assert before - 1 <= r.start_time <= after + 1
        assert store.get_rollout_by_id(r.rollout_id) == r
        assert store.query_attempts(r.rollout_id) == []
        assert store.get_latest_attempt(r.rollout_id) is None

    def test_all_fields(self, store: Any) -> None:
        r = store.enqueue_rollout(
            [1, 2], mode="train", resources_id="res-123",
            config={"timeout_seconds": 5, "max_attempts": 3, "retry_condition": ["failed"]},
            metadata={"k": "v"},
        )
        assert r.mode == "train"
        assert r.resources_id == "res-123"  # REF Q11: not validated
        assert r.config == RolloutConfig(5.0, None, 3, [AttemptStatus.FAILED])
        assert r.config.retry_condition == ["failed"]
        assert r.metadata == {"k": "v"}
        assert store.get_rollout_by_id(r.rollout_id) == r

    def test_config_object_and_enum_inputs(self, store: Any) -> None:
        config = RolloutConfig(timeout_seconds=None, unresponsive_seconds=2.5, max_attempts=2,
                               retry_condition=[AttemptStatus.TIMEOUT, "unresponsive"])
        r = store.enqueue_rollout("x", mode=RolloutMode.VAL, config=config)
        assert r.mode == "val"
        assert r.config.unresponsive_seconds == 2.5
        assert r.config.retry_condition == ["timeout", "unresponsive"]
        assert all(isinstance(s, AttemptStatus) for s in r.config.retry_condition)

    def test_any_input(self, store: Any) -> None:
        for payload in (None, 0, "", [], {"nested": {"deep": [1, 2]}}, (1, 2), b"\x00"):
            r = store.enqueue_rollout(payload)
            assert r.input == payload
            assert store.get_rollout_by_id(r.rollout_id).input == payload

    def test_fifo(self, store: Any) -> None:
        ids = [store.enqueue_rollout(i).rollout_id for i in range(5)]
        assert len(set(ids)) == 5
        assert drain(store) == ids

    def test_enqueue_takes_no_worker_id(self, store: Any) -> None:
        with pytest.raises(TypeError):
            store.enqueue_rollout("x", worker_id="w")  # D13: only claims take worker_id
        assert store.statistics()["total_rollouts"] == 0


class TestStartRollout:
    def test_claimed_at_once(self, store: Any) -> None:
        ar = store.start_rollout({"t": 1}, mode="test", metadata={"m": 1}, worker_id="w-1")
        assert type(ar) is AttemptedRollout
        assert ROLLOUT_ID.match(ar.rollout_id)
        assert ar.status == "preparing"
        a = ar.attempt
        assert type(a) is Attempt
        assert ATTEMPT_ID.match(a.attempt_id)
        assert (a.rollout_id, a.sequence_id, a.status) == (ar.rollout_id, 1, "preparing")
        assert a.start_time == ar.start_time  # REF E2: one shared start time
        assert a.end_time is None and a.last_heartbeat_time is None
        assert a.worker_id == "w-1"  # D13
        assert ar.metadata == {"m": 1} and ar.mode == "test"
        # Not queued.
        assert store.dequeue_rollout() is None
        assert store.statistics()["queue_length"] == 0
        assert store.query_attempts(ar.rollout_id) == [a]
        assert store.get_rollout_by_id(ar.rollout_id) == Rollout(
            **{f: getattr(ar, f) for f in Rollout.__dataclass_fields__}
        )

    def test_defaults(self, store: Any) -> None:
        ar = store.start_rollout("x")
        assert ar.attempt.worker_id is None
        assert ar.metadata == {} and ar.config == RolloutConfig()
        assert ar.resources_id is None


class TestEnqueueMany:
    def test_order_and_fields(self, store: Any) -> None:
        rs = store.enqueue_many_rollouts([
            {"input": 1},
            {"input": 2, "mode": "val", "metadata": {"a": 1}},
            {"input": 3, "config": {"max_attempts": 2}, "resources_id": "r"},
        ])
        assert [type(r) for r in rs] == [Rollout] * 3
        assert [r.input for r in rs] == [1, 2, 3]
        assert rs[1].mode == "val" and rs[1].metadata == {"a": 1}
        assert rs[2].config.max_attempts == 2 and rs[2].resources_id == "r"
        assert all(r.status == "queuing" for r in rs)
        assert [r.rollout_id for r in store.query_rollouts()] == [r.rollout_id for r in rs]
        assert drain(store) == [r.rollout_id for r in rs]

    def test_empty(self, store: Any) -> None:
        assert store.enqueue_many_rollouts([]) == []
        assert store.statistics()["total_rollouts"] == 0

    def test_all_or_nothing(self, store: Any) -> None:
        store.enqueue_rollout("before")
        for bad in (
            [{"input": 1}, {"input": 2, "mode": "bogus"}],
            [{"input": 1}, {"mode": "train"}],  # no input
            [{"input": 1}, {"input": 2, "colour": "red"}],  # unknown key
            [{"input": 1}, {"input": 2, "config": {"max_attempts": 0}}],
            [{"input": 1}, {"input": 2, "metadata": 5}],
            [{"input": 1}, "not a dict"],
            "abc", {"input": 1}, 42,  # not a list
        ):
            refused(lambda bad=bad: store.enqueue_many_rollouts(bad), bad)
        stats = store.statistics()
        assert stats["total_rollouts"] == 1 and stats["queue_length"] == 1


# =========================================================================== claim
class TestDequeue:
    def test_empty(self, store: Any) -> None:
        assert store.dequeue_rollout() is None
        assert store.dequeue_rollout(wait=0) is None
        assert store.dequeue_many_rollouts(3) == []

    def test_claim(self, store: Any) -> None:
        r = store.enqueue_rollout("x", metadata={"m": 1})
        got = store.dequeue_rollout(worker_id="w-7")
        assert type(got) is AttemptedRollout
        assert got.rollout_id == r.rollout_id and got.status == "preparing"
        assert got.input == "x" and got.metadata == {"m": 1}
        assert got.attempt.sequence_id == 1 and got.attempt.status == "preparing"
        assert got.attempt.worker_id == "w-7"
        assert got.attempt.rollout_id == r.rollout_id
        assert got.attempt.start_time >= r.start_time
        assert store.dequeue_rollout() is None  # left the queue
        assert status_of(store, r.rollout_id) == "preparing"
        assert store.get_latest_attempt(r.rollout_id) == got.attempt

    def test_short_long_poll_returns_none(self, store: Any) -> None:
        start = time.monotonic()
        assert store.dequeue_rollout(wait=0.05) is None
        assert time.monotonic() - start < 5

    def test_wait_returns_at_once_when_available(self, store: Any) -> None:
        r = store.enqueue_rollout("x")
        start = time.monotonic()
        got = store.dequeue_rollout(wait=30)
        assert time.monotonic() - start < 5
        assert got is not None and got.rollout_id == r.rollout_id

    def test_many(self, store: Any) -> None:
        ids = [store.enqueue_rollout(i).rollout_id for i in range(5)]
        first = store.dequeue_many_rollouts(2, worker_id="w")
        assert [g.rollout_id for g in first] == ids[:2]
        assert all(g.attempt.worker_id == "w" and g.attempt.sequence_id == 1 for g in first)
        assert all(type(g) is AttemptedRollout for g in first)
        rest = store.dequeue_many_rollouts(10)
        assert [g.rollout_id for g in rest] == ids[2:]
        assert store.dequeue_many_rollouts(1) == []

    def test_many_zero(self, store: Any) -> None:
        store.enqueue_rollout("x")
        assert store.dequeue_many_rollouts(0) == []
        assert store.statistics()["queue_length"] == 1

    def test_many_bad_limit(self, store: Any) -> None:
        store.enqueue_rollout("x")
        for limit in (-1, 1.5, "2", None, True):
            refused(lambda limit=limit: store.dequeue_many_rollouts(limit), limit)
        assert store.statistics()["queue_length"] == 1

    def test_skips_rollouts_that_left_the_queue(self, store: Any) -> None:
        a, b, c, d = (store.enqueue_rollout(i).rollout_id for i in range(4))
        store.start_attempt(a)
        store.update_rollout(b, status="running")
        store.update_rollout(c, status="cancelled")
        got = store.dequeue_rollout()
        assert got is not None and got.rollout_id == d
        assert store.dequeue_rollout() is None

    def test_retry_creates_next_attempt(self, store: Any) -> None:
        cfg = {"max_attempts": 3, "retry_condition": ["failed"]}
        r = store.enqueue_rollout("x", config=cfg)
        seen = []
        for _ in range(3):
            got = store.dequeue_rollout()
            assert got is not None
            seen.append(got.attempt.sequence_id)
            store.update_attempt(r.rollout_id, got.attempt.attempt_id, status="failed")
        assert seen == [1, 2, 3]
        assert status_of(store, r.rollout_id) == "failed"
        attempts = store.query_attempts(r.rollout_id)
        assert [a.sequence_id for a in attempts] == [1, 2, 3]
        assert [a.status for a in attempts] == ["failed"] * 3
        assert len({a.attempt_id for a in attempts}) == 3

    def test_old_attempt_untouched_by_dequeue(self, store: Any) -> None:
        cfg = {"max_attempts": 2, "retry_condition": ["unresponsive"]}
        ar = claimed(store, config=cfg)
        rid = ar.rollout_id
        store.add_span(span(rid, ar.attempt.attempt_id, 1))
        store.update_attempt(rid, "latest", status="unresponsive")
        assert status_of(store, rid) == "requeuing"
        again = store.dequeue_rollout()
        assert again is not None and again.attempt.sequence_id == 2
        first, second = store.query_attempts(rid)
        assert first.status == "unresponsive" and second.status == "preparing"


class TestStartAttempt:
    def test_from_queue(self, store: Any) -> None:
        r = store.enqueue_rollout("x")
        ar = store.start_attempt(r.rollout_id, worker_id="w")
        assert type(ar) is AttemptedRollout
        assert ar.status == "preparing" and ar.attempt.sequence_id == 1
        assert ar.attempt.worker_id == "w"
        assert store.dequeue_rollout() is None  # removed from the queue

    def test_ignores_max_attempts(self, store: Any) -> None:
        r = store.enqueue_rollout("x", config={"max_attempts": 1})
        seqs = [store.start_attempt(r.rollout_id).attempt.sequence_id for _ in range(3)]
        assert seqs == [1, 2, 3]
        attempts = store.query_attempts(r.rollout_id)
        assert [a.sequence_id for a in attempts] == [1, 2, 3]
        assert store.get_latest_attempt(r.rollout_id) == attempts[-1]
        assert store.statistics()["total_attempts"] == 3

    @pytest.mark.parametrize("terminal", sorted(TERMINAL))
    def test_reopens_terminal_keeping_end_time(self, store: Any, terminal: str) -> None:
        ar = store.start_rollout("x")
        done = store.update_rollout(ar.rollout_id, status=terminal)
        assert done.end_time is not None
        again = store.start_attempt(ar.rollout_id)
        assert again.status == "preparing"
        assert again.end_time == done.end_time  # REF: never cleared
        assert again.attempt.sequence_id == 2

    def test_unknown(self, store: Any) -> None:
        with pytest.raises(RolloutNotFound, match=r"^Rollout ro-nope not found$"):
            store.start_attempt("ro-nope")


# =========================================================================== read
class TestQueryRollouts:
    def test_creation_order_and_filters(self, store: Any) -> None:
        a = store.enqueue_rollout(0).rollout_id
        b = store.start_rollout(1).rollout_id
        c = store.enqueue_rollout(2).rollout_id
        d = store.enqueue_rollout(3).rollout_id
        store.update_rollout(c, status="succeeded")
        ids = lambda rs: [r.rollout_id for r in rs]  # noqa: E731
        assert ids(store.query_rollouts()) == [a, b, c, d]
        assert ids(store.query_rollouts(status=["queuing"])) == [a, d]
        assert ids(store.query_rollouts(status=[RolloutStatus.PREPARING])) == [b]
        assert ids(store.query_rollouts(status=["succeeded", "queuing"])) == [a, c, d]
        assert ids(store.query_rollouts(status=("failed",))) == []
        assert ids(store.query_rollouts(rollout_ids=[d, a, "ro-unknown"])) == [a, d]
        assert ids(store.query_rollouts(rollout_ids=[a, a])) == [a]
        assert ids(store.query_rollouts(status=["queuing"], rollout_ids=[a, b, c])) == [a]

    def test_empty_filters_match_nothing(self, store: Any) -> None:  # D9
        store.enqueue_rollout("x")
        assert store.query_rollouts(status=[]) == []
        assert store.query_rollouts(rollout_ids=[]) == []
        assert store.query_rollouts(status=[], rollout_ids=[]) == []
        assert len(store.query_rollouts(status=None, rollout_ids=None)) == 1

    def test_keyword_only(self, store: Any) -> None:
        with pytest.raises(TypeError):
            store.query_rollouts(["queuing"])

    def test_invalid(self, store: Any) -> None:
        for kw in ({"status": ["bogus"]}, {"status": "queuing"}, {"rollout_ids": "ro-x"},
                   {"rollout_ids": [1]}, {"status": 3}):
            refused(lambda kw=kw: store.query_rollouts(**kw), kw)

    def test_get_unknown(self, store: Any) -> None:
        assert store.get_rollout_by_id("ro-000000000000") is None

    def test_attempt_reads_unknown(self, store: Any) -> None:  # REF Q11
        assert store.query_attempts("ro-nope") == []
        assert store.get_latest_attempt("ro-nope") is None


# =========================================================================== wait
class TestWait:
    def test_snapshot_input_order_unknown_omitted_duplicates_kept(self, store: Any) -> None:
        a = store.start_rollout(0).rollout_id
        b = store.start_rollout(1).rollout_id
        c = store.start_rollout(2).rollout_id
        store.update_rollout(c, status="failed")
        store.update_rollout(a, status="succeeded")
        got = store.wait_for_rollouts(rollout_ids=[c, "ro-unknown", b, a, c], timeout=0)
        assert [r.rollout_id for r in got] == [c, a, c]  # D11: input order
        assert [r.status for r in got] == ["failed", "succeeded", "failed"]
        assert all(type(r) is Rollout for r in got)

    def test_terminal_returns_at_once_despite_long_timeout(self, store: Any) -> None:
        rid = store.start_rollout("x").rollout_id
        store.update_attempt(rid, "latest", status="succeeded")
        start = time.monotonic()
        got = store.wait_for_rollouts(rollout_ids=[rid, "ro-unknown"], timeout=30)
        assert time.monotonic() - start < 5
        assert [r.rollout_id for r in got] == [rid]
        # Unknown ids alone are not waited for either.
        start = time.monotonic()
        assert store.wait_for_rollouts(rollout_ids=["ro-unknown"], timeout=30) == []
        assert store.wait_for_rollouts(rollout_ids=["ro-unknown"]) == []
        assert time.monotonic() - start < 5

    def test_short_timeout_with_nothing_finished(self, store: Any) -> None:
        rid = store.enqueue_rollout("x").rollout_id
        start = time.monotonic()
        assert store.wait_for_rollouts(rollout_ids=[rid], timeout=0.05) == []
        assert time.monotonic() - start < 5
        assert store.wait_for_rollouts(rollout_ids=[rid], timeout=-1) == []

    def test_partial_result_after_timeout(self, store: Any) -> None:
        a = store.start_rollout(0).rollout_id
        b = store.start_rollout(1).rollout_id
        store.update_rollout(b, status="cancelled")
        got = store.wait_for_rollouts(rollout_ids=[a, b], timeout=0.02)
        assert [r.rollout_id for r in got] == [b]

    def test_empty(self, store: Any) -> None:
        assert store.wait_for_rollouts(rollout_ids=[]) == []

    def test_keyword_only(self, store: Any) -> None:
        with pytest.raises(TypeError):
            store.wait_for_rollouts(["ro-x"])

    def test_invalid(self, store: Any) -> None:
        for kw in ({"rollout_ids": "ro-x"}, {"rollout_ids": [3]}, {"rollout_ids": None},
                   {"rollout_ids": ["ro-x"], "timeout": "soon"}):
            refused(lambda kw=kw: store.wait_for_rollouts(**kw), kw)

    def test_reopened_rollout_is_waited_for_again(self, store: Any) -> None:  # D5
        rid = store.start_rollout("x").rollout_id
        store.update_attempt(rid, "latest", status="succeeded")
        assert len(store.wait_for_rollouts(rollout_ids=[rid], timeout=0)) == 1
        store.start_attempt(rid)
        assert store.wait_for_rollouts(rollout_ids=[rid], timeout=0) == []
        assert store.wait_for_rollouts(rollout_ids=[rid], timeout=0.02) == []
        store.update_rollout(rid, status="failed")
        assert len(store.wait_for_rollouts(rollout_ids=[rid], timeout=0)) == 1
        store.update_rollout(rid, status="queuing")
        assert store.wait_for_rollouts(rollout_ids=[rid], timeout=0) == []

    def test_watchdog_runs_on_wait_entry(self, store: Any) -> None:
        rid = store.start_rollout("x", config=EXPIRED).rollout_id
        # No other call in between: the wait itself must time the attempt out (D12) and
        # return at once, even without a timeout.
        got = store.wait_for_rollouts(rollout_ids=[rid])
        assert [(r.rollout_id, r.status) for r in got] == [(rid, "failed")]


# =========================================================================== update_rollout
class TestUpdateRollout:
    def test_replaces_given_fields_only(self, store: Any) -> None:
        r = store.enqueue_rollout({"a": 1}, mode="train", resources_id="rs-1",
                                  metadata={"keep": 1, "old": 2})
        u = store.update_rollout(r.rollout_id, metadata={"new": 3})
        assert type(u) is Rollout
        assert u.metadata == {"new": 3}  # replaced, not merged
        assert (u.input, u.mode, u.resources_id, u.status) == ({"a": 1}, "train", "rs-1",
                                                               "queuing")
        u = store.update_rollout(r.rollout_id, input=[9], mode="val", resources_id="rs-2",
                                 config={"max_attempts": 4})
        assert (u.input, u.mode, u.resources_id) == ([9], "val", "rs-2")
        assert u.config == RolloutConfig(max_attempts=4)
        assert u.metadata == {"new": 3}
        assert store.get_rollout_by_id(r.rollout_id) == u

    def test_none_is_a_value_unset_is_not(self, store: Any) -> None:
        r = store.enqueue_rollout("x", mode="train", resources_id="rs", metadata={"a": 1})
        u = store.update_rollout(r.rollout_id, mode=UNSET, resources_id=UNSET, metadata=UNSET,
                                 status=UNSET, config=UNSET, input=UNSET)
        assert u == r
        assert store.update_rollout(r.rollout_id) == r
        u = store.update_rollout(r.rollout_id, mode=None, resources_id=None, metadata=None,
                                 input=None)
        assert (u.mode, u.resources_id, u.metadata, u.input) == (None, None, None, None)
        assert u.status == "queuing"
        u = store.update_rollout(r.rollout_id, config=None)  # None: the default config
        assert u.config == RolloutConfig()

    def test_status_strings_and_enums(self, store: Any) -> None:
        rid = store.enqueue_rollout("x").rollout_id
        assert store.update_rollout(rid, status=RolloutStatus.RUNNING).status == "running"
        assert store.update_rollout(rid, status="preparing").status is RolloutStatus.PREPARING

    @pytest.mark.parametrize("status", sorted(TERMINAL))
    def test_terminal_stamps_end_time_every_time(self, store: Any, status: str) -> None:
        rid = store.enqueue_rollout("x").rollout_id
        first = store.update_rollout(rid, status=status)
        assert first.end_time is not None
        assert store.dequeue_rollout() is None
        second = store.update_rollout(rid, status=status)
        assert second.end_time is not None and second.end_time >= first.end_time
        # A non-terminal status never clears it.
        back = store.update_rollout(rid, status="running")
        assert back.end_time == second.end_time

    def test_queue_membership_follows_status(self, store: Any) -> None:
        a = store.enqueue_rollout(0).rollout_id
        b = store.start_rollout(1).rollout_id
        c = store.enqueue_rollout(2).rollout_id
        store.update_rollout(a, status="running")  # leaves the queue
        store.update_rollout(b, status="requeuing")  # enters at the tail
        store.update_rollout(a, status="queuing")  # re-enters at the tail (I3)
        store.update_rollout(c, status="queuing")  # already queued: keeps its place
        assert store.statistics()["queue_length"] == 3
        assert drain(store) == [c, b, a]

    def test_status_does_not_touch_attempts(self, store: Any) -> None:
        ar = store.start_rollout("x")
        store.update_rollout(ar.rollout_id, status="cancelled")
        assert store.get_latest_attempt(ar.rollout_id).status == "preparing"

    def test_unknown(self, store: Any) -> None:
        with pytest.raises(RolloutNotFound, match=r"^Rollout nonexistent not found$"):
            store.update_rollout("nonexistent", status="failed")

    def test_invalid_leaves_state_unchanged(self, store: Any) -> None:
        a = store.enqueue_rollout("a", metadata={"m": 1}).rollout_id
        b = store.enqueue_rollout("b").rollout_id
        before = store.query_rollouts()
        for kw in (
            {"status": "bogus"}, {"status": None}, {"status": "timeout"},
            {"config": {"max_attempts": 0}}, {"config": {"retries": 1}}, {"config": [1]},
            {"config": {"retry_condition": ["later"]}}, {"config": {"timeout_seconds": "1"}},
            {"mode": "prod"}, {"metadata": [1]}, {"resources_id": 5},
            {"status": "failed", "metadata": 3},
        ):
            refused(lambda kw=kw: store.update_rollout(a, **kw), kw)
        assert store.query_rollouts() == before  # D1
        assert drain(store) == [a, b]

    def test_bad_rollout_id_type(self, store: Any) -> None:
        with pytest.raises(InvalidArgument):
            store.update_rollout(123, status="failed")


# =========================================================================== update_attempt
class TestUpdateAttempt:
    def test_fields(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        a = store.update_attempt(rid, aid, worker_id="", metadata={}, last_heartbeat_time=12.5)
        assert type(a) is Attempt
        assert (a.worker_id, a.metadata, a.last_heartbeat_time) == ("", {}, 12.5)
        assert a.status == "preparing"
        a = store.update_attempt(rid, "latest", worker_id=None, metadata={"x": [1]})
        assert (a.worker_id, a.metadata, a.last_heartbeat_time) == (None, {"x": [1]}, 12.5)
        a = store.update_attempt(rid, aid, last_heartbeat_time=None, worker_id=UNSET)
        assert a.last_heartbeat_time is None and a.worker_id is None
        assert store.get_latest_attempt(rid) == a

    @pytest.mark.parametrize(("status", "ends"), [
        ("preparing", False), ("running", False), ("failed", True), ("succeeded", True),
        ("unresponsive", False), ("timeout", False),
    ])
    def test_end_time_only_for_failed_or_succeeded(self, store: Any, status: str,
                                                   ends: bool) -> None:
        ar = store.start_rollout("x")
        a = store.update_attempt(ar.rollout_id, ar.attempt.attempt_id, status=status)
        assert a.status == status
        assert (a.end_time is not None) is ends

    @pytest.mark.parametrize(("status", "retry", "expected"), [
        ("preparing", [], "preparing"),
        ("running", [], "running"),
        ("succeeded", ["failed"], "succeeded"),
        ("failed", [], "failed"),
        ("failed", ["failed"], "requeuing"),
        ("failed", ["timeout", "unresponsive"], "failed"),
        ("timeout", ["timeout"], "requeuing"),
        ("timeout", ["failed"], "failed"),
        ("unresponsive", ["unresponsive"], "requeuing"),
        ("unresponsive", [], "failed"),
    ])
    def test_propagation(self, store: Any, status: str, retry: list[str],
                         expected: str) -> None:
        cfg = {"max_attempts": 2, "retry_condition": retry}
        ar = claimed(store, config=cfg)
        store.update_attempt(ar.rollout_id, "latest", status=status)
        r = store.get_rollout_by_id(ar.rollout_id)
        assert r.status == expected
        assert (r.end_time is not None) is (expected in TERMINAL)
        queued = store.dequeue_rollout()
        if expected == "requeuing":
            assert queued is not None and queued.rollout_id == ar.rollout_id
            assert queued.attempt.sequence_id == 2
        else:
            assert queued is None

    def test_retry_only_while_sequence_below_max(self, store: Any) -> None:
        cfg = {"max_attempts": 2, "retry_condition": ["failed"]}
        ar = claimed(store, config=cfg)
        rid = ar.rollout_id
        store.update_attempt(rid, "latest", status="failed")
        assert status_of(store, rid) == "requeuing"
        assert store.dequeue_rollout().attempt.sequence_id == 2
        store.update_attempt(rid, "latest", status="failed")
        assert status_of(store, rid) == "failed"

    def test_sequence_not_count_is_compared(self, store: Any) -> None:
        # start_attempt goes past max_attempts; a retryable failure of attempt 3 fails.
        cfg = {"max_attempts": 2, "retry_condition": ["failed"]}
        rid = store.start_rollout("x", config=cfg).rollout_id
        store.start_attempt(rid)
        store.start_attempt(rid)
        store.update_attempt(rid, "latest", status="failed")
        assert status_of(store, rid) == "failed"

    def test_retry_condition_of_non_retryable_status_has_no_effect(self, store: Any) -> None:
        cfg = {"max_attempts": 3, "retry_condition": ["succeeded", "preparing", "running"]}
        ar = claimed(store, config=cfg)
        store.update_attempt(ar.rollout_id, "latest", status="succeeded")
        assert status_of(store, ar.rollout_id) == "succeeded"

    def test_requeue_goes_to_tail(self, store: Any) -> None:
        cfg = {"max_attempts": 2, "retry_condition": ["failed"]}
        ar = claimed(store, config=cfg)
        other = store.enqueue_rollout("other").rollout_id
        store.update_attempt(ar.rollout_id, "latest", status="failed")
        assert drain(store) == [other, ar.rollout_id]

    def test_non_latest_attempt_does_not_move_rollout(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, first = ar.rollout_id, ar.attempt.attempt_id
        store.start_attempt(rid)
        a = store.update_attempt(rid, first, status="succeeded")
        assert a.status == "succeeded" and a.end_time is not None
        assert status_of(store, rid) == "preparing"
        store.update_attempt(rid, first, status="failed")
        assert status_of(store, rid) == "preparing"
        store.update_attempt(rid, "latest", status="running")
        assert status_of(store, rid) == "running"

    def test_metadata_only_update_does_not_rederive(self, store: Any) -> None:  # D3, Q3
        ar = store.start_rollout("x")
        rid = ar.rollout_id
        store.update_rollout(rid, status="running")
        store.update_attempt(rid, "latest", metadata={"note": 1})
        assert status_of(store, rid) == "running"  # REF would reset it to preparing
        store.update_attempt(rid, "latest", status=UNSET, worker_id="w")
        assert status_of(store, rid) == "running"
        # A failed latest attempt with retries left does not requeue a succeeded rollout.
        cfg = {"max_attempts": 3, "retry_condition": ["failed"]}
        rid2 = store.start_rollout("y", config=cfg).rollout_id
        store.update_attempt(rid2, "latest", status="failed")
        assert status_of(store, rid2) == "requeuing"
        store.update_rollout(rid2, status="succeeded")
        end = store.get_rollout_by_id(rid2).end_time
        store.update_attempt(rid2, "latest", metadata={"x": 1})
        after = store.get_rollout_by_id(rid2)
        assert (after.status, after.end_time) == ("succeeded", end)
        assert store.dequeue_rollout() is None

    def test_unchanged_propagation_keeps_end_time(self, store: Any) -> None:  # D12
        rid = store.start_rollout("x").rollout_id
        store.update_attempt(rid, "latest", status="succeeded")
        end = store.get_rollout_by_id(rid).end_time
        assert end is not None
        store.update_attempt(rid, "latest", status="succeeded")
        store.update_attempt(rid, "latest", status="succeeded")
        assert store.get_rollout_by_id(rid).end_time == end

    def test_errors(self, store: Any) -> None:  # D14: REF's wording, REF's order
        with pytest.raises(RolloutNotFound, match=r"^Rollout nonexistent not found$"):
            store.update_attempt("nonexistent", "latest", status="failed")
        rid = store.enqueue_rollout("x").rollout_id
        for aid in ("latest", "at-whatever"):
            with pytest.raises(NoAttempts, match=rf"^No attempts found for rollout {rid}$"):
                store.update_attempt(rid, aid, status="failed")
        store.start_attempt(rid)
        with pytest.raises(
            AttemptNotFound, match=rf"^Attempt attempt-missing not found for rollout {rid}$"
        ):
            store.update_attempt(rid, "attempt-missing", status="failed")

    def test_error_classes(self, store: Any) -> None:
        for call in (
            lambda: store.update_attempt("ro-x", "latest"),
            lambda: store.start_attempt("ro-x"),
            lambda: store.update_rollout("ro-x"),
        ):
            with pytest.raises(RolloutNotFound) as info:
                call()
            assert isinstance(info.value, ValueError) and isinstance(info.value, StoreError)
            assert info.value.rollout_id == "ro-x"

    def test_invalid_leaves_state_unchanged(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid = ar.rollout_id
        for kw in (
            {"status": "queuing"}, {"status": "cancelled"}, {"status": None},
            {"worker_id": 7}, {"last_heartbeat_time": "now"}, {"metadata": "m"},
            {"last_heartbeat_time": float("nan")}, {"status": "succeeded", "metadata": 1},
        ):
            refused(lambda kw=kw: store.update_attempt(rid, "latest", **kw), kw)
        assert store.get_latest_attempt(rid) == ar.attempt
        assert status_of(store, rid) == "preparing"

    def test_bad_attempt_id_type(self, store: Any) -> None:
        rid = store.start_rollout("x").rollout_id
        with pytest.raises(InvalidArgument):
            store.update_attempt(rid, None, status="failed")


# =========================================================================== cancelled (D2)
class TestCancelledIsSticky:
    def test_attempt_updates_and_spans_recorded_but_rollout_stays(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        cancelled = store.update_rollout(rid, status="cancelled")
        store.add_span(span(rid, aid, 1))
        a = store.get_latest_attempt(rid)
        assert a.status == "running" and a.last_heartbeat_time is not None
        assert status_of(store, rid) == "cancelled"
        a = store.update_attempt(rid, aid, status="succeeded")
        assert a.status == "succeeded"
        r = store.get_rollout_by_id(rid)
        assert (r.status, r.end_time) == ("cancelled", cancelled.end_time)
        assert [r.rollout_id for r in store.wait_for_rollouts(rollout_ids=[rid], timeout=0)] \
            == [rid]
        assert len(store.query_spans(rid)) == 1

    def test_failed_with_retry_does_not_requeue(self, store: Any) -> None:
        ar = claimed(store, config={"max_attempts": 3, "retry_condition": ["failed"]})
        store.update_rollout(ar.rollout_id, status="cancelled")
        store.update_attempt(ar.rollout_id, "latest", status="failed")
        assert status_of(store, ar.rollout_id) == "cancelled"
        assert store.dequeue_rollout() is None

    def test_watchdog_leaves_it(self, store: Any) -> None:
        rid = store.start_rollout("x").rollout_id
        store.update_rollout(rid, status="cancelled")
        store.update_rollout(rid, config=EXPIRED)
        assert status_of(store, rid) == "cancelled"
        assert store.get_latest_attempt(rid).status == "preparing"

    def test_reopened_by_start_attempt_or_update_rollout(self, store: Any) -> None:
        rid = store.start_rollout("x").rollout_id
        store.update_rollout(rid, status="cancelled")
        store.start_attempt(rid)
        store.update_attempt(rid, "latest", status="succeeded")
        assert status_of(store, rid) == "succeeded"
        rid2 = store.start_rollout("y").rollout_id
        store.update_rollout(rid2, status="cancelled")
        store.update_rollout(rid2, status="running")
        store.update_attempt(rid2, "latest", status="failed")
        assert status_of(store, rid2) == "failed"


# =========================================================================== spans
class TestSequenceIds:
    def test_counter_per_rollout_shared_by_attempts(self, store: Any) -> None:
        a = store.start_rollout("a")
        b = store.start_rollout("b")
        ra, aa = a.rollout_id, a.attempt.attempt_id
        assert [store.get_next_span_sequence_id(ra, aa) for _ in range(3)] == [1, 2, 3]
        assert store.get_next_span_sequence_id(b.rollout_id, b.attempt.attempt_id) == 1
        a2 = store.start_attempt(ra).attempt.attempt_id
        assert store.get_next_span_sequence_id(ra, a2) == 4

    def test_unknown_ids_just_count(self, store: Any) -> None:  # REF Q11
        assert store.get_next_span_sequence_id("ro-unknown", "attempt-does-not-exist") == 1
        assert store.get_next_span_sequence_id("ro-unknown", "other") == 2
        assert store.statistics()["total_rollouts"] == 0

    def test_interleaved_with_spans(self, store: Any) -> None:  # REF test_span_sequence_gen.
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        assert store.get_next_span_sequence_id(rid, aid) == 1
        store.add_span(span(rid, aid, store.get_next_span_sequence_id(rid, aid)))
        assert store.get_next_span_sequence_id(rid, aid) == 3
        store.add_span(span(rid, aid, 100))  # explicit: counter := max
        assert store.get_next_span_sequence_id(rid, "another") == 101
        store.add_span(span(rid, aid, 7))  # lower: no effect on the counter
        assert store.get_next_span_sequence_id(rid, aid) == 102

    def test_many(self, store: Any) -> None:
        assert store.get_many_span_sequence_ids([]) == []
        got = store.get_many_span_sequence_ids(
            [("ro-a", "x"), ("ro-b", "y"), ("ro-a", "x"), ("ro-a", "z")]
        )
        assert got == [1, 1, 2, 3]
        assert store.get_many_span_sequence_ids([["ro-b", "y"]]) == [2]

    def test_many_invalid(self, store: Any) -> None:
        for bad in (["ro-a"], [("ro-a",)], [("ro-a", 1)], "ro-a", [("a", "b", "c")],
                    [("ro-a", "x"), ("ro-a", None)]):
            refused(lambda bad=bad: store.get_many_span_sequence_ids(bad), bad)
        assert store.get_next_span_sequence_id("ro-a", "x") == 1  # nothing allocated


class TestAddSpan:
    def test_stored_and_returned(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        s = span(rid, aid, 1, "llm-call", attributes={"tokens": 3, "tags": ["a", "b"]},
                 start_time=1.0, end_time=2.0, parent_id="0" * 16)
        out = store.add_span(s)
        assert out == s
        assert store.query_spans(rid) == [s]
        assert store.statistics()["total_spans"] == 1

    def test_defaults_and_random_ids(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        s1, s2 = span(rid, aid, 1), span(rid, aid, 1)
        assert (s1.trace_id, s1.span_id) != (s2.trace_id, s2.span_id)
        store.add_span(s1)
        store.add_span(s2)
        assert store.query_spans(rid) == [s1, s2]

    def test_dict_accepted(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        out = store.add_span({"rollout_id": rid, "attempt_id": aid, "sequence_id": 1,
                              "name": "d", "span_id": "ab" * 8})
        assert type(out) is Span and out.span_id == "ab" * 8 and out.name == "d"
        assert store.query_spans(rid) == [out]

    def test_heartbeat_and_revival(self, store: Any) -> None:
        ar = claimed(store)
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        before = time.time()
        store.add_span(span(rid, aid, 1))
        a = store.get_latest_attempt(rid)
        assert a.status == "running"
        assert a.last_heartbeat_time is not None and a.last_heartbeat_time >= before - 1
        assert status_of(store, rid) == "running"
        store.add_span(span(rid, aid, 2))
        assert store.get_latest_attempt(rid).status == "running"

    def test_span_time_is_not_heartbeat(self, store: Any) -> None:
        ar = store.start_rollout("x")
        store.add_span(span(ar.rollout_id, ar.attempt.attempt_id, 1, start_time=5.0,
                            end_time=6.0))
        hb = store.get_latest_attempt(ar.rollout_id).last_heartbeat_time
        assert hb is not None and hb > 1000.0  # wall clock, not the span's own time

    def test_revives_unresponsive_latest_and_takes_it_out_of_the_queue(self, store: Any
                                                                       ) -> None:  # D4
        ar = claimed(store, config={"max_attempts": 2, "retry_condition": ["unresponsive"]})
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        store.update_attempt(rid, aid, status="unresponsive")
        assert status_of(store, rid) == "requeuing"
        store.add_span(span(rid, aid, 1))
        assert store.get_latest_attempt(rid).status == "running"
        assert status_of(store, rid) == "running"
        assert store.dequeue_rollout() is None
        store.update_attempt(rid, aid, status="succeeded")
        assert status_of(store, rid) == "succeeded"

    @pytest.mark.parametrize("attempt_status", ["timeout", "failed", "succeeded"])
    def test_finished_attempt_span_is_only_a_heartbeat(self, store: Any,
                                                      attempt_status: str) -> None:  # D4
        cfg = {"max_attempts": 2, "retry_condition": ["timeout", "failed"]}
        ar = claimed(store, config=cfg)
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        store.update_attempt(rid, aid, status=attempt_status)
        before = store.get_rollout_by_id(rid)
        store.add_span(span(rid, aid, 1))
        a = store.get_latest_attempt(rid)
        assert a.status == attempt_status
        assert a.last_heartbeat_time is not None
        assert store.get_rollout_by_id(rid) == before
        assert len(store.query_spans(rid)) == 1
        if before.status == "requeuing":
            assert store.dequeue_rollout().rollout_id == rid

    def test_stale_attempt_revived_but_rollout_unchanged(self, store: Any) -> None:
        ar = claimed(store, config={"max_attempts": 2, "retry_condition": ["unresponsive"]})
        rid, old = ar.rollout_id, ar.attempt.attempt_id
        store.update_attempt(rid, old, status="unresponsive")
        assert store.dequeue_rollout().attempt.sequence_id == 2
        store.add_span(span(rid, old, 1))
        attempts = store.query_attempts(rid)
        assert [a.status for a in attempts] == ["running", "preparing"]
        assert status_of(store, rid) == "preparing"

    def test_running_rollout_queued_manually_is_revived(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid = ar.rollout_id
        store.update_rollout(rid, status="queuing")
        store.add_span(span(rid, ar.attempt.attempt_id, 1))
        assert status_of(store, rid) == "running"
        assert store.dequeue_rollout() is None

    def test_terminal_rollout_not_revived(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid = ar.rollout_id
        store.update_rollout(rid, status="failed")
        store.add_span(span(rid, ar.attempt.attempt_id, 1))
        assert status_of(store, rid) == "failed"
        assert store.get_latest_attempt(rid).status == "running"

    def test_unknown_rollout_or_attempt(self, store: Any) -> None:
        with pytest.raises(RolloutNotFound, match=r"^Rollout ro-nope not found$"):
            store.add_span(span("ro-nope", "at-x", 1))
        rid = store.start_rollout("x").rollout_id
        with pytest.raises(AttemptNotFound,
                           match=rf"^Attempt attempt-missing not found for rollout {rid}$"):
            store.add_span(span(rid, "attempt-missing", 5))
        assert store.query_spans(rid) == []
        assert store.statistics()["total_spans"] == 0
        # D1: a refused span changes nothing, not even the counter.
        assert store.get_next_span_sequence_id(rid, "x") == 1
        assert store.get_latest_attempt(rid).status == "preparing"

    def test_invalid_span(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        for bad in (
            span(rid, aid, -1),
            span(rid, aid, 1.5),  # type: ignore[arg-type]
            span(rid, aid, True),  # type: ignore[arg-type]
            span(rid, aid, 1, attributes=[1]),
            span(rid, aid, 1, events={}),
            span(rid, aid, 1, start_time="t"),
            span(rid, aid, 1, span_id=None),
            span(rid, aid, 1, context=[]),
            {"rollout_id": rid, "attempt_id": aid, "sequence_id": 1, "name": "n", "colour": 1},
            "a span",
        ):
            refused(lambda bad=bad: store.add_span(bad), bad)
            refused(lambda bad=bad: store.add_many_spans([span(rid, aid, 1), bad]), bad)
        assert store.query_spans(rid) == []
        assert store.get_latest_attempt(ar.rollout_id).status == "preparing"

    def test_idempotent(self, store: Any) -> None:  # D7
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        first = span(rid, aid, 1, "first")
        assert store.add_span(first) == first
        hb = store.update_attempt(rid, aid, status="unresponsive", last_heartbeat_time=5.0)
        status = status_of(store, rid)
        retry = span(rid, aid, 50, "retry", trace_id=first.trace_id, span_id=first.span_id)
        out = store.add_span(retry)
        assert out == first  # the stored one comes back
        assert store.query_spans(rid) == [first]
        assert store.statistics()["total_spans"] == 1
        # ... and nothing else happened: no heartbeat, no revival, no counter bump.
        assert store.get_latest_attempt(rid) == hb
        assert status_of(store, rid) == status
        assert store.get_next_span_sequence_id(rid, aid) == 2

    def test_same_span_id_on_other_attempt_is_distinct(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid = ar.rollout_id
        a2 = store.start_attempt(rid).attempt.attempt_id
        store.add_span(span(rid, ar.attempt.attempt_id, 1, span_id="1" * 16))
        store.add_span(span(rid, a2, 2, span_id="1" * 16))
        other = store.start_rollout("y")
        store.add_span(span(other.rollout_id, other.attempt.attempt_id, 1, span_id="1" * 16))
        assert len(store.query_spans(rid)) == 2
        assert store.statistics()["total_spans"] == 3


class TestAddManySpans:
    def test_batch(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        spans = [span(rid, aid, i, f"s{i}") for i in (1, 2, 3)]
        out = store.add_many_spans(spans)
        assert out == spans
        assert store.query_spans(rid) == spans
        assert store.get_latest_attempt(rid).status == "running"
        assert store.add_many_spans([]) == []

    def test_duplicates_within_and_across_batches(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        s = span(rid, aid, 1, "orig")
        dup = span(rid, aid, 2, "dup", trace_id=s.trace_id, span_id=s.span_id)
        assert store.add_many_spans([s, dup]) == [s, s]
        assert store.add_many_spans([dup]) == [s]
        assert store.query_spans(rid) == [s]

    def test_all_or_nothing(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        with pytest.raises(AttemptNotFound):
            store.add_many_spans([span(rid, aid, 1), span(rid, "at-missing", 2)])
        with pytest.raises(RolloutNotFound):
            store.add_many_spans([span(rid, aid, 1), span("ro-missing", aid, 2)])
        with pytest.raises(InvalidArgument):
            store.add_many_spans([span(rid, aid, 1), span(rid, aid, -2)])
        with pytest.raises(InvalidArgument):
            store.add_many_spans(span(rid, aid, 1))
        assert store.query_spans(rid) == []
        assert store.get_latest_attempt(rid).status == "preparing"
        assert store.get_next_span_sequence_id(rid, aid) == 1


class TestQuerySpans:
    def test_sorted_by_sequence_ties_in_arrival_order(self, store: Any) -> None:  # D6
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        order = [(5, "a"), (2, "b"), (5, "c"), (1, "d"), (2, "e"), (9, "f")]
        for seq, name in order:
            store.add_span(span(rid, aid, seq, name))
        assert [s.name for s in store.query_spans(rid)] == ["d", "b", "e", "a", "c", "f"]

    def test_by_attempt_and_latest(self, store: Any) -> None:  # D6 vs REF Q6
        ar = store.start_rollout("x")
        rid, a1 = ar.rollout_id, ar.attempt.attempt_id
        store.add_span(span(rid, a1, 1, "one"))
        assert [s.name for s in store.query_spans(rid, "latest")] == ["one"]
        a2 = store.start_attempt(rid).attempt.attempt_id
        assert store.query_spans(rid, "latest") == []  # latest = attempt 2, no spans yet
        store.add_span(span(rid, a2, 2, "two"))
        store.add_span(span(rid, a1, 3, "stale"))  # a stale attempt does not "win"
        assert [s.name for s in store.query_spans(rid, "latest")] == ["two"]
        assert [s.name for s in store.query_spans(rid, a1)] == ["one", "stale"]
        assert [s.name for s in store.query_spans(rid, a2)] == ["two"]
        assert [s.name for s in store.query_spans(rid)] == ["one", "two", "stale"]
        assert [s.name for s in store.query_spans(rid, None)] == ["one", "two", "stale"]
        assert store.query_spans(rid, "at-unknown") == []

    def test_unknown_rollout(self, store: Any) -> None:  # REF Q11
        assert store.query_spans("ro-unknown") == []
        assert store.query_spans("ro-unknown", "latest") == []
        rid = store.enqueue_rollout("x").rollout_id
        assert store.query_spans(rid, "latest") == []

    def test_invalid(self, store: Any) -> None:
        with pytest.raises(InvalidArgument):
            store.query_spans(5)
        with pytest.raises(InvalidArgument):
            store.query_spans("ro-x", 5)


# =========================================================================== watchdog
class TestWatchdogWithoutClock:
    """Negative limits are due at once, so the watchdog rules show without any clock."""

    def test_timeout_without_retry(self, store: Any) -> None:
        rid = store.start_rollout("x", config=EXPIRED).rollout_id
        a = store.get_latest_attempt(rid)  # a watchdog read
        assert a.status == "timeout" and a.end_time is None  # REF: timeout has no end_time
        r = store.get_rollout_by_id(rid)
        assert r.status == "failed" and r.end_time is not None

    def test_timeout_with_retry_requeues_then_fails(self, store: Any) -> None:
        cfg = {"timeout_seconds": -1.0, "max_attempts": 2, "retry_condition": ["timeout"]}
        rid = store.enqueue_rollout("x", config=cfg).rollout_id
        first = store.dequeue_rollout()
        assert first is not None and first.status == "preparing"
        assert status_of(store, rid) == "requeuing"
        second = store.dequeue_rollout()
        assert second is not None and second.attempt.sequence_id == 2
        assert status_of(store, rid) == "failed"
        assert [a.status for a in store.query_attempts(rid)] == ["timeout", "timeout"]
        assert store.dequeue_rollout() is None

    def test_unresponsive_without_heartbeat(self, store: Any) -> None:
        cfg = {"unresponsive_seconds": -1.0, "max_attempts": 2,
               "retry_condition": ["unresponsive"]}
        rid = store.start_rollout("x", config=cfg).rollout_id
        assert store.get_latest_attempt(rid).status == "unresponsive"
        assert status_of(store, rid) == "requeuing"

    def test_unresponsive_with_heartbeat(self, store: Any) -> None:
        ar = store.start_rollout("x", config={"unresponsive_seconds": -1.0})
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        store.add_span(span(rid, aid, 1))  # no watchdog in add_span
        assert store.get_latest_attempt(rid).status == "unresponsive"
        assert status_of(store, rid) == "failed"

    def test_timeout_wins_over_unresponsive(self, store: Any) -> None:
        cfg = {"timeout_seconds": -1.0, "unresponsive_seconds": -1.0}
        rid = store.start_rollout("x", config=cfg).rollout_id
        assert store.get_latest_attempt(rid).status == "timeout"

    def test_heartbeat_promotes_preparing(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid = ar.rollout_id
        store.update_attempt(rid, "latest", last_heartbeat_time=time.time())
        assert store.get_latest_attempt(rid).status == "running"  # rule 3a
        assert status_of(store, rid) == "running"

    def test_repair(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid = ar.rollout_id
        store.update_attempt(rid, "latest", status="succeeded")
        store.update_rollout(rid, status="running")
        assert status_of(store, rid) == "succeeded"  # rule 1

    def test_queued_and_terminal_rollouts_not_checked(self, store: Any) -> None:
        rid = store.enqueue_rollout("x", config=EXPIRED).rollout_id
        assert status_of(store, rid) == "queuing"
        done = store.start_rollout("y").rollout_id
        store.update_rollout(done, status="succeeded")
        store.update_rollout(done, config=EXPIRED)
        assert store.get_latest_attempt(done).status == "preparing"
        assert status_of(store, done) == "succeeded"

    def test_non_latest_attempt_not_checked(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid = ar.rollout_id
        store.start_attempt(rid)
        store.update_attempt(rid, "latest", status="running")
        store.update_rollout(rid, config=EXPIRED)
        attempts = store.query_attempts(rid)
        assert [a.status for a in attempts] == ["preparing", "timeout"]

    def test_config_change_applies(self, store: Any) -> None:
        rid = store.start_rollout("x").rollout_id
        assert store.get_latest_attempt(rid).status == "preparing"
        store.update_rollout(rid, config={"timeout_seconds": -5})
        assert store.get_latest_attempt(rid).status == "timeout"
        assert status_of(store, rid) == "failed"

    def test_wait_sees_timeout(self, store: Any) -> None:
        cfg = {"timeout_seconds": -1.0}
        ids = [store.start_rollout(i, config=cfg).rollout_id for i in range(3)]
        got = store.wait_for_rollouts(rollout_ids=ids, timeout=10)
        assert [r.rollout_id for r in got] == ids


# =========================================================================== resources
def llm(endpoint: str = "http://localhost:8000/v1", model: str = "m") -> LLM:
    return LLM(endpoint=endpoint, model=model, sampling_parameters={"temperature": 0.7})


class TestResources:
    def test_empty(self, store: Any) -> None:
        assert store.get_latest_resources() is None
        assert store.get_resources_by_id("rs-000000000000") is None

    def test_add(self, store: Any) -> None:
        res = {"main_llm": llm(), "prompt": PromptTemplate("Hi {name}", engine="f-string")}
        up = store.add_resources(res)
        assert type(up) is ResourcesUpdate
        assert RESOURCES_ID.match(up.resources_id) and len(up.resources_id) == 15
        assert up.version == 1 and up.create_time == up.update_time
        assert up.resources == res
        assert store.get_resources_by_id(up.resources_id) == up
        assert store.get_latest_resources() == up
        second = store.add_resources({})  # empty is valid
        assert second.resources_id != up.resources_id
        assert store.get_latest_resources() == second
        assert store.statistics()["total_resources"] == 2

    def test_update_upserts_and_versions(self, store: Any) -> None:
        first = store.update_resources("v1", {"llm": llm(model="a")})  # REF: upsert
        assert (first.resources_id, first.version) == ("v1", 1)
        other = store.add_resources({"llm": llm(model="b")})
        assert store.get_latest_resources().resources_id == other.resources_id
        again = store.update_resources("v1", {"llm": llm(model="c")})
        assert again.version == 2
        assert again.create_time == first.create_time
        assert again.update_time >= first.update_time
        assert again.resources["llm"].model == "c"
        # "Latest" is the most recently written, not the most recently created.
        assert store.get_latest_resources() == again
        assert store.get_resources_by_id("v1") == again
        third = store.update_resources(other.resources_id, {})
        assert third.version == 2 and store.get_latest_resources() == third
        assert store.statistics()["total_resources"] == 2

    def test_from_dicts(self, store: Any) -> None:
        up = store.add_resources({
            "a": {"resource_type": "llm", "endpoint": "http://x", "model": "m"},
            "b": {"resource_type": "proxy_llm", "endpoint": "http://y/v1", "model": "n"},
            "c": {"resource_type": "prompt_template", "template": "{x}", "engine": "jinja"},
        })
        got = store.get_resources_by_id(up.resources_id).resources
        assert type(got["a"]) is LLM and got["a"] == LLM("http://x", "m")
        assert type(got["b"]) is ProxyLLM and got["b"].resource_type == "proxy_llm"
        assert type(got["c"]) is PromptTemplate and got["c"].engine == "jinja"

    def test_invalid(self, store: Any) -> None:
        for bad in (
            {"a": {"resource_type": "vector_db"}},
            {"a": {"resource_type": "llm", "endpoint": "e"}},  # no model
            {"a": 42},
            {1: llm()},
            [llm()],
        ):
            refused(lambda bad=bad: store.add_resources(bad), bad)
            refused(lambda bad=bad: store.update_resources("v1", bad), bad)
        refused(lambda: store.update_resources(None, {}), "resources_id None")
        assert store.get_latest_resources() is None
        assert store.statistics()["total_resources"] == 0

    def test_new_rollouts_take_latest_at_creation(self, store: Any) -> None:  # REF Q12
        assert store.enqueue_rollout("x").resources_id is None
        first = store.add_resources({"llm": llm()}).resources_id
        r1 = store.enqueue_rollout("a")
        r2 = store.start_rollout("b", resources_id="")
        r3 = store.enqueue_many_rollouts([{"input": "c"}])[0]
        assert r1.resources_id == r2.resources_id == r3.resources_id == first
        explicit = store.enqueue_rollout("d", resources_id="res-123")
        assert explicit.resources_id == "res-123"
        second = store.update_resources("v2", {}).resources_id
        # Not re-resolved at dequeue.
        got = store.dequeue_many_rollouts(2)
        assert [g.resources_id for g in got] == [None, first]
        assert store.enqueue_rollout("e").resources_id == second


# =========================================================================== ops
class TestOps:
    def test_ping(self, store: Any) -> None:
        info = store.ping()
        assert {"name", "version", "pid", "time", "uptime"} <= set(info)
        assert info["name"] == "mpstore"
        assert isinstance(info["pid"], int)
        assert abs(info["time"] - time.time()) < 60
        assert info["uptime"] >= 0

    def test_statistics(self, store: Any) -> None:
        stats = store.statistics()
        assert STAT_KEYS <= set(stats)
        assert all(stats[k] == 0 for k in STAT_KEYS - {"uptime"})
        assert stats["uptime"] >= 0
        ar = store.start_rollout("x")
        store.enqueue_rollout("y")
        store.enqueue_rollout("z")
        store.start_attempt(ar.rollout_id)
        store.add_span(span(ar.rollout_id, ar.attempt.attempt_id, 1))
        store.add_span(span(ar.rollout_id, ar.attempt.attempt_id, 2))
        store.add_resources({})
        stats = store.statistics()
        assert stats["total_rollouts"] == 3
        assert stats["total_attempts"] == 2
        assert stats["total_spans"] == 2
        assert stats["total_resources"] == 1
        assert stats["queue_length"] == 2
        assert stats["span_bytes"] > 0
        store.dequeue_rollout()
        assert store.statistics()["queue_length"] == 1
        assert store.statistics()["total_attempts"] == 3


# =========================================================================== copies (D10)
class TestNoAliasing:
    def test_inputs_are_copied(self, store: Any) -> None:
        payload = {"q": [1, 2]}
        meta = {"tags": ["a"]}
        cfg = RolloutConfig(max_attempts=2, retry_condition=["failed"])
        r = store.enqueue_rollout(payload, metadata=meta, config=cfg)
        payload["q"].append(3)
        meta["tags"].append("b")
        cfg.retry_condition.append("timeout")
        cfg.max_attempts = 9
        got = store.get_rollout_by_id(r.rollout_id)
        assert got.input == {"q": [1, 2]}
        assert got.metadata == {"tags": ["a"]}
        assert got.config == RolloutConfig(max_attempts=2, retry_condition=["failed"])

    def test_outputs_are_copies(self, store: Any) -> None:
        ar = store.start_rollout({"q": [1]}, metadata={"m": [1]},
                                 config={"retry_condition": ["failed"], "max_attempts": 2})
        rid = ar.rollout_id
        for r in (ar, store.get_rollout_by_id(rid), store.query_rollouts()[0],
                  store.update_rollout(rid)):
            r.input["q"].append(2)
            r.metadata["m"].append(2)
            r.config.retry_condition.append("timeout")
            r.status = "succeeded"
        ar.attempt.status = "failed"
        again = store.get_rollout_by_id(rid)
        assert again.input == {"q": [1]} and again.metadata == {"m": [1]}
        assert again.config.retry_condition == ["failed"]
        assert again.status == "preparing"
        assert store.get_latest_attempt(rid).status == "preparing"

    def test_attempt_copies(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        meta = {"k": [1]}
        a = store.update_attempt(rid, aid, metadata=meta)
        meta["k"].append(2)
        a.metadata["k"].append(3)
        store.query_attempts(rid)[0].metadata["k"].append(4)
        store.query_attempts(rid).clear()
        store.get_latest_attempt(rid).metadata["k"].append(5)
        assert store.get_latest_attempt(rid).metadata == {"k": [1]}
        assert len(store.query_attempts(rid)) == 1

    def test_span_copies(self, store: Any) -> None:
        ar = store.start_rollout("x")
        rid, aid = ar.rollout_id, ar.attempt.attempt_id
        s = span(rid, aid, 1, attributes={"list": [1]}, events=[{"name": "e"}])
        store.add_span(s)
        s.attributes["list"].append(2)
        s.events.append({"name": "f"})
        s.name = "renamed"
        got = store.query_spans(rid)
        got[0].attributes["list"].append(3)
        got[0].events.clear()
        got.clear()
        again = store.query_spans(rid)
        assert len(again) == 1
        assert again[0].name == "s"
        assert again[0].attributes == {"list": [1]}
        assert again[0].events == [{"name": "e"}]

    def test_resources_copies(self, store: Any) -> None:
        res = {"llm": llm()}
        up = store.add_resources(res)
        res["llm"].sampling_parameters["temperature"] = 0.0
        res["other"] = llm()
        up.resources["llm"].model = "changed"
        store.get_latest_resources().resources.clear()
        got = store.get_resources_by_id(up.resources_id)
        assert list(got.resources) == ["llm"]
        assert got.resources["llm"] == llm()

    def test_statistics_copies(self, store: Any) -> None:
        store.statistics()["total_rollouts"] = 99
        assert store.statistics()["total_rollouts"] == 0


# =========================================================================== signatures
P = "positional"
K = "keyword"
#: SPEC §3: in process and remote expose the same methods with the same signatures.
#: (name, kind, default) per parameter; ``...`` marks a required one.
SIGNATURES: dict[str, list[tuple[str, str, Any]]] = {
    "start_rollout": [("input", P, ...), ("mode", P, None), ("resources_id", P, None),
                      ("config", P, None), ("metadata", P, None), ("worker_id", P, None)],
    "enqueue_rollout": [("input", P, ...), ("mode", P, None), ("resources_id", P, None),
                        ("config", P, None), ("metadata", P, None)],
    "enqueue_many_rollouts": [(None, P, ...)],
    "dequeue_rollout": [("worker_id", P, None), ("wait", K, 0.0)],
    "dequeue_many_rollouts": [("limit", P, ...), ("worker_id", P, None)],
    "start_attempt": [("rollout_id", P, ...), ("worker_id", P, None)],
    # agent-lightning 0.3.0's order; status and rollout_ids are the older names.
    "query_rollouts": [("status_in", K, None), ("rollout_id_in", K, None),
                       ("rollout_id_contains", K, None), ("filter_logic", K, "and"),
                       ("sort_by", K, None), ("sort_order", K, "asc"), ("limit", K, -1),
                       ("offset", K, 0), ("status", K, None), ("rollout_ids", K, None)],
    "get_rollout_by_id": [("rollout_id", P, ...)],
    "query_attempts": [("rollout_id", P, ...), ("sort_by", K, "sequence_id"),
                       ("sort_order", K, "asc"), ("limit", K, -1), ("offset", K, 0)],
    "get_latest_attempt": [("rollout_id", P, ...)],
    "wait_for_rollouts": [("rollout_ids", K, ...), ("timeout", K, None)],
    "update_rollout": [("rollout_id", P, ...), ("input", P, UNSET), ("mode", P, UNSET),
                       ("resources_id", P, UNSET), ("status", P, UNSET), ("config", P, UNSET),
                       ("metadata", P, UNSET)],
    "update_attempt": [("rollout_id", P, ...), ("attempt_id", P, ...), ("status", P, UNSET),
                       ("worker_id", P, UNSET), ("last_heartbeat_time", P, UNSET),
                       ("metadata", P, UNSET)],
    "get_next_span_sequence_id": [("rollout_id", P, ...), ("attempt_id", P, ...)],
    "get_many_span_sequence_ids": [(None, P, ...)],
    "add_span": [("span", P, ...)],
    "add_many_spans": [(None, P, ...)],
    "query_spans": [("rollout_id", P, ...), ("attempt_id", P, None), ("trace_id", K, None),
                    ("trace_id_contains", K, None), ("span_id", K, None),
                    ("span_id_contains", K, None), ("parent_id", K, None),
                    ("parent_id_contains", K, None), ("name", K, None),
                    ("name_contains", K, None), ("filter_logic", K, "and"), ("limit", K, -1),
                    ("offset", K, 0), ("sort_by", K, "sequence_id"), ("sort_order", K, "asc")],
    "add_otel_span": [("rollout_id", P, ...), ("attempt_id", P, ...), ("readable_span", P, ...),
                      ("sequence_id", P, None)],
    "query_resources": [("resources_id", K, None), ("resources_id_contains", K, None),
                        ("sort_by", K, None), ("sort_order", K, "asc"), ("limit", K, -1),
                        ("offset", K, 0)],
    "query_workers": [("status_in", K, None), ("worker_id_contains", K, None),
                      ("filter_logic", K, "and"), ("sort_by", K, None), ("sort_order", K, "asc"),
                      ("limit", K, -1), ("offset", K, 0)],
    "get_worker_by_id": [("worker_id", P, ...)],
    "update_worker": [("worker_id", P, ...), ("heartbeat_stats", P, UNSET)],
    "add_resources": [("resources", P, ...)],
    "update_resources": [("resources_id", P, ...), ("resources", P, ...)],
    "get_resources_by_id": [("resources_id", P, ...)],
    "get_latest_resources": [],
    "ping": [],
    "statistics": [],
}


def test_signatures(store: Any) -> None:
    for name in sorted(SIGNATURES):
        check_signature(store, name)


def check_signature(store: Any, name: str) -> None:
    params = list(inspect.signature(getattr(store, name)).parameters.values())
    expected = SIGNATURES[name]
    # Extra keyword-only parameters with defaults are allowed (e.g. dequeue_many's wait).
    extra = params[len(expected):]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extra), extra
    assert len(params) >= len(expected)
    for param, (pname, kind, default) in zip(params, expected, strict=False):
        if pname is not None:
            assert param.name == pname, (name, param)
        if kind == P:
            assert param.kind is param.POSITIONAL_OR_KEYWORD, (name, param)
        else:
            assert param.kind is param.KEYWORD_ONLY, (name, param)
        if default is ...:
            assert param.default is param.empty, (name, param)
        elif default is UNSET:
            assert param.default is UNSET, (name, param)
        else:
            assert param.default == default, (name, param)


def test_positional_calls(store: Any) -> None:
    ar = store.start_rollout({"x": 1}, "train", "rs-a", {"max_attempts": 2}, {"m": 1}, "w")
    rid = ar.rollout_id
    assert (ar.mode, ar.resources_id, ar.config.max_attempts, ar.metadata,
            ar.attempt.worker_id) == ("train", "rs-a", 2, {"m": 1}, "w")
    r = store.update_rollout(rid, UNSET, UNSET, UNSET, "running")
    assert r.status == "running" and r.input == {"x": 1}
    a = store.update_attempt(rid, "latest", "succeeded", "w2")
    assert (a.status, a.worker_id) == ("succeeded", "w2")
    assert store.query_spans(rid, "latest") == []


# =========================================================================== D1 on creates/claims
#: Each must raise InvalidArgument and create or claim nothing (D1).
BAD_CREATES_AND_CLAIMS: dict[str, Callable[[Any], Any]] = {
    "mode prod": lambda s: s.enqueue_rollout("x", mode="prod"),
    "max_attempts 0": lambda s: s.enqueue_rollout("x", config={"max_attempts": 0}),
    "RolloutConfig max_attempts 0":
        lambda s: s.enqueue_rollout("x", config=RolloutConfig(max_attempts=0)),
    "retry_condition str": lambda s: s.enqueue_rollout("x", config={"retry_condition": "failed"}),
    "timeout nan": lambda s: s.enqueue_rollout("x", config={"timeout_seconds": float("nan")}),
    "metadata list": lambda s: s.enqueue_rollout("x", metadata=["not", "a", "dict"]),
    "resources_id int": lambda s: s.enqueue_rollout("x", resources_id=12),
    "start worker_id int": lambda s: s.start_rollout("x", worker_id=7),
    "max_attempts bool": lambda s: s.start_rollout("x", config={"max_attempts": True}),
    "dequeue worker_id int": lambda s: s.dequeue_rollout(worker_id=7),
    "dequeue wait str": lambda s: s.dequeue_rollout(wait="long"),
    "dequeue_many worker_id list": lambda s: s.dequeue_many_rollouts(1, worker_id=["w"]),
    "start_attempt worker_id float":
        lambda s: s.start_attempt(s.query_rollouts()[0].rollout_id, worker_id=3.5),
    "start_attempt None": lambda s: s.start_attempt(None),
}


def test_invalid_create_or_claim_changes_nothing(store: Any) -> None:
    rid = store.enqueue_rollout("existing").rollout_id
    before = store.statistics()
    for case, call in BAD_CREATES_AND_CLAIMS.items():
        refused(lambda call=call: call(store), case)
    after = store.statistics()
    for key in ("total_rollouts", "total_attempts", "queue_length"):
        assert after[key] == before[key], key
    assert store.query_attempts(rid) == []
    assert drain(store) == [rid]
