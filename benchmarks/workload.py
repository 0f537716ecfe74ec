"""What the client processes run: the rollout cycle, its batched form, the echoes, single-call
latencies, connect-to-first-call, and the bulk fill of the scale scenario.

Every task is a module-level function taking keyword arguments (see :mod:`benchmarks.pool`).
A worker keeps one connection per target in ``_SESSIONS`` between tasks. Throughput loops
run in a shared wall-clock window ``[start_at, end_at)`` (``time.time()``, the same clock in
every process) and stop at its end or after ``max_ops``, whichever comes first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .limits import PAYLOAD, close_handle, open_manager, open_raw

#: spans per rollout in the cycle
SPANS_PER_CYCLE = 10
#: store calls per unbatched cycle: enqueue + dequeue + 10 x add_span + update_attempt
CALLS_PER_CYCLE = SPANS_PER_CYCLE + 3

_SESSIONS: dict[tuple[str, str], Any] = {}

Step = Callable[[], tuple[int, int]]


# ------------------------------------------------------------------ sessions
def _connect_store(target: dict[str, Any]) -> Any:
    from mpstore import connect  # type: ignore[attr-defined]

    tls = {"tls_ca": target["tls_ca"]} if target.get("tls_ca") else {}  # the tls scenario's
    return connect(target["address"], authkey=target["authkey"], **tls)


def _open(target: dict[str, Any]) -> Any:
    kind = target["kind"]
    if kind == "store":
        return _connect_store(target)
    if kind == "inprocess":  # the store's own cost: no transport, records not copied,
        from mpstore import InMemoryStore  # as the server runs it

        return InMemoryStore(copy_records=False)
    opener = open_raw if kind == "raw" else open_manager
    return opener(tuple(target["address"]), target["authkey"])


def session(target: dict[str, Any]) -> Any:
    """This process's connection to ``target`` (opened on first use)."""
    key = (target["kind"], str(target["address"]))
    if key not in _SESSIONS:
        _SESSIONS[key] = _open(target)
    return _SESSIONS[key]


def _close(kind: str, handle: Any) -> None:
    try:
        if kind == "inprocess":
            return
        if kind == "store":
            close = getattr(handle, "close", None)
            if close is not None:
                close()
        else:
            close_handle(handle[1])
    except Exception:  # best effort: the server may be gone already
        pass


def drop_sessions(worker: int = 0) -> int:
    """Close every connection this worker holds; returns how many."""
    count = len(_SESSIONS)
    for (kind, _), handle in list(_SESSIONS.items()):
        _close(kind, handle)
    _SESSIONS.clear()
    return count


# ------------------------------------------------------------------ records
def make_span(span_cls: type, rollout_id: str, attempt_id: str, seq: int) -> Any:
    """A realistic small span: ids, a name, ~10 attributes, times, an OK status."""
    now = time.time()
    attributes = {
        "gen_ai.system": "openai",
        "gen_ai.request.model": "qwen2.5-7b-instruct",
        "gen_ai.request.temperature": 0.7,
        "gen_ai.request.max_tokens": 512,
        "gen_ai.response.id": f"chatcmpl-{rollout_id[-6:]}{seq:04d}",
        "gen_ai.response.finish_reasons": "stop",
        "gen_ai.usage.prompt_tokens": 312 + seq,
        "gen_ai.usage.completion_tokens": 87 + seq,
        "agentlightning.reward": 0.0 if seq < SPANS_PER_CYCLE - 1 else 1.0,
        "tool.name": "search" if seq % 2 else "calculator",
    }
    return span_cls(rollout_id, attempt_id, seq, f"openai.chat.completion.{seq}",
                    attributes=attributes, status={"status_code": "OK", "description": None},
                    start_time=now - 0.05, end_time=now)


def task_input(worker: int, n: int) -> dict[str, Any]:
    """A small rollout input, like a dataset row."""
    return {"question": f"What is {n} + {worker}?", "answer": str(n + worker), "id": n}


# ------------------------------------------------------------------ steps
def _echo_step(call: Callable[[Any], Any]) -> Step:
    def step() -> tuple[int, int]:
        call(PAYLOAD)
        return 1, 1

    return step


def _cycle_step(client: Any, worker: int) -> Step:
    from mpstore import Span

    counter = [0]

    def step() -> tuple[int, int]:
        counter[0] += 1
        client.enqueue_rollout(task_input(worker, counter[0]))
        claimed = client.dequeue_rollout()
        if claimed is None:  # another client took it and the queue ran dry
            return 0, 2
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        for seq in range(1, SPANS_PER_CYCLE + 1):
            client.add_span(make_span(Span, rid, aid, seq))
        client.update_attempt(rid, aid, status="succeeded")
        return 1, CALLS_PER_CYCLE

    return step


def batched_cycle(client: Any, worker: int, first: int, size: int) -> tuple[int, int, int]:
    """One batched cycle of ``size`` rollouts (inputs numbered from ``first``):
    enqueue_many -> dequeue_many -> add_many_spans (10 per rollout) -> update_attempt each.
    Returns (rollouts claimed, spans added, store calls made)."""
    from mpstore import Span

    client.enqueue_many_rollouts(
        [{"input": task_input(worker, first + i)} for i in range(size)])
    claimed = client.dequeue_many_rollouts(size)
    spans = [make_span(Span, r.rollout_id, r.attempt.attempt_id, seq)
             for r in claimed for seq in range(1, SPANS_PER_CYCLE + 1)]
    if spans:
        client.add_many_spans(spans)
    for r in claimed:
        client.update_attempt(r.rollout_id, r.attempt.attempt_id, status="succeeded")
    return len(claimed), len(spans), 2 + (1 if spans else 0) + len(claimed)


def _batched_step(client: Any, worker: int, batch: int) -> Step:
    counter = [0]

    def step() -> tuple[int, int]:
        claimed, _, calls = batched_cycle(client, worker, counter[0] + 1, batch)
        counter[0] += batch
        return claimed, calls

    return step


def _step_for(target: dict[str, Any], workload: str, worker: int, batch: int) -> Step:
    handle = session(target)
    if workload == "echo":
        return _echo_step(handle[0])
    if workload == "cycle":
        return _cycle_step(handle, worker)
    if workload == "batched":
        return _batched_step(handle, worker, batch)
    raise ValueError(f"unknown workload {workload!r}")


# ------------------------------------------------------------------ tasks
def prepare(target: dict[str, Any], workload: str, worker: int = 0, batch: int = 10,
            warmup_ops: int = 20) -> dict[str, Any]:
    """Connect (if needed) and run ``warmup_ops`` steps untimed."""
    began = time.perf_counter()
    step = _step_for(target, workload, worker, batch)
    for _ in range(warmup_ops):
        step()
    return {"pid": os.getpid(), "prepare_s": time.perf_counter() - began}


def measure(target: dict[str, Any], workload: str, start_at: float, end_at: float,
            worker: int = 0, batch: int = 10, max_ops: int = 10_000_000) -> dict[str, Any]:
    """Run ``workload`` steps in the window; returns ops (cycles or round trips), calls and
    the seconds actually measured."""
    step = _step_for(target, workload, worker, batch)
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    ops = calls = 0
    began = time.perf_counter()
    while ops < max_ops and time.time() < end_at:
        done, made = step()
        ops += done
        calls += made
    elapsed = time.perf_counter() - began
    return {"worker": worker, "ops": ops, "calls": calls, "elapsed": elapsed,
            "ops_per_s": ops / elapsed if elapsed > 0 else 0.0,
            "calls_per_s": calls / elapsed if elapsed > 0 else 0.0}


def _latency_store_op(client: Any, op: str) -> Callable[[], Any]:
    from mpstore import Span

    if op == "ping":
        return client.ping
    if op == "get_rollout_by_id":
        rid = client.start_rollout(task_input(0, 0)).rollout_id
        return lambda: client.get_rollout_by_id(rid)
    if op == "add_span":
        state: dict[str, Any] = {"seq": SPANS_PER_CYCLE}

        def add_span() -> Any:
            if state["seq"] >= SPANS_PER_CYCLE:  # a fresh attempt every 10 spans (untimed)
                claimed = client.start_rollout(task_input(0, 1))
                state.update(seq=0, rid=claimed.rollout_id, aid=claimed.attempt.attempt_id)
            state["seq"] += 1
            return make_span(Span, state["rid"], state["aid"], state["seq"])

        return add_span  # see latency(): building the span is not timed
    raise ValueError(f"unknown latency op {op!r}")


def latency(target: dict[str, Any], op: str, n: int, worker: int = 0,
            warmup: int = 50) -> list[int]:
    """Per-call nanoseconds of ``n`` calls of ``op`` from one client (nothing else timed)."""
    handle = session(target)
    samples: list[int] = []
    clock = time.perf_counter_ns
    if target["kind"] != "store":
        call = handle[0]
        for i in range(n + warmup):
            t0 = clock()
            call(PAYLOAD)
            if i >= warmup:
                samples.append(clock() - t0)
        return samples
    fn = _latency_store_op(handle, op)
    for i in range(n + warmup):
        if op == "add_span":
            span = fn()
            t0 = clock()
            handle.add_span(span)
        else:
            t0 = clock()
            fn()
        if i >= warmup:
            samples.append(clock() - t0)
    return samples


def first_call(target: dict[str, Any], samples: int, worker: int = 0) -> list[float]:
    """Seconds from opening a new connection to the first answered call, ``samples`` times
    (``ping`` for the store, one echo for the limits); each connection is closed after."""
    result: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        handle = _open(target)
        if target["kind"] == "store":
            handle.ping()
        else:
            handle[0](PAYLOAD)
        result.append(time.perf_counter() - t0)
        _close(target["kind"], handle)
    return result


def fill(target: dict[str, Any], rollouts: int, batch: int, deadline: float,
         worker: int = 0) -> dict[str, Any]:
    """Put ``rollouts`` finished rollouts with 10 spans each into the store, in batches
    (enqueue_many / dequeue_many / add_many_spans, then update_attempt per rollout); stops
    at ``deadline`` (``time.time()``) if the store is slower than hoped."""
    client = session(target)
    done = spans = calls = 0
    while done < rollouts and time.time() < deadline:
        size = min(batch, rollouts - done)
        _, added, made = batched_cycle(client, worker, done, size)
        # Fillers share the queue, but each dequeues what it enqueued, so a dequeue always
        # finds ``size`` rollouts waiting: counting ``size`` keeps the loop bounded.
        done += size
        spans += added
        calls += made
    return {"worker": worker, "rollouts": done, "spans": spans, "calls": calls}
