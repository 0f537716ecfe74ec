"""The contract suite, continued: agent-lightning 0.3.0's queries, workers, OpenTelemetry spans
and statistics keys in mpstore's own API (issue 11).

Like tests/test_contract.py, every test runs on the ``store`` fixture, once in process and
once through a real ``agl store`` server, through the public API only.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from mpstore import (
    AttemptedRollout,
    AttemptNotFound,
    InvalidArgument,
    Page,
    Rollout,
    RolloutNotFound,
    Span,
    Worker,
    WorkerStatus,
)

EXPIRED = {"timeout_seconds": -1.0}


def enqueue(store: Any, n: int) -> list[str]:
    return [r.rollout_id for r in store.enqueue_many_rollouts([{"input": i} for i in range(n)])]


# ----------------------------------------------------------------------------- Page
def test_a_page_is_a_list_with_its_total_and_pickles_as_one() -> None:
    page = Page([1, 2], total=7, limit=2, offset=4)
    assert page == [1, 2] and isinstance(page, list)
    back = pickle.loads(pickle.dumps(page))
    assert type(back) is Page and back == [1, 2]
    assert (back.total, back.limit, back.offset) == (7, 2, 4)
    assert Page([3]).total == 1


# ----------------------------------------------------------------------------- rollouts
def test_query_rollouts_pages_in_creation_order_with_the_total(store: Any) -> None:
    ids = enqueue(store, 10)
    page = store.query_rollouts(limit=3, offset=4)
    assert type(page) is Page
    assert [r.rollout_id for r in page] == ids[4:7]
    assert (page.total, page.limit, page.offset) == (10, 3, 4)
    assert [r.rollout_id for r in store.query_rollouts(offset=8)] == ids[8:]
    assert store.query_rollouts(offset=20) == [] and store.query_rollouts(offset=20).total == 10
    assert [r.rollout_id for r in store.query_rollouts(sort_order="desc", limit=2)] == [
        ids[9], ids[8]]


def test_query_rollouts_filters_by_status_and_pages_the_matches(store: Any) -> None:
    ids = enqueue(store, 8)
    claimed = [store.dequeue_rollout().rollout_id for _ in range(3)]  # ids[0:3] preparing
    store.update_rollout(ids[5], status="cancelled")
    page = store.query_rollouts(status_in=["queuing"], limit=2, offset=1)
    assert [r.rollout_id for r in page] == [ids[4], ids[6]] and page.total == 4
    page = store.query_rollouts(status_in=["preparing", "cancelled"])
    assert [r.rollout_id for r in page] == [*claimed, ids[5]] and page.total == 4
    # the older names still work; the newer win when both are given
    assert [r.rollout_id for r in store.query_rollouts(status=["cancelled"])] == [ids[5]]
    both = store.query_rollouts(status_in=["cancelled"], status=["queuing"])
    assert [r.rollout_id for r in both] == [ids[5]]
    assert store.query_rollouts(status_in=[]) == []  # D9


def test_query_rollouts_by_ids_and_contains_with_and_or_logic(store: Any) -> None:
    ids = enqueue(store, 6)
    store.dequeue_rollout()  # ids[0] preparing
    assert [r.rollout_id for r in store.query_rollouts(rollout_id_in=[ids[3], ids[1]])] == [
        ids[1], ids[3]]
    assert [r.rollout_id for r in store.query_rollouts(rollout_ids=[ids[2]])] == [ids[2]]
    part = ids[4][3:9]
    assert ids[4] in [r.rollout_id for r in store.query_rollouts(rollout_id_contains=part)]
    assert store.query_rollouts(rollout_id_contains="zz-none").total == 0
    anded = store.query_rollouts(status_in=["preparing"], rollout_id_in=[ids[0], ids[1]])
    assert [r.rollout_id for r in anded] == [ids[0]]
    ored = store.query_rollouts(status_in=["preparing"], rollout_id_in=[ids[2]],
                                filter_logic="or")
    assert [r.rollout_id for r in ored] == [ids[0], ids[2]] and ored.total == 2


def test_query_rollouts_sorts_by_a_field_none_last(store: Any) -> None:
    ids = enqueue(store, 4)
    store.update_rollout(ids[2], status="succeeded")
    store.update_rollout(ids[0], status="failed")
    by_end = store.query_rollouts(sort_by="end_time")
    assert [r.rollout_id for r in by_end] == [ids[2], ids[0], ids[1], ids[3]]
    desc = store.query_rollouts(sort_by="status", sort_order="desc", limit=2)
    assert [r.status for r in desc] == ["succeeded", "queuing"] and desc.total == 4
    by_id = store.query_rollouts(sort_by="rollout_id")
    assert [r.rollout_id for r in by_id] == sorted(ids)


def test_query_rollouts_with_latest_attempt_gives_attempted_rollouts(store: Any) -> None:
    ids = enqueue(store, 2)
    first = store.dequeue_rollout()
    again = store.start_attempt(first.rollout_id)
    page = store.query_rollouts(with_latest_attempt=True)
    assert isinstance(page[0], AttemptedRollout)
    assert page[0].attempt.attempt_id == again.attempt.attempt_id
    assert type(page[1]) is Rollout and page[1].rollout_id == ids[1]
    assert type(store.query_rollouts()[0]) is Rollout


@pytest.mark.parametrize("kwargs", [
    {"filter_logic": "xor"}, {"sort_by": "config"}, {"sort_by": "nope"}, {"sort_order": "up"},
    {"limit": -2}, {"limit": 1.5}, {"offset": -1}, {"offset": True}, {"status_in": ["bogus"]},
    {"rollout_id_contains": 3}, {"with_latest_attempt": "yes"},
])
def test_query_rollouts_refuses_bad_paging(store: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        store.query_rollouts(**kwargs)


# ----------------------------------------------------------------------------- attempts
def test_query_attempts_sorts_and_pages(store: Any) -> None:
    rid = store.start_rollout({"q": 1}).rollout_id
    for _ in range(3):
        store.start_attempt(rid)
    every = store.query_attempts(rid)
    assert [a.sequence_id for a in every] == [1, 2, 3, 4] and every.total == 4
    page = store.query_attempts(rid, sort_order="desc", limit=2, offset=1)
    assert [a.sequence_id for a in page] == [3, 2] and page.total == 4
    assert [a.sequence_id for a in store.query_attempts(rid, sort_by=None, limit=1)] == [1]
    assert store.query_attempts("ro-000000000000") == []
    with pytest.raises(InvalidArgument):
        store.query_attempts(rid, sort_by="metadata")


# ----------------------------------------------------------------------------- spans
def spans_of(store: Any) -> tuple[str, str, str]:
    claimed = store.start_rollout({"q": 1})
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    specs = [("llm.call", "a" * 32, "00000000000000a1", None),
             ("tool.run", "a" * 32, "00000000000000a2", "00000000000000a1"),
             ("llm.call", "b" * 32, "00000000000000b1", None),
             ("reward", "b" * 32, "00000000000000b2", "00000000000000b1")]
    for seq, (name, trace, span_id, parent) in enumerate(specs, 1):
        store.add_span(Span(rid, aid, seq, name, trace_id=trace, span_id=span_id,
                            parent_id=parent))
    return rid, aid, "b" * 32


def test_query_spans_filters_exact_and_contains(store: Any) -> None:
    rid, aid, trace_b = spans_of(store)
    names = lambda page: [s.name for s in page]  # noqa: E731
    assert names(store.query_spans(rid, name="llm.call")) == ["llm.call", "llm.call"]
    assert names(store.query_spans(rid, name_contains="oo")) == ["tool.run"]
    assert names(store.query_spans(rid, trace_id=trace_b)) == ["llm.call", "reward"]
    assert names(store.query_spans(rid, parent_id="00000000000000a1")) == ["tool.run"]
    assert names(store.query_spans(rid, parent_id_contains="b1")) == ["reward"]
    assert names(store.query_spans(rid, span_id="00000000000000b2")) == ["reward"]
    assert names(store.query_spans(rid, span_id_contains="a")) == ["llm.call", "tool.run"]
    both = store.query_spans(rid, "latest", trace_id=trace_b, name="llm.call")
    assert [s.span_id for s in both] == ["00000000000000b1"] and both.total == 1
    either = store.query_spans(rid, aid, name="reward", parent_id="00000000000000a1",
                               filter_logic="or")
    assert names(either) == ["tool.run", "reward"] and either.total == 2
    assert store.query_spans(rid, name="none") == []


def test_query_spans_sorts_and_pages(store: Any) -> None:
    rid, _aid, _ = spans_of(store)
    page = store.query_spans(rid, limit=2, offset=1)
    assert [s.sequence_id for s in page] == [2, 3] and page.total == 4
    desc = store.query_spans(rid, sort_order="desc", limit=3)
    assert [s.sequence_id for s in desc] == [4, 3, 2]
    assert [s.name for s in store.query_spans(rid, sort_by="name")] == [
        "llm.call", "llm.call", "reward", "tool.run"]
    filtered = store.query_spans(rid, name="llm.call", limit=1, offset=1)
    assert [s.sequence_id for s in filtered] == [3] and filtered.total == 2
    with pytest.raises(InvalidArgument):
        store.query_spans(rid, sort_by="attributes")
    with pytest.raises(InvalidArgument):
        store.query_spans(rid, filter_logic="nand")


# ----------------------------------------------------------------------------- resources
def test_query_resources_filters_sorts_and_pages(store: Any) -> None:
    llm = {"llm": {"resource_type": "llm", "endpoint": "http://x", "model": "m"}}
    first = store.add_resources(llm).resources_id
    store.update_resources("rs-custom-one", llm)
    store.update_resources("rs-custom-one", llm)  # version 2, keeps its place
    third = store.add_resources(llm).resources_id
    every = store.query_resources()
    assert [r.resources_id for r in every] == [first, "rs-custom-one", third]
    assert every.total == 3
    assert [r.resources_id for r in store.query_resources(resources_id=third)] == [third]
    assert [r.resources_id for r in store.query_resources(resources_id_contains="custom")] == [
        "rs-custom-one"]
    top = store.query_resources(sort_by="version", sort_order="desc", limit=1)
    assert [r.version for r in top] == [2] and top.total == 3
    assert [r.resources_id for r in store.query_resources(offset=2)] == [third]


# ----------------------------------------------------------------------------- workers
def test_a_dequeue_makes_a_worker_busy_and_the_attempt_end_idle(store: Any) -> None:
    assert store.get_worker_by_id("w1") is None
    enqueue(store, 1)
    claimed = store.dequeue_rollout(worker_id="w1")
    worker = store.get_worker_by_id("w1")
    assert isinstance(worker, Worker) and worker.status == WorkerStatus.BUSY == "busy"
    assert worker.current_rollout_id == claimed.rollout_id
    assert worker.current_attempt_id == claimed.attempt.attempt_id
    assert worker.last_dequeue_time is not None and worker.last_busy_time is not None
    store.update_attempt(claimed.rollout_id, "latest", status="succeeded")
    worker = store.get_worker_by_id("w1")
    assert worker.status == "idle" and worker.current_rollout_id is None
    assert worker.last_idle_time >= worker.last_busy_time


def test_an_empty_dequeue_makes_a_worker_idle(store: Any) -> None:
    assert store.dequeue_rollout(worker_id="w2") is None
    worker = store.get_worker_by_id("w2")
    assert worker.status == "idle" and worker.last_dequeue_time is not None
    assert worker.last_idle_time is not None


def test_timeouts_make_a_worker_unknown_and_claims_busy(store: Any) -> None:
    store.enqueue_rollout({"q": 1}, config=EXPIRED)
    claimed = store.dequeue_rollout(worker_id="w3")
    store.statistics()  # runs the watchdog: the attempt times out
    assert store.get_latest_attempt(claimed.rollout_id).status == "timeout"
    assert store.get_worker_by_id("w3").status == "unknown"
    # a new attempt of it would time out at the next pass too: claim another rollout
    store.start_attempt(store.enqueue_rollout({"q": 2}).rollout_id, worker_id="w4")
    store.start_rollout({"q": 3}, worker_id="w5")
    assert store.get_worker_by_id("w4").status == "busy"
    assert store.get_worker_by_id("w5").status == "busy"


def test_an_attempt_update_that_sets_the_worker_follows_its_status(store: Any) -> None:
    rollout = store.start_rollout({"q": 1})
    store.update_attempt(rollout.rollout_id, "latest", worker_id="w6")
    assert store.get_worker_by_id("w6").status == "busy"
    store.update_attempt(rollout.rollout_id, "latest", status="failed")
    assert store.get_worker_by_id("w6").status == "idle"
    store.update_attempt(rollout.rollout_id, "latest", metadata={"m": 1})  # D3: no status
    assert store.get_worker_by_id("w6").status == "idle"


def test_update_worker_is_a_heartbeat_and_query_workers_pages(store: Any) -> None:
    first = store.update_worker("w-a", heartbeat_stats={"gpu": 0.5})
    assert first.status == "unknown" and first.heartbeat_stats == {"gpu": 0.5}
    assert first.last_heartbeat_time is not None
    kept = store.update_worker("w-a")
    assert kept.heartbeat_stats == {"gpu": 0.5}
    assert kept.last_heartbeat_time >= first.last_heartbeat_time
    store.dequeue_rollout(worker_id="w-b")  # idle
    enqueue(store, 1)
    store.dequeue_rollout(worker_id="w-c")  # busy
    every = store.query_workers()
    assert [w.worker_id for w in every] == ["w-a", "w-b", "w-c"] and every.total == 3
    assert [w.worker_id for w in store.query_workers(status_in=["idle", "busy"])] == [
        "w-b", "w-c"]
    assert [w.worker_id for w in store.query_workers(worker_id_contains="-c")] == ["w-c"]
    ored = store.query_workers(status_in=["idle"], worker_id_contains="-a", filter_logic="or")
    assert [w.worker_id for w in ored] == ["w-a", "w-b"]
    page = store.query_workers(sort_by="worker_id", sort_order="desc", limit=1, offset=1)
    assert [w.worker_id for w in page] == ["w-b"] and page.total == 3
    assert store.statistics()["total_workers"] == 3
    with pytest.raises(InvalidArgument):
        store.query_workers(status_in=["asleep"])
    with pytest.raises(InvalidArgument):
        store.update_worker("w-a", heartbeat_stats=[1])


# ----------------------------------------------------------------------------- otel
def otel_span(name: str = "llm.call") -> Any:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.resources import Resource

    provider = sdk.TracerProvider(resource=Resource.create({"service.name": "svc"}))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("root") as root, tracer.start_as_current_span(
            name, attributes={"tokens": 12, "tags": ("a", "b")}) as child:
        child.add_event("chunk", {"n": 1})
    assert root is not None
    return child


def test_add_otel_span_converts_and_allocates_a_sequence_id(store: Any) -> None:
    readable = otel_span()
    claimed = store.start_rollout({"q": 1})
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    stored = store.add_otel_span(rid, aid, readable)
    assert isinstance(stored, Span) and stored.sequence_id == 1
    context = readable.get_span_context()
    assert stored.trace_id == format(context.trace_id, "032x")
    assert stored.span_id == format(context.span_id, "016x")
    assert stored.parent_id == format(readable.parent.span_id, "016x")
    assert stored.name == "llm.call" and stored.attributes["tokens"] == 12
    assert stored.status == {"status_code": "UNSET", "description": None}
    assert stored.events[0]["name"] == "chunk" and stored.events[0]["attributes"] == {"n": 1}
    assert stored.start_time == readable.start_time / 1_000_000_000
    assert stored.resource["attributes"]["service.name"] == "svc"
    assert stored.context["span_id"] == stored.span_id
    assert store.get_next_span_sequence_id(rid, aid) == 2
    assert store.add_otel_span(rid, aid, readable) is None  # a duplicate (D7)
    assert store.get_next_span_sequence_id(rid, aid) == 3  # and it took no number
    explicit = store.add_otel_span(rid, aid, otel_span("other"), sequence_id=10)
    assert explicit.sequence_id == 10
    assert [s.name for s in store.query_spans(rid)] == ["llm.call", "other"]
    assert store.get_rollout_by_id(rid).status == "running"  # a heartbeat, as add_span


def test_add_otel_span_refuses_unknown_ids_and_non_spans(store: Any) -> None:
    claimed = store.start_rollout({"q": 1})
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    with pytest.raises(RolloutNotFound):
        store.add_otel_span("ro-000000000000", aid, otel_span())
    with pytest.raises(AttemptNotFound):
        store.add_otel_span(rid, "at-00000000", otel_span())
    with pytest.raises(InvalidArgument):
        store.add_otel_span(rid, aid, {"name": "dict"})
    with pytest.raises(InvalidArgument):
        store.add_otel_span(rid, aid, otel_span(), sequence_id=-1)
    assert store.query_spans(rid) == [] and store.statistics()["total_spans"] == 0


# ----------------------------------------------------------------------------- statistics
def test_statistics_has_agent_lightnings_keys(store: Any) -> None:
    claimed = store.start_rollout({"q": 1}, worker_id="w1")
    store.add_span(Span(claimed.rollout_id, claimed.attempt.attempt_id, 1, "s"))
    stats = store.statistics()
    assert stats["name"] in ("InMemoryStore", "PostgresStore")  # the store's class
    assert stats["total_span_bytes"] == stats["span_bytes"] > 0
    assert stats["total_workers"] == 1
    for key in ("total_rollouts", "total_attempts", "total_spans", "total_resources",
                "uptime", "eviction_threshold_bytes", "safe_threshold_bytes",
                "memory_capacity_bytes"):
        assert key in stats, key
