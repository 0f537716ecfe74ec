"""The rollout cycle against agent-lightning 0.2.2's own store server and client.

Runs inside a separate virtual environment that has ``agentlightning==0.2.2`` installed; it
imports only ``agentlightning`` and the standard library (never mpstore), and prints one JSON
object on stdout. The harness (``python -m benchmarks.run --compare-agl VENV``) launches it
with that environment's interpreter; by hand::

    /tmp/agl-venv/bin/python benchmarks/agl_workload.py serve --port 4848 &
    /tmp/agl-venv/bin/python benchmarks/agl_workload.py run --url http://127.0.0.1:4848 \\
        --plan cycle:1,cycle:4,gather:4 --repeats 3 --duration 3

``serve`` is ``agl store`` (``agentlightning.cli.store.main``: an ``InMemoryLightningStore``
behind ``LightningStoreServer``, agent-lightning's logger set-up) with one change: it binds
127.0.0.1 instead of the hard-coded 0.0.0.0.

``run --plan`` windows, each ``MODE:K`` run by the first K of ``max(K)`` client processes
started once: ``cycle`` (enqueue_rollout -> dequeue_rollout -> 10 x add_span ->
update_attempt, 13 calls) or ``gather`` (0.2.2 has no batch methods: each stage issues
``batch`` concurrent calls with ``asyncio.gather``); then (unless ``--n 0``) one client's
p50/p99 of get_rollout_by_id and add_span, and new client to first answered call. Those two
alone: ``--mode latency`` / ``--mode first_call``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import sys
import time
from typing import Any

SPANS = 10
CALLS_PER_CYCLE = SPANS + 3
READY_TIMEOUT = 300.0

# agentlightning imports litellm, which otherwise fetches a price list from the internet on
# import (seconds of retries on a machine without access).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def serve(port: int) -> int:
    """``agl store --port PORT`` of agentlightning 0.2.2, bound to 127.0.0.1."""
    from agentlightning.logging import configure_logger
    from agentlightning.store.client_server import LightningStoreServer
    from agentlightning.store.memory import InMemoryLightningStore

    configure_logger()
    server = LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=port)
    server._uvicorn_config.host = "127.0.0.1"  # 0.2.2 hard-codes 0.0.0.0 here
    try:
        asyncio.run(server.run_forever())
    except KeyboardInterrupt:
        pass
    return 0


def _span(rid: str, aid: str, seq: int) -> Any:
    from agentlightning.types.tracer import OtelResource, Span, TraceStatus

    now = time.time()
    attributes = {
        "gen_ai.system": "openai",
        "gen_ai.request.model": "qwen2.5-7b-instruct",
        "gen_ai.request.temperature": 0.7,
        "gen_ai.request.max_tokens": 512,
        "gen_ai.response.id": f"chatcmpl-{rid[-6:]}{seq:04d}",
        "gen_ai.response.finish_reasons": "stop",
        "gen_ai.usage.prompt_tokens": 312 + seq,
        "gen_ai.usage.completion_tokens": 87 + seq,
        "agentlightning.reward": 0.0 if seq < SPANS else 1.0,
        "tool.name": "search" if seq % 2 else "calculator",
    }
    return Span(rollout_id=rid, attempt_id=aid, sequence_id=seq, trace_id=secrets.token_hex(16),
                span_id=secrets.token_hex(8), parent_id=None,
                name=f"openai.chat.completion.{seq}",
                status=TraceStatus(status_code="OK"), attributes=attributes, events=[],
                links=[], start_time=now - 0.05, end_time=now, context=None, parent=None,
                resource=OtelResource(attributes={}, schema_url=""))


def _input(worker: int, n: int) -> dict[str, Any]:
    return {"question": f"What is {n} + {worker}?", "answer": str(n + worker), "id": n}


async def _cycle(client: Any, worker: int, n: int) -> tuple[int, int]:
    await client.enqueue_rollout(input=_input(worker, n))
    claimed = await client.dequeue_rollout()
    if claimed is None:
        return 0, 2
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    for seq in range(1, SPANS + 1):
        await client.add_span(_span(rid, aid, seq))
    await client.update_attempt(rid, aid, status="succeeded")
    return 1, CALLS_PER_CYCLE


async def _gather(client: Any, worker: int, n: int, batch: int) -> tuple[int, int]:
    await asyncio.gather(*[client.enqueue_rollout(input=_input(worker, n * batch + i))
                           for i in range(batch)])
    claimed = [c for c in await asyncio.gather(*[client.dequeue_rollout()
                                                 for _ in range(batch)]) if c is not None]
    await asyncio.gather(*[client.add_span(_span(c.rollout_id, c.attempt.attempt_id, seq))
                           for c in claimed for seq in range(1, SPANS + 1)])
    await asyncio.gather(*[client.update_attempt(c.rollout_id, c.attempt.attempt_id,
                                                 status="succeeded") for c in claimed])
    return len(claimed), 2 * batch + len(claimed) * (SPANS + 1)


class _Worker:
    """One client process's state: an event loop kept for the whole plan (aiohttp sessions
    belong to a loop) and one LightningStoreClient."""

    def __init__(self, url: str, index: int) -> None:
        from agentlightning.store.client_server import LightningStoreClient

        self.loop = asyncio.new_event_loop()
        self.client = LightningStoreClient(url)
        self.index = index
        self.n = 0

    async def step(self, mode: str, batch: int) -> tuple[int, int]:
        self.n += 1
        if mode == "gather":
            return await _gather(self.client, self.index, self.n, batch)
        return await _cycle(self.client, self.index, self.n)

    async def warm(self, mode: str, batch: int, steps: int) -> str:
        for _ in range(steps):
            await self.step(mode, batch)
        return "warm"

    async def window(self, mode: str, batch: int, start_at: float,
                     end_at: float) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        ops = calls = 0
        began = time.perf_counter()
        while time.time() < end_at:
            done, made = await self.step(mode, batch)
            ops, calls = ops + done, calls + made
        elapsed = time.perf_counter() - began
        return {"worker": self.index, "ops": ops, "calls": calls, "elapsed": elapsed,
                "ops_per_s": ops / elapsed, "calls_per_s": calls / elapsed}


def _worker_main(conn: Any, url: str, index: int) -> None:
    """Import agentlightning once, say ready, then run windows until told to stop."""
    try:
        worker = _Worker(url, index)
        conn.send("ready")
        while True:
            message = conn.recv()
            if message is None:
                break
            kind, *args = message
            job = worker.warm(*args) if kind == "warm" else worker.window(*args)
            conn.send(worker.loop.run_until_complete(job))
        worker.loop.run_until_complete(worker.client.close())
    except (EOFError, KeyboardInterrupt):
        return
    except BaseException as exc:  # report, do not hang the parent
        conn.send({"worker": index, "error": repr(exc)})


def _recv(conn: Any, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer from an agl worker within {timeout:.0f}s")
    reply = conn.recv()
    if isinstance(reply, dict) and "error" in reply:
        raise RuntimeError(f"agl worker {reply['worker']}: {reply['error']}")
    return reply


def run_plan(url: str, plan: list[tuple[str, int]], repeats: int, duration: float,
             batch: int, warmup: int) -> dict[str, Any]:
    """``max(K)`` client processes started once; each window of the plan (mode, K) runs on
    the first K of them, ``repeats`` times; per window the sum of the workers' rates."""
    ctx = multiprocessing.get_context("spawn")
    size = max(k for _, k in plan)
    pipes = [ctx.Pipe() for _ in range(size)]
    procs = [ctx.Process(target=_worker_main, args=(child, url, i), daemon=True)
             for i, (_, child) in enumerate(pipes)]
    for proc in procs:
        proc.start()
    conns = [parent for parent, _ in pipes]
    try:
        for conn in conns:  # spawned and imported agentlightning
            _recv(conn, READY_TIMEOUT)
        windows: dict[str, list[dict[str, Any]]] = {}
        for _ in range(repeats):
            for mode, k in plan:
                for conn in conns[:k]:  # warm up, then all start at the same instant
                    conn.send(("warm", mode, batch, warmup))
                for conn in conns[:k]:
                    _recv(conn, 300)
                start_at = time.time() + 0.1
                for conn in conns[:k]:
                    conn.send(("window", mode, batch, start_at, start_at + duration))
                results = [_recv(conn, duration + 120) for conn in conns[:k]]
                windows.setdefault(f"{mode}:{k}", []).append({
                    "ops_per_s": sum(r["ops_per_s"] for r in results),
                    "calls_per_s": sum(r["calls_per_s"] for r in results),
                    "late_workers": sum(r["elapsed"] < duration * 0.9 for r in results)})
    finally:
        for conn in conns:
            conn.send(None)
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
    return {"duration": duration, "repeats": repeats, "batch": batch, "windows": windows}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _summary(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50_us": _pct(samples, 50) * 1e6,
            "p99_us": _pct(samples, 99) * 1e6}


async def _latency(url: str, n: int, warmup: int = 30) -> dict[str, Any]:
    from agentlightning.store.client_server import LightningStoreClient

    client = LightningStoreClient(url)
    claimed = await client.start_rollout(input=_input(0, 0))
    read: list[float] = []
    add: list[float] = []
    for i in range(n + warmup):
        t0 = time.perf_counter()
        await client.get_rollout_by_id(claimed.rollout_id)
        t1 = time.perf_counter()
        if i >= warmup:
            read.append(t1 - t0)
    for i in range(n + warmup):
        if i % SPANS == 0:
            claimed = await client.start_rollout(input=_input(0, i))
        span = _span(claimed.rollout_id, claimed.attempt.attempt_id, i % SPANS + 1)
        t0 = time.perf_counter()
        await client.add_span(span)
        t1 = time.perf_counter()
        if i >= warmup:
            add.append(t1 - t0)
    await client.close()
    return {"get_rollout_by_id": _summary(read), "add_span": _summary(add)}


async def _first_call(url: str, samples: int) -> dict[str, Any]:
    from agentlightning.store.client_server import LightningStoreClient

    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        client = LightningStoreClient(url)
        await client.get_latest_resources()
        times.append(time.perf_counter() - t0)
        await client.close()
    return {"samples_s": times, "median_s": sorted(times)[len(times) // 2]}


def main(argv: list[str] | None = None) -> int:
    """``serve`` or ``run``; ``run`` prints one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--port", type=int, required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--url", required=True)
    p_run.add_argument("--mode", choices=["plan", "latency", "first_call"], default="plan")
    p_run.add_argument("--plan", default="cycle:1,cycle:4",
                       help="comma list of MODE:K windows, MODE cycle or gather")
    p_run.add_argument("--repeats", type=int, default=1)
    p_run.add_argument("--duration", type=float, default=3.0)
    p_run.add_argument("--batch", type=int, default=10)
    p_run.add_argument("--warmup", type=int, default=2)
    p_run.add_argument("--n", type=int, default=300,
                       help="latency calls per op (with --mode plan: after the windows, 0 "
                            "for none)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.port)
    if args.mode == "latency":
        result: dict[str, Any] = asyncio.run(_latency(args.url, args.n))
    elif args.mode == "first_call":
        result = asyncio.run(_first_call(args.url, 5))
    else:
        plan = [(part.split(":")[0], int(part.split(":")[1])) for part in args.plan.split(",")]
        result = run_plan(args.url, plan, args.repeats, args.duration, args.batch,
                          args.warmup)
        if args.n > 0:  # in the same run: agentlightning is imported once
            result["latency"] = asyncio.run(_latency(args.url, args.n))
            result["first_call"] = asyncio.run(_first_call(args.url, 5))
    from importlib.metadata import version

    result["agentlightning"] = version("agentlightning")
    result["pid"] = os.getpid()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
