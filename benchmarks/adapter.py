"""agent-lightning's workload through MpstoreLightningStore vs agent-lightning 0.3.0's own
LightningStoreServer + LightningStoreClient, and the adapter's overhead per call.

Runs in a virtual environment with ``agentlightning==0.3.0`` and mpstore installed (CI makes
one: .ci/setup.d/50-agentlightning.sh)::

    .venv-agl-0.3.0/bin/python -m benchmarks.adapter            # K=1,4, 5 s windows x 3
    .venv-agl-0.3.0/bin/python -m benchmarks.adapter --quick    # seconds, to see it works

The workload is one rollout's life as agent-lightning's runner lives it: ``enqueue_rollout``,
``dequeue_rollout``, 10 x ``add_otel_span`` (real OpenTelemetry ReadableSpans, converted by
the store), ``update_attempt(status="succeeded")``: 13 calls a cycle. K client processes run
it in a loop for a window each, against, in turn:

* ``adapter``: ``MpstoreLightningStore(connect(...))`` on an ``agl store`` (mpstore) server;
* ``agl``: agent-lightning 0.3.0's ``LightningStoreClient`` on its ``LightningStoreServer``
  over an ``InMemoryLightningStore(thread_safe=True)`` (what its ``agl store`` runs);
* ``plain``: the same calls through mpstore's own synchronous client (``add_otel_span`` of
  the same spans), the adapter's baseline: (adapter - plain) / 13 is its cost per call.

Every server is a subprocess on a free 127.0.0.1 port. Prints a table and one JSON object
(``--output`` to write it too). Figures are the median of the windows; as everywhere in
benchmarks/, judge ratios measured in the same run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

SPANS = 10
CALLS = SPANS + 3
HOST = "127.0.0.1"


def _readable_spans(n: int) -> list[Any]:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("benchmark")
    spans = []
    for i in range(n):
        with tracer.start_as_current_span(f"llm.call.{i}", attributes={"tokens": i}) as span:
            pass
        spans.append(span)
    return spans


# ----------------------------------------------------------------------------- servers
def _free_port() -> int:
    from mpstore.manager.ports import free_port

    return free_port()


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})


def _serve_agl(port: int) -> None:
    """agent-lightning 0.3.0's ``agl store`` (memory backend), bound to 127.0.0.1."""
    from agentlightning.store.client_server import LightningStoreServer
    from agentlightning.store.memory import InMemoryLightningStore

    server = LightningStoreServer(InMemoryLightningStore(thread_safe=True), host=HOST,
                                  port=port, launch_mode="asyncio")
    asyncio.run(server.run_forever())


def _wait_ready(check: Any, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


# ----------------------------------------------------------------------------- clients
def _adapter_store(target: dict[str, Any]) -> Any:
    from mpstore import connect
    from mpstore.agentlightning import MpstoreLightningStore

    return MpstoreLightningStore(connect(target["address"], target["authkey"]))


def _agl_store(target: dict[str, Any]) -> Any:
    from agentlightning.store.client_server import LightningStoreClient

    return LightningStoreClient(target["url"])


async def _async_cycles(store: Any, spans: list[Any], deadline: float, worker: int) -> int:
    done = 0
    while time.monotonic() < deadline:
        await store.enqueue_rollout({"worker": worker, "n": done})
        claimed = await store.dequeue_rollout(worker_id=f"w{worker}")
        if claimed is None:
            continue  # another client took it
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        for span in spans:
            await store.add_otel_span(rid, aid, span)
        await store.update_attempt(rid, aid, status="succeeded")
        done += 1
    return done


def _plain_cycles(store: Any, spans: list[Any], deadline: float, worker: int) -> int:
    done = 0
    while time.monotonic() < deadline:
        store.enqueue_rollout({"worker": worker, "n": done})
        claimed = store.dequeue_rollout(worker_id=f"w{worker}")
        if claimed is None:
            continue
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        for span in spans:
            store.add_otel_span(rid, aid, span)
        store.update_attempt(rid, aid, status="succeeded")
        done += 1
    return done


def _client(mode: str, target: dict[str, Any], worker: int, go: Any, duration: float,
            out: Any) -> None:
    """One client process: warm up, say so, wait for ``go``, run cycles for ``duration``."""
    spans = _readable_spans(SPANS)
    if mode == "plain":
        from mpstore import connect

        store = connect(target["address"], target["authkey"])
        _plain_cycles(store, spans, time.monotonic() + 0.2, worker)
        out.put("ready")
        go.wait()
        out.put(_plain_cycles(store, spans, time.monotonic() + duration, worker))
        return
    store = _adapter_store(target) if mode == "adapter" else _agl_store(target)

    async def go_on() -> int:
        await _async_cycles(store, spans, time.monotonic() + 0.2, worker)
        out.put("ready")
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        return await _async_cycles(store, spans, time.monotonic() + duration, worker)

    out.put(asyncio.run(go_on()))


def _window(mode: str, target: dict[str, Any], k: int, duration: float) -> float:
    """Cycles per second of K client processes in one window, started together once every
    one of them has imported everything and warmed up."""
    ctx = multiprocessing.get_context("spawn")
    out, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_client, args=(mode, target, i, go, duration, out))
             for i in range(k)]
    for p in procs:
        p.start()
    for _ in procs:
        assert out.get(timeout=600) == "ready"
    go.set()
    counts = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    return sum(counts) / duration


def _measure(mode: str, target: dict[str, Any], ks: list[int], repeats: int,
             duration: float) -> dict[str, Any]:
    result = {}
    for k in ks:
        runs = [_window(mode, target, k, duration) for _ in range(repeats)]
        median = statistics.median(runs)
        result[str(k)] = {"cycles_per_s": median, "calls_per_s": median * CALLS,
                          "us_per_call_per_client": (k / (median * CALLS) * 1e6
                                                     if median else None), "runs": runs}
    return result


# ----------------------------------------------------------------------------- run
def run(ks: list[int], repeats: int, duration: float, workdir: Path) -> dict[str, Any]:
    from mpstore import connect
    from mpstore.testing import write_key_file

    results: dict[str, Any] = {"ks": ks, "repeats": repeats, "window_s": duration,
                               "calls_per_cycle": CALLS}
    key = write_key_file(workdir / "mpstore.key").read_bytes().strip()
    port = _free_port()
    mp = _start([sys.executable, "-m", "mpstore", "store", "--port", str(port),
                 "--authkey-file", str(workdir / "mpstore.key"), "--log-level", "WARNING"],
                workdir / "mpstore.log")
    target = {"address": f"{HOST}:{port}", "authkey": key}
    try:
        _wait_ready(lambda: connect(target["address"], key, retry_for=0).ping(), mp)
        for mode in ("plain", "adapter"):
            results[mode] = _measure(mode, target, ks, repeats, duration)
    finally:
        mp.terminate()
        mp.wait(30)
    port = _free_port()
    agl = _start([sys.executable, "-c", f"from benchmarks.adapter import _serve_agl; "
                  f"_serve_agl({port})"], workdir / "agl.log")
    target = {"url": f"http://{HOST}:{port}"}
    try:
        import urllib.request

        _wait_ready(lambda: urllib.request.urlopen(f"{target['url']}/v1/agl/health",
                                                   timeout=2).status == 200, agl)
        results["agl"] = _measure("agl", target, ks, repeats, duration)
    finally:
        agl.terminate()
        agl.wait(30)
    results["ratios"] = _ratios(results)
    return results


def _ratios(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in map(str, results["ks"]):
        adapter = results["adapter"][k]["cycles_per_s"]
        agl = results["agl"][k]["cycles_per_s"]
        plain = results["plain"][k]["cycles_per_s"]
        out[k] = {
            "adapter_to_agl": adapter / agl if agl else None,
            "adapter_to_plain": adapter / plain if plain else None,
            # per call, per client: the time the adapter adds over mpstore's own client
            "adapter_overhead_us_per_call": (
                (int(k) / (adapter * CALLS) - int(k) / (plain * CALLS)) * 1e6
                if adapter and plain else None),
        }
    return out


def render(results: dict[str, Any]) -> str:
    rows = [f"agent-lightning workload ({CALLS} calls/cycle), median of {results['repeats']} "
            f"x {results['window_s']} s windows; cycles/s (calls/s)"]
    for k in map(str, results["ks"]):
        r = results["ratios"][k]
        cells = ", ".join(f"{mode} {results[mode][k]['cycles_per_s']:,.0f} "
                          f"({results[mode][k]['calls_per_s']:,.0f})"
                          for mode in ("adapter", "agl", "plain"))
        rows.append(f"K={k}: {cells}; adapter / agl 0.3.0 x{r['adapter_to_agl'] or 0:.1f} "
                    f"(target >= 10 at K=4); adapter / plain client "
                    f"x{r['adapter_to_plain'] or 0:.2f}, adapter overhead "
                    f"{r['adapter_overhead_us_per_call'] or 0:.0f} us per call")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adapter",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K=1,4, 1 window of 1 s")
    parser.add_argument("--k", default=None, help="client process counts, e.g. 1,4")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    ks = [int(k) for k in (args.k or "1,4").split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    duration = args.duration or (1.0 if args.quick else 5.0)
    with tempfile.TemporaryDirectory(prefix="mpstore-adapter-bench-") as tmp:
        results = run(ks, repeats, duration, Path(tmp))
    print(render(results))
    print(json.dumps(results))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
