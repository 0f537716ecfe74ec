"""MpstoreLightningStore against agent-lightning's documented store semantics, on whichever
release is installed (0.3.0 or 0.2.2), in process and through a real ``agl store`` server.

Each test names the abstract methods it covers (see the README's list). Calls are made the
way agent-lightning makes them: awaited coroutines with its pydantic types.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import agentlightning as agl
import pytest
from agentlightning import (
    LLM,
    Attempt,
    AttemptedRollout,
    PromptTemplate,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
)
from agentlightning import Span as AglSpan
from agentlightning.store.base import UNSET, LightningStore
from opentelemetry.sdk.trace import TracerProvider

from mpstore import InMemoryStore
from mpstore.agentlightning import MpstoreLightningStore
from tests import remote

T = TypeVar("T")
V030 = agl.__version__.startswith("0.3")
only_030 = pytest.mark.skipif(not V030, reason="agent-lightning 0.3.0 API")
PaginatedResult: Any = getattr(agl, "PaginatedResult", None)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(params=["memory", "remote"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MpstoreLightningStore]:
    if request.param == "memory":
        yield MpstoreLightningStore(InMemoryStore())
        return
    with remote.fresh_remote_store(tmp_path) as client:
        yield MpstoreLightningStore(client)


def readable(name: str = "llm.call", attributes: dict[str, Any] | None = None) -> Any:
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span(name, attributes=attributes or {"tokens": 3}) as span:
        pass
    return span


def agl_span(rid: str, aid: str, seq: int, name: str = "s") -> AglSpan:
    return AglSpan.from_opentelemetry(readable(name), rid, aid, seq)


def items(result: Any) -> list[Any]:
    if V030:
        assert isinstance(result, PaginatedResult)
    else:
        assert isinstance(result, list)
    return list(result)


# ----------------------------------------------------------------------------- the class
def test_it_is_a_lightning_store_with_every_abstract_method() -> None:
    # Every method the installed base class leaves unimplemented is implemented here.
    abstract = {name for name, fn in vars(LightningStore).items()
                if callable(fn) and not name.startswith("_")}
    for name in abstract - {"otlp_traces_endpoint"}:  # otlp_traces is False (capabilities)
        assert getattr(MpstoreLightningStore, name) is not getattr(LightningStore, name), name
    assert issubclass(MpstoreLightningStore, LightningStore)


def test_capabilities_tell_the_truth(tmp_path: Path) -> None:
    local = MpstoreLightningStore(InMemoryStore())
    assert local.capabilities == {"thread_safe": True, "async_safe": True, "zero_copy": False,
                                  "otlp_traces": False}
    with pytest.raises(TypeError, match="one process"):
        pickle.dumps(local)
    with remote.fresh_remote_store(tmp_path) as client:
        assert MpstoreLightningStore(client).capabilities["zero_copy"] is True


# ----------------------------------------------------------------------------- rollouts
def test_start_and_enqueue_rollouts(store: MpstoreLightningStore) -> None:
    # start_rollout, enqueue_rollout, get_latest_resources (resources_id defaults to latest)
    async def go() -> None:
        update = await store.add_resources({"llm": LLM(endpoint="http://x", model="m")})
        started = await store.start_rollout({"q": 1}, mode="train")
        assert isinstance(started, AttemptedRollout) and started.status == "preparing"
        assert started.attempt.sequence_id == 1 and started.attempt.status == "preparing"
        assert started.resources_id == update.resources_id
        assert started.config == RolloutConfig() and started.metadata == {}
        queued = await store.enqueue_rollout(
            {"q": 2}, config=RolloutConfig(max_attempts=2, retry_condition=["failed"]),
            metadata={"k": "v"})
        assert type(queued) is Rollout and queued.status == "queuing"
        assert queued.config.max_attempts == 2 and queued.config.retry_condition == ["failed"]
        assert queued.metadata == {"k": "v"} and queued.input == {"q": 2}

    run(go())


def test_dequeue_start_attempt_and_query(store: MpstoreLightningStore) -> None:
    # dequeue_rollout, start_attempt, query_rollouts, get_rollout_by_id, query_attempts,
    # get_latest_attempt
    async def go() -> None:
        assert await store.dequeue_rollout() is None
        first = await store.enqueue_rollout({"q": 1})
        second = await store.enqueue_rollout({"q": 2})
        claimed = await store.dequeue_rollout()
        assert isinstance(claimed, AttemptedRollout) and claimed.rollout_id == first.rollout_id
        retry = await store.start_attempt(first.rollout_id)
        assert retry.attempt.sequence_id == 2 and retry.status == "preparing"
        found = items(await store.query_rollouts())
        assert [r.rollout_id for r in found] == [first.rollout_id, second.rollout_id]
        if V030:  # rollouts with an attempt come with their latest one
            assert isinstance(found[0], AttemptedRollout) and type(found[1]) is Rollout
            assert found[0].attempt.attempt_id == retry.attempt.attempt_id
        else:
            assert all(type(r) is Rollout for r in found)
        queuing = items(await store.query_rollouts(status=["queuing"]))
        assert [r.rollout_id for r in queuing] == [second.rollout_id]
        by_id = items(await store.query_rollouts(rollout_ids=[second.rollout_id]))
        assert [r.rollout_id for r in by_id] == [second.rollout_id]
        got = await store.get_rollout_by_id(first.rollout_id)
        assert got.rollout_id == first.rollout_id
        assert isinstance(got, AttemptedRollout) == V030
        assert await store.get_rollout_by_id("ro-000000000000") is None
        attempts = items(await store.query_attempts(first.rollout_id))
        assert [a.sequence_id for a in attempts] == [1, 2]
        assert all(isinstance(a, Attempt) for a in attempts)
        latest = await store.get_latest_attempt(first.rollout_id)
        assert latest.attempt_id == retry.attempt.attempt_id
        assert await store.get_latest_attempt(second.rollout_id) is None

    run(go())


@only_030
def test_030_paging_filters_and_many(store: MpstoreLightningStore) -> None:
    # enqueue_many_rollouts, dequeue_many_rollouts, query_rollouts (0.3.0 arguments),
    # query_attempts (sort, limit, offset)
    async def go() -> None:
        made = await store.enqueue_many_rollouts(
            [agl.EnqueueRolloutRequest(input=i, config=RolloutConfig(max_attempts=3))
             for i in range(5)])
        assert [r.input for r in made] == list(range(5))
        assert made[0].config.max_attempts == 3
        assert await store.dequeue_many_rollouts(limit=0) == []
        assert await store.dequeue_many_rollouts(limit=-1) == []
        claimed = await store.dequeue_many_rollouts(limit=2, worker_id="w1")
        assert [r.input for r in claimed] == [0, 1]
        page = await store.query_rollouts(status_in=["queuing"], limit=2, offset=1)
        assert isinstance(page, PaginatedResult)
        assert [r.input for r in page] == [3, 4] and page.total == 3
        assert (page.limit, page.offset) == (2, 1)
        page = await store.query_rollouts(sort_by="rollout_id", sort_order="desc")
        assert [r.rollout_id for r in page] == sorted((r.rollout_id for r in made),
                                                      reverse=True)
        part = made[2].rollout_id[3:10]
        ored = await store.query_rollouts(rollout_id_contains=part, status_in=["preparing"],
                                          filter_logic="or")
        assert {r.input for r in ored} == {0, 1, 2}
        rid = claimed[0].rollout_id
        await store.start_attempt(rid)
        attempts = await store.query_attempts(rid, sort_order="desc", limit=1)
        assert [a.sequence_id for a in attempts] == [2] and attempts.total == 2

    run(go())


def test_updates_and_waits(store: MpstoreLightningStore) -> None:
    # update_rollout, update_attempt, wait_for_rollouts
    async def go() -> None:
        rollout = await store.enqueue_rollout({"q": 1})
        updated = await store.update_rollout(rollout.rollout_id, metadata={"a": 1},
                                             config=RolloutConfig(timeout_seconds=30.0))
        assert updated.metadata == {"a": 1} and updated.config.timeout_seconds == 30.0
        assert updated.input == {"q": 1} and updated.status == "queuing"  # UNSET: kept
        claimed = await store.dequeue_rollout()
        waiter = asyncio.ensure_future(store.wait_for_rollouts(
            rollout_ids=[rollout.rollout_id], timeout=10.0))
        attempt = await store.update_attempt(rollout.rollout_id, claimed.attempt.attempt_id,
                                             status="succeeded")
        assert attempt.status == "succeeded" and attempt.end_time is not None
        done = await waiter
        assert [r.status for r in done] == ["succeeded"]
        assert await store.wait_for_rollouts(rollout_ids=["ro-000000000000"], timeout=0) == []
        cancelled = await store.update_rollout(rollout.rollout_id, status="cancelled")
        assert cancelled.status == "cancelled"
        with pytest.raises(ValueError):
            await store.update_attempt("ro-000000000000", "latest", status="failed")
        with pytest.raises(ValueError):
            await store.update_rollout("ro-000000000000", status="failed")

    run(go())


# ----------------------------------------------------------------------------- spans
def test_spans(store: MpstoreLightningStore) -> None:
    # get_next_span_sequence_id, add_span, add_otel_span, query_spans
    async def go() -> None:
        claimed = await store.start_rollout({"q": 1})
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        assert await store.get_next_span_sequence_id(rid, aid) == 1
        span = agl_span(rid, aid, 2, "first")
        added = await store.add_span(span)
        assert isinstance(added, AglSpan) and added.span_id == span.span_id
        again = await store.add_span(span)
        if V030:
            assert again is None  # a duplicate
        else:
            assert again.span_id == span.span_id
        otel = readable("second", {"reward": 0.5})
        stored = await store.add_otel_span(rid, aid, otel)
        assert isinstance(stored, AglSpan) and stored.sequence_id == 3
        assert stored.attributes["reward"] == 0.5
        expected = AglSpan.from_opentelemetry(otel, rid, aid, 3)
        # agent-lightning's own shape, field by field (its extra fields, such as the span's
        # kind, are not kept: README)
        fields = set(AglSpan.model_fields)
        assert stored.model_dump(include=fields) == expected.model_dump(include=fields)
        duplicate = await store.add_otel_span(rid, aid, otel)
        assert (duplicate is None) if V030 else duplicate.span_id == stored.span_id
        spans = items(await store.query_spans(rid))
        assert [s.name for s in spans] == ["first", "second"]
        assert [s.sequence_id for s in items(await store.query_spans(rid, "latest"))] == [2, 3]
        assert (await store.get_rollout_by_id(rid)).status == "running"  # a heartbeat
        with pytest.raises(ValueError):
            await store.add_span(agl_span(rid, "at-00000000", 9))

    run(go())


@only_030
def test_030_span_batches_and_filters(store: MpstoreLightningStore) -> None:
    # get_many_span_sequence_ids, add_many_spans, query_spans (0.3.0 filters)
    async def go() -> None:
        claimed = await store.start_rollout({"q": 1})
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        seqs = await store.get_many_span_sequence_ids([(rid, aid), (rid, aid)])
        assert list(seqs) == [1, 2]
        spans = [agl_span(rid, aid, s, n) for s, n in zip(seqs, ["a.one", "b.two"],
                                                             strict=True)]
        added = await store.add_many_spans(spans)
        assert [s.name for s in added] == ["a.one", "b.two"]
        assert await store.add_many_spans(spans[:1]) == []  # duplicates are left out
        page = await store.query_spans(rid, name_contains="two")
        assert [s.name for s in page] == ["b.two"] and page.total == 1
        page = await store.query_spans(rid, span_id=spans[0].span_id, name="b.two",
                                       filter_logic="or", sort_order="desc")
        assert [s.name for s in page] == ["b.two", "a.one"]
        page = await store.query_spans(rid, limit=1, offset=1)
        assert [s.name for s in page] == ["b.two"] and page.total == 2

    run(go())


# ----------------------------------------------------------------------------- resources
def test_resources(store: MpstoreLightningStore) -> None:
    # add_resources, update_resources, get_resources_by_id, get_latest_resources
    async def go() -> None:
        assert await store.get_latest_resources() is None
        named = {"llm": LLM(endpoint="http://x/v1", model="m", sampling_parameters={"t": 0}),
                 "prompt": PromptTemplate(template="Q: {q}", engine="f-string")}
        first = await store.add_resources(named)
        assert isinstance(first, ResourcesUpdate) and first.resources["llm"].model == "m"
        assert isinstance(first.resources["prompt"], PromptTemplate)
        second = await store.update_resources("rs-fixed", {"llm": named["llm"]})
        again = await store.update_resources("rs-fixed", named)
        assert (await store.get_latest_resources()).resources_id == "rs-fixed"
        got = await store.get_resources_by_id(first.resources_id)
        assert got.resources["prompt"].template == "Q: {q}"
        assert await store.get_resources_by_id("rs-none") is None
        if V030:
            assert (second.version, again.version) == (1, 2)

    run(go())


@only_030
def test_030_query_resources(store: MpstoreLightningStore) -> None:
    # query_resources
    async def go() -> None:
        llm = {"llm": LLM(endpoint="http://x", model="m")}
        first = await store.add_resources(llm)
        await store.update_resources("rs-named", llm)
        page = await store.query_resources()
        assert [r.resources_id for r in page] == [first.resources_id, "rs-named"]
        assert page.total == 2
        page = await store.query_resources(resources_id_contains="named")
        assert [r.resources_id for r in page] == ["rs-named"]

    run(go())


# ----------------------------------------------------------------------------- workers
@only_030
def test_030_workers(store: MpstoreLightningStore) -> None:
    # query_workers, get_worker_by_id, update_worker (status derived, 0.3.0's rules)
    async def go() -> None:
        assert await store.get_worker_by_id("w1") is None
        beat = await store.update_worker("w1", heartbeat_stats={"gpu": 1})
        assert isinstance(beat, agl.Worker) and beat.heartbeat_stats == {"gpu": 1}
        assert beat.status == "unknown" and beat.last_heartbeat_time is not None
        await store.enqueue_rollout({"q": 1})
        claimed = await store.dequeue_rollout(worker_id="w1")
        busy = await store.get_worker_by_id("w1")
        assert busy.status == "busy" and busy.current_rollout_id == claimed.rollout_id
        await store.update_attempt(claimed.rollout_id, "latest", status="failed")
        assert (await store.get_worker_by_id("w1")).status == "idle"
        await store.dequeue_rollout(worker_id="w2")  # nothing queued: idle
        page = await store.query_workers(status_in=["idle"], sort_by="worker_id")
        assert [w.worker_id for w in page] == ["w1", "w2"] and page.total == 2
        assert (await store.statistics())["total_workers"] == 2

    run(go())


def test_statistics(store: MpstoreLightningStore) -> None:
    # statistics (0.3.0's keys; 0.2.2 has no statistics, the method is extra there)
    async def go() -> None:
        await store.enqueue_rollout({"q": 1})
        stats = await store.statistics()
        assert stats["name"] == "MpstoreLightningStore" and stats["total_rollouts"] == 1
        for key in ("total_attempts", "total_spans", "total_resources", "total_workers",
                    "uptime", "total_span_bytes", "eviction_threshold_bytes",
                    "safe_threshold_bytes", "memory_capacity_bytes"):
            assert key in stats, key

    run(go())


# ----------------------------------------------------------------------------- safety
def test_calls_from_other_threads_and_loops_at_once(store: MpstoreLightningStore) -> None:
    # agent-lightning's span processor calls the store from a private loop in its own thread.
    claimed = run(store.start_rollout({"q": 1}))
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    errors: list[BaseException] = []

    def emit(thread: int) -> None:
        async def go() -> None:
            await asyncio.gather(*(store.add_otel_span(rid, aid, readable(f"t{thread}"))
                                   for _ in range(10)))

        try:
            asyncio.new_event_loop().run_until_complete(go())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=emit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    spans = items(run(store.query_spans(rid)))
    assert sorted(s.sequence_id for s in spans) == list(range(1, 41))  # no number twice


def _child(store: MpstoreLightningStore, rid: str, aid: str, out: Any) -> None:
    async def go() -> None:
        span = await store.add_otel_span(rid, aid, readable("from-child"))
        await store.update_attempt(rid, aid, status="succeeded")
        out.put(span.sequence_id)

    asyncio.run(go())


def test_pickles_to_an_address_and_reconnects_in_a_child(tmp_path: Path) -> None:
    with remote.fresh_remote_store(tmp_path) as client:
        store = MpstoreLightningStore(client)
        copy = pickle.loads(pickle.dumps(store))
        assert copy.store.address == client.address
        claimed = run(store.start_rollout({"q": 1}))
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        child = ctx.Process(target=_child, args=(store, claimed.rollout_id,
                                                 claimed.attempt.attempt_id, out))
        child.start()
        assert out.get(timeout=120) == 1
        child.join(60)
        assert child.exitcode == 0
        done = run(store.get_rollout_by_id(claimed.rollout_id))
        assert done.status == "succeeded"


def test_the_adapter_modules_declare_all() -> None:
    import importlib

    for name in ("mpstore.agentlightning", "mpstore.agentlightning.convert",
                 "mpstore.agentlightning.store"):
        module = importlib.import_module(name)
        assert module.__all__ == sorted(module.__all__), name
        assert all(hasattr(module, item) for item in module.__all__), name


def test_unset_is_agent_lightnings() -> None:
    # The defaults are agent-lightning's own UNSET, as in its signatures.
    import inspect

    params = inspect.signature(MpstoreLightningStore.update_attempt).parameters
    assert params["status"].default is UNSET
