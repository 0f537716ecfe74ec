"""Every public method's change is on disk when it returns (SPEC §9).

A script calls every public method of a durable store, and after each call restores a second
state from a snapshot of the database file (sqlite's backup API: what is committed, nothing
else) and compares it with the live state, field by field and index by index. A change that
some method makes without staging it (a forgotten ``touch``, a method that skips the one
change path) makes the two differ at that method.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from mpstore import LLM, InMemoryStore, PromptTemplate, Span
from mpstore.api import CALLS
from mpstore.durable import Journal, read
from mpstore.state import StoreState
from tests.conftest import FakeClock


def dump(state: StoreState) -> dict[str, Any]:
    """The state's content and indexes, as comparable values."""
    records = {rid: (r.snapshot()._wire(), [a._wire() for a in state.attempts[rid]])
               for rid, r in state.rollouts.items()}
    return {
        "records": records,
        "created": dict(state.created),
        "queue": list(state.queue),
        "by_status": {s: sorted(ids) for s, ids in state.by_status.items()},  # a set
        "counters": {rid: n for rid, n in state.sequence.items() if n},
        "spans": {rid: [s._wire() for s in spans] for rid, spans in state.spans.items()},
        "evicted": sorted(state.evicted),
        "resources": {rid: r._wire() for rid, r in state.resources.items()},
        "latest_resources_id": state.latest_resources_id,
        "totals": (state.total_spans, state.total_attempts, state.total_span_bytes),
        "feed": dict(state.finishes.number),
    }


def on_disk(journal: Journal, tmp_path: Path, live: StoreState, now: float) -> StoreState:
    """A state restored from what the database file has committed now."""
    snapshot = tmp_path / "snapshot.sqlite3"
    snapshot.unlink(missing_ok=True)
    journal.backup(snapshot)
    with closing(sqlite3.connect(snapshot)) as target, target:
        saved = read(target)
    state = StoreState(live.thresholds)
    state.restore(saved, now)
    return state


def script(store: InMemoryStore, clock: FakeClock) -> list[tuple[str, Any]]:
    """One call of every public method, in an order where each does something."""
    retry = {"max_attempts": 2, "retry_condition": ["failed", "timeout"], "timeout_seconds": 5}
    made: dict[str, Any] = {}

    def first() -> Any:
        made["a"] = store.start_rollout("a", worker_id="w0")
        return made["a"]

    def claimed() -> Any:
        made["c"] = store.dequeue_rollout(worker_id="w1")
        return made["c"]

    def span(n: int) -> Span:
        c = made["c"]
        text = "t" * 1_000
        return Span(c.rollout_id, c.attempt.attempt_id, n, f"s{n}", attributes={"n": n, "t": text})

    def timed_out() -> Any:
        clock.advance(6.0)
        return store.run_watchdog()

    return [
        ("add_resources", lambda: store.add_resources({"llm": LLM("http://x/v1", "m")})),
        ("update_resources", lambda: store.update_resources("rs-1", {"p": PromptTemplate("q")})),
        ("start_rollout", first),
        ("enqueue_rollout", lambda: store.enqueue_rollout("b", config=retry)),
        ("enqueue_many_rollouts",
         lambda: store.enqueue_many_rollouts([{"input": "c"}, {"input": "d"}])),
        ("dequeue_rollout", claimed),
        ("dequeue_many_rollouts", lambda: store.dequeue_many_rollouts(1, "w2")),
        ("start_attempt", lambda: store.start_attempt(made["a"].rollout_id, "w3")),
        ("get_next_span_sequence_id",
         lambda: store.get_next_span_sequence_id(made["c"].rollout_id, "latest")),
        ("get_many_span_sequence_ids",
         lambda: store.get_many_span_sequence_ids([(made["c"].rollout_id, "x"), ("ro-n", "y")])),
        ("add_span", lambda: store.add_span(span(7))),
        ("add_many_spans", lambda: store.add_many_spans([span(8), span(9)])),
        ("update_attempt",
         lambda: store.update_attempt(made["a"].rollout_id, "latest", status="failed",
                                      metadata={"m": 1})),
        ("update_rollout",
         lambda: store.update_rollout(made["a"].rollout_id, status="succeeded",
                                      metadata={"k": "v"})),
        ("run_watchdog", timed_out),  # the claimed rollout times out and is requeued
        ("query_rollouts", lambda: store.query_rollouts(status=["requeuing"])),
        ("get_rollout_by_id", lambda: store.get_rollout_by_id(made["c"].rollout_id)),
        ("query_attempts", lambda: store.query_attempts(made["c"].rollout_id)),
        ("get_latest_attempt", lambda: store.get_latest_attempt(made["c"].rollout_id)),
        ("wait_for_rollouts",
         lambda: store.wait_for_rollouts(rollout_ids=[made["a"].rollout_id], timeout=0)),
        ("query_spans", lambda: store.query_spans(made["a"].rollout_id)),
        # a span given as a Span (what the client sends), its sequence id taken here
        ("add_otel_span", lambda: store.add_otel_span(
            made["a"].rollout_id, made["a"].attempt.attempt_id,
            Span(made["a"].rollout_id, made["a"].attempt.attempt_id, 0, "otel"))),
        ("query_resources", lambda: store.query_resources(sort_by="version")),
        # workers are telemetry, not journaled (README): nothing to find on disk
        ("update_worker", lambda: store.update_worker("w1", heartbeat_stats={"gpu": 1})),
        ("query_workers", lambda: store.query_workers(status_in=["busy"])),
        ("get_worker_by_id", lambda: store.get_worker_by_id("w1")),
        ("get_resources_by_id", lambda: store.get_resources_by_id("rs-1")),
        ("get_latest_resources", store.get_latest_resources),
        ("finished_rollouts", lambda: store.finished_rollouts(0, 10)),
        ("delete_rollouts",
         lambda: store.delete_rollouts([made["a"].rollout_id, made["c"].rollout_id, "ro-no"])),
        ("ping", store.ping),
        ("statistics", store.statistics),
    ]


def test_every_public_method_has_its_change_on_disk_when_it_returns(tmp_path: Path) -> None:
    clock = FakeClock()
    data_dir = tmp_path / "data"
    # A small eviction threshold: the span calls evict the finished rollout's spans too.
    store = InMemoryStore(clock=clock, data_dir=data_dir, eviction_threshold=2_500,
                          safe_threshold=1_000)
    steps = script(store, clock)
    public = {name for name, call in CALLS.items() if call.served}
    assert {name for name, _ in steps} == public, "a public method is not in the script"
    changed = []
    for name, call in steps:
        before = dump(store._state)
        call()
        live = store._state
        assert store._journal is not None
        assert dump(on_disk(store._journal, tmp_path, live, clock())) == dump(live), name
        if dump(live) != before:
            changed.append(name)
    # The script did change the state at every mutating method (so the check had teeth).
    assert {"get_next_span_sequence_id", "add_span", "run_watchdog", "update_resources",
            "get_many_span_sequence_ids", "update_attempt", "delete_rollouts",
            "add_otel_span"} <= set(changed)
    assert store.statistics()["total_rollouts"] == 2  # of 4: 2 deleted
    store.close()
