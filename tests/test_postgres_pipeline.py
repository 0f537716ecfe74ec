"""The server loop's add_span pipeline (:mod:`mpstore.postgres.pipeline`), driven here by a
small epoll loop of its own against a real PostgreSQL: what it answers itself, what it hands
to the full path (FALLBACK), several spans in one transaction, and a lost connection.

Through real servers, every add_span of the contract suite and of the fault tests takes it.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mpstore import Span
from mpstore.manager.pipelined import FALLBACK, RESULT
from tests import pg


@pytest.fixture
def store(postgres_server: str, postgres_shared: str) -> Iterator[Any]:
    from mpstore.postgres import PostgresStore

    with pg.fresh_database(postgres_server) as url:
        store = PostgresStore(url)
        try:
            yield store
        finally:
            store.close()


class Loop:
    """The part of the server loop a pipeline sees: register/unregister, rounds, flush."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.epoll = select.epoll()
        self.ready: dict[int, Any] = {}
        self.answers: list[tuple[str, Any]] = []
        self.by_span: dict[tuple[str, str], str] = {}  # (rollout, span id) -> kind
        self.values: dict[tuple[str, str], Any] = {}  # the same keys -> the answer's value
        pipeline.attach(self._register, self._unregister)

    def _register(self, fd: int, ready: Any) -> None:
        self.epoll.register(fd, select.EPOLLIN)
        self.ready[fd] = ready

    def _unregister(self, fd: int) -> None:
        with contextlib.suppress(OSError):  # libpq may have closed it: epoll forgot it
            self.epoll.unregister(fd)
        del self.ready[fd]

    def submit(self, span: Any) -> bool:
        return self.call("add_span", (span,), {}, None, (span.rollout_id, span.span_id))

    def call(self, name: str, args: tuple[Any, ...], kwds: dict[str, Any], request: Any,
             key: tuple[str, str] | None = None) -> bool:
        """Offer a call; its answer is appended to ``answers`` (and kept under ``key``)."""
        def done(kind: str, value: Any) -> None:
            self.answers.append((kind, value))
            if key is not None:
                self.by_span[key], self.values[key] = kind, value

        return bool(self.pipeline.submit(name, args, kwds, request, done))

    def submit_when_connected(self, span: Any) -> None:
        """Submit once the pipeline's connection (made by a thread) is there."""
        self.call_when_connected("add_span", (span,), {}, None, (span.rollout_id, span.span_id))

    def call_when_connected(self, *call: Any) -> None:
        """:meth:`call` once the pipeline's connection (made by a thread) is there."""
        deadline = time.monotonic() + 30.0
        while not self.call(*call):
            assert time.monotonic() < deadline, "the pipeline never connected"
            threading.Event().wait(0.01)

    def run_until(self, answers: int) -> list[tuple[str, Any]]:
        """Flush, then serve ready descriptors until ``answers`` answers came."""
        self.pipeline.flush()
        deadline = time.monotonic() + 30.0
        while len(self.answers) < answers:
            assert time.monotonic() < deadline, f"answers so far: {self.answers}"
            for fd, mask in self.epoll.poll(1.0):
                self.ready[fd](mask)
        return self.answers


def _connected(store: Any) -> tuple[Any, Loop]:
    """A claimed rollout, and a loop whose pipeline has answered one span of it."""
    claimed = _claimed(store)
    loop = Loop(store.pipeline)
    loop.submit_when_connected(_span(claimed, 1))
    assert loop.run_until(1)[0][0] == RESULT
    return claimed, loop


def _claimed(store: Any) -> Any:
    store.enqueue_rollout({"q": 1})
    return store.dequeue_rollout()  # the claim leaves its row in the store's cache


def _span(claimed: Any, n: int, rollout_id: str | None = None) -> Span:
    return Span(rollout_id=rollout_id or claimed.rollout_id,
                attempt_id=claimed.attempt.attempt_id, sequence_id=n, name="work",
                span_id=f"s{n}", attributes={"n": n})


def test_spans_of_one_round_commit_together_and_a_stale_one_falls_back(store: Any) -> None:
    a, b = _claimed(store), _claimed(store)
    loop = Loop(store.pipeline)
    loop.submit_when_connected(_span(a, 1))
    assert loop.submit(_span(a, 2))  # built on the same cached row as a's first: stale
    assert loop.submit(_span(b, 1))
    loop.run_until(3)
    assert loop.by_span == {(a.rollout_id, "s1"): RESULT, (a.rollout_id, "s2"): FALLBACK,
                            (b.rollout_id, "s1"): RESULT}
    assert [s.span_id for s in store.query_spans(a.rollout_id)] == ["s1"]
    assert [s.span_id for s in store.query_spans(b.rollout_id)] == ["s1"]
    heartbeat = store.get_rollout_by_id(a.rollout_id)
    assert heartbeat is not None and heartbeat.status == "running"  # the span's heartbeat


def test_what_the_pipeline_does_not_take(store: Any) -> None:
    claimed, loop = _connected(store)
    pipeline = store.pipeline
    assert not pipeline.submit("add_span", (), {"value": _span(claimed, 2)}, None, print)
    assert not pipeline.submit("add_span", ({"rollout_id": 3},), {}, None, print)  # invalid
    unknown = _span(claimed, 3, rollout_id="ro-unknown")
    assert not pipeline.submit("add_span", (unknown,), {}, None, print)  # no cached row
    # A duplicate is sent, and handed to the full path, which returns the stored span.
    assert loop.submit(_span(claimed, 1))
    assert loop.run_until(2)[1] == (FALLBACK, None)
    assert len(store.query_spans(claimed.rollout_id)) == 1


def test_a_lost_connection_hands_the_spans_in_flight_over_and_reconnects(
        store: Any) -> None:
    claimed, loop = _connected(store)
    assert loop.submit(_span(claimed, 2))
    _kill_pipeline_backend(store)
    assert loop.run_until(2)[1] == (FALLBACK, None)  # the full path adds it (idempotent)
    assert not loop.ready  # the lost connection's descriptor was given back
    loop.submit_when_connected(_span(claimed, 3))  # a new connection, made by its thread
    assert loop.run_until(3)[2][0] == RESULT


def _kill_pipeline_backend(store: Any) -> None:
    import psycopg

    from mpstore.postgres.pipeline import PIPELINE_APPLICATION

    with psycopg.connect(store.url, autocommit=True) as conn:
        killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name = %s AND datname = current_database()",
                              (PIPELINE_APPLICATION,)
                              ).fetchall()
    assert killed == [(True,)]


def test_a_claim_whose_write_is_lost_lets_go_of_its_rollout(store: Any) -> None:
    import psycopg

    _, loop = _connected(store)
    heads = [store.enqueue_rollout({"q": i}).rollout_id for i in range(2)]
    with psycopg.connect(store.url) as locker:  # holds the head's row: the write waits
        locker.execute("SELECT 1 FROM mpstore_rollouts WHERE rollout_id = %s FOR UPDATE",
                       (heads[0],))
        assert loop.call("dequeue_rollout", (), {}, ("c", 1))
        store.pipeline.flush()  # the head read (a read waits for no lock) ...
        read = loop.pipeline._inflight[0]
        while loop.pipeline._inflight and loop.pipeline._inflight[0] is read:
            assert loop.epoll.poll(30.0), "no answer from PostgreSQL"
            for fd in list(loop.ready):
                loop.ready[fd](select.EPOLLIN)
        assert loop.pipeline._inflight, "... answered, and its write sent"
        _kill_pipeline_backend(store)  # with the write waiting for the row
        assert loop.run_until(2)[1] == (FALLBACK, None)
        locker.rollback()
    assert store.get_rollout_by_id(heads[0]).status == "queuing"  # not written
    loop.call_when_connected("dequeue_rollout", (), {}, ("c", 2))  # the next claim takes it
    kind, claimed = loop.run_until(3)[2]
    assert kind == RESULT and claimed.rollout_id == heads[0]


def test_spans_that_come_while_transactions_run_go_in_the_next(store: Any) -> None:
    from mpstore.postgres.pipeline import IN_FLIGHT

    pipeline = store.pipeline
    claims = [_claimed(store) for _ in range(IN_FLIGHT + 2)]
    loop = Loop(pipeline)
    loop.submit_when_connected(_span(claims[0], 1))
    for claimed in claims[1:]:
        pipeline.flush()  # sent at once while fewer than IN_FLIGHT are in flight
        assert loop.submit(_span(claimed, 1))
    pipeline.flush()
    assert len(pipeline._inflight) == IN_FLIGHT  # the last two wait, to go together
    assert len(pipeline._waiting) == 2
    loop.run_until(len(claims))  # flushed again when the first is answered
    assert set(loop.by_span.values()) == {RESULT}
    for claimed in claims:
        assert [s.span_id for s in store.query_spans(claimed.rollout_id)] == ["s1"]


def test_writes_with_a_request_id_store_their_reply_and_a_resend_falls_back(
        store: Any) -> None:
    claimed, loop = _connected(store)
    args = (claimed.rollout_id, claimed.attempt.attempt_id)
    # Without a request id the pipeline does not take them: a statement lost with its
    # connection could not be resent safely. Nor arguments the store refuses.
    assert not loop.call("update_attempt", args, {"status": "succeeded"}, None)
    assert not loop.call("enqueue_rollout", ({"q": 2},), {}, None)
    assert not loop.call("update_attempt", args, {"status": "nonsense"}, ("c", 1))
    assert loop.call("update_attempt", args, {"status": "succeeded"}, ("c", 1))
    assert loop.call("enqueue_rollout", ({"q": 2},), {}, ("c", 2))
    results = {type(value).__name__: value for kind, value in loop.run_until(3)[1:]
               if kind == RESULT}
    assert set(results) == {"Attempt", "Rollout"}
    assert store.get_rollout_by_id(claimed.rollout_id).status == "succeeded"
    # The reply of request 2 is in the database: its resend fails its transaction (on the
    # reply's key), goes to the full path, and ``once`` answers it from the database.
    assert loop.call("enqueue_rollout", ({"q": 2},), {}, ("c", 2))
    assert loop.run_until(4)[3] == (FALLBACK, None)
    resent = store.once(("c", 2), store.enqueue_rollout)({"q": 2})
    assert resent.rollout_id == results["Rollout"].rollout_id
    assert [r.rollout_id for r in store.query_rollouts()
            if r.input == {"q": 2}] == [resent.rollout_id]  # enqueued once


def test_claims_of_one_round_take_the_head_in_order_each_a_rollout_of_its_own(
        store: Any) -> None:
    _, loop = _connected(store)
    # Not taken: no request id (a claim lost with its connection could not be resent),
    # a worker's claim, or one that may wait.
    assert not loop.call("dequeue_rollout", (), {}, None)
    assert not loop.call("dequeue_rollout", ("worker-1",), {}, ("c", 9))
    assert not loop.call("dequeue_rollout", (), {"wait": 1.0}, ("c", 9))
    queued = [store.enqueue_rollout({"q": i}).rollout_id for i in range(3)]
    assert loop.call("dequeue_rollout", (), {}, ("c", 1), key=("claim", "1"))
    assert loop.call("dequeue_rollout", (), {"wait": 0}, ("c", 2), key=("claim", "2"))
    loop.run_until(3)
    assert loop.by_span[("claim", "1")] == loop.by_span[("claim", "2")] == RESULT
    first, second = loop.values[("claim", "1")], loop.values[("claim", "2")]
    assert [first.rollout_id, second.rollout_id] == queued[:2]  # FIFO, none twice
    assert [store.get_rollout_by_id(rid).status for rid in queued] == [
        "preparing", "preparing", "queuing"]
    # Each reply is stored with the claim: a resend takes the head (the third), fails on
    # the reply's key, and goes to the full path, which answers it from the database.
    assert loop.call("dequeue_rollout", (), {}, ("c", 1))
    assert loop.run_until(4)[3] == (FALLBACK, None)
    resent = store.once(("c", 1), store.dequeue_rollout)()
    assert resent.attempt.attempt_id == first.attempt.attempt_id
    assert store.get_rollout_by_id(queued[2]).status == "queuing"
    # The failed write let go of the third: the next claim takes it (FIFO still).
    assert loop.call("dequeue_rollout", (), {}, ("c", 3))
    kind, third = loop.run_until(5)[4]
    assert kind == RESULT and third.rollout_id == queued[2]


def test_a_claim_goes_to_the_full_path_if_the_queue_is_empty_or_the_head_was_taken(
        store: Any) -> None:
    from mpstore.postgres import PostgresStore

    _, loop = _connected(store)
    assert loop.call("dequeue_rollout", (), {}, ("c", 1))  # nothing queued
    assert loop.run_until(2)[1] == (FALLBACK, None)
    head = store.enqueue_rollout({"q": 1})
    assert loop.call("dequeue_rollout", (), {}, ("c", 2))
    store.pipeline.flush()  # the head is read ...
    assert loop.epoll.poll(30.0), "no answer from PostgreSQL"
    other = PostgresStore(store.url)  # ... and claimed by another server before it is written
    try:
        assert other.dequeue_rollout().rollout_id == head.rollout_id
    finally:
        other.close()
    assert loop.run_until(3)[2] == (FALLBACK, None)  # written at the version read: stale
    assert len(store.query_attempts(head.rollout_id)) == 1


def test_a_claim_goes_to_the_full_path_while_a_rollout_is_due(store: Any) -> None:
    _, loop = _connected(store)
    store.enqueue_rollout({"q": 1}, config={"timeout_seconds": 0.0})
    waiting = store.enqueue_rollout({"q": 2})
    assert store.dequeue_rollout() is not None  # the first: due for the watchdog at once
    assert loop.call("dequeue_rollout", (), {}, ("c", 1))
    assert loop.run_until(2)[1] == (FALLBACK, None)
    assert store.get_rollout_by_id(waiting.rollout_id).status == "queuing"


def test_a_plan_that_fails_to_decide_goes_to_the_full_path_and_holds_nothing(
        store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, loop = _connected(store)
    head = store.enqueue_rollout({"q": 1})

    def unreadable(*args: Any, **kwds: Any) -> None:
        raise RuntimeError("a record this server cannot read")

    monkeypatch.setattr(store._fast, "_plan_on", unreadable)
    assert loop.call("dequeue_rollout", (), {}, ("c", 1))
    assert loop.run_until(2)[1] == (FALLBACK, None)  # the loop goes on
    monkeypatch.undo()
    assert loop.call("dequeue_rollout", (), {}, ("c", 2))
    kind, claimed = loop.run_until(3)[2]
    assert kind == RESULT and claimed.rollout_id == head.rollout_id  # not held
