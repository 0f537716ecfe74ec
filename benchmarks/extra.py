"""The scenarios that need a server of their own: scale (a store already holding 100,000
finished rollouts and 1,000,000 spans), many runners (1,000 idle connections held open while
4 clients run the cycle) and durable mode (``--data-dir``)."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import threading
import time
from typing import Any

from . import workload
from .common import ratio, wait_until
from .scenarios import TASK_TIMEOUT, Bench, repeated, summarize, throughput
from .servers import Server, store_help, store_server

MB = 2**20


def _statistics(server: Server) -> dict[str, Any]:
    client = workload._connect_store(server.target)
    try:
        return dict(client.statistics())
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()


# ------------------------------------------------------------------ scale
def _fill(bench: Bench, server: Server) -> dict[str, Any]:
    """Batched bulk load from ``fill_procs`` clients; returns counts and seconds."""
    cfg = bench.cfg
    procs = min(cfg.fill_procs, bench.pool.size)
    share = math.ceil(cfg.scale_rollouts / procs)
    deadline = time.time() + cfg.fill_timeout
    began = time.perf_counter()
    done = bench.pool.run(workload.fill, [
        {"target": server.target, "rollouts": share, "batch": 100, "deadline": deadline,
         "worker": i} for i in range(procs)], cfg.fill_timeout + TASK_TIMEOUT)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "procs": procs,
            "rollouts": sum(d["rollouts"] for d in done), "spans": sum(d["spans"] for d in done),
            "calls": sum(d["calls"] for d in done),
            "complete": time.time() < deadline}


def run_scale(bench: Bench) -> None:
    """The cycle at K=``scale_k`` on an empty store, then on a store filled with
    ``scale_rollouts`` finished rollouts x 10 spans; server RSS per stored span."""
    cfg = bench.cfg
    with bench.server(store_server(bench.workdir, "scale")) as srv:
        bench.log(f"scale: cycle K={cfg.scale_k} on an empty store")
        empty = repeated(bench, srv, "cycle", cfg.scale_k, "scale-empty")
        stats0, rss0 = _statistics(srv), srv.rss()
        bench.log(f"scale: filling {cfg.scale_rollouts:,} rollouts x 10 spans")
        filled = _fill(bench, srv)
        stats1, rss1 = _statistics(srv), srv.rss()
        bench.log(f"scale: filled {filled['rollouts']:,} rollouts, {filled['spans']:,} spans"
                  f" in {filled['seconds']:.1f}s; RSS {rss0 / MB:.0f} -> {rss1 / MB:.0f} MB")
        loaded = repeated(bench, srv, "cycle", cfg.scale_k, "scale-loaded")
        stats2 = _statistics(srv)
    spans = stats1.get("total_spans", 0) - stats0.get("total_spans", 0)
    bench.results["scale"] = {
        "k": cfg.scale_k, "target_rollouts": cfg.scale_rollouts, "fill": filled,
        "fill_rollouts_per_s": filled["rollouts"] / filled["seconds"],
        "stored_rollouts": stats1.get("total_rollouts"), "stored_spans": stats1.get("total_spans"),
        "empty": empty, "loaded": loaded,
        "ratio_loaded_to_empty": ratio(loaded["ops_per_s"], empty["ops_per_s"]),
        "rss_before_mb": rss0 / MB, "rss_after_mb": rss1 / MB,
        "rss_bytes_per_span": (rss1 - rss0) / spans if spans else None,
        "store_span_bytes_per_span": (
            (stats1.get("span_bytes", 0) - stats0.get("span_bytes", 0)) / spans if spans
            else None),
        "evicted_during_run": stats2.get("total_spans", 0) < stats1.get("total_spans", 0),
    }


# ------------------------------------------------------------------ runners
def _idle_thread(client: Any, mode: str, sentinel: str, poll: float, ready: Any,
                 stop: Any, deadline: float, gate: threading.Semaphore) -> None:
    """One idle runner: answer once (at most ``gate``'s count of threads of this process
    connect at a time), report, then idle as ``mode`` says until told to stop."""
    try:
        with gate:
            client.ping()
        ready.put("ok")
    except Exception as exc:
        ready.put(f"error: {exc!r}")
        return
    while not stop.is_set() and time.time() < deadline:
        try:
            if mode == "wait":
                client.wait_for_rollouts(rollout_ids=[sentinel], timeout=poll)
            elif mode == "ping":
                client.ping()
                stop.wait(poll)
            else:  # "hold": keep the connection open, no traffic
                stop.wait(min(poll, max(0.0, deadline - time.time())))
        except Exception:
            if stop.is_set():
                return
            time.sleep(0.1)


def idle_runners(target: dict[str, Any], threads: int, mode: str, sentinel: str, poll: float,
                 ready: Any, stop: Any, deadline: float, burst: int) -> None:
    """A process of ``threads`` idle runners sharing one client (a connection per thread);
    ``burst`` threads at most connect at the same time (0: no limit)."""
    try:
        client = workload._connect_store(target)
    except Exception as exc:  # report every thread of this process, do not hang the parent
        for _ in range(threads):
            ready.put(f"error: {exc!r}")
        return
    gate = threading.Semaphore(burst if burst > 0 else threads)
    pool = [threading.Thread(target=_idle_thread, daemon=True,
                             args=(client, mode, sentinel, poll, ready, stop, deadline, gate))
            for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(max(0.0, deadline - time.time()) + poll + 5)


def _start_runners(bench: Bench, server: Server, sentinel: str, deadline: float, mode: str
                   ) -> tuple[list[Any], Any, dict[str, Any]]:
    """Start the idle runner processes and wait until every thread has answered once."""
    cfg = bench.cfg
    ctx = multiprocessing.get_context(cfg.start_method)
    ready, stop = ctx.Queue(), ctx.Event()
    per = math.ceil(cfg.runners / cfg.runner_procs)
    counts = [min(per, cfg.runners - i * per) for i in range(cfg.runner_procs)]
    procs = [ctx.Process(target=idle_runners, daemon=True, name=f"bench-idle-{i}",
                         args=(server.target, n, mode, sentinel, cfg.idle_poll,
                               ready, stop, deadline, cfg.runner_burst))
             for i, n in enumerate(counts) if n > 0]
    began = time.perf_counter()
    for proc in procs:
        proc.start()
    answers: list[str] = []

    def all_ready() -> bool:
        while len(answers) < sum(counts):
            if not any(p.is_alive() for p in procs) and ready.empty():
                raise RuntimeError("every idle runner process has exited")
            answers.append(ready.get(timeout=0.5))
        return True

    try:
        wait_until(all_ready, timeout=max(30.0, cfg.runners / 10), interval=0.0,
                   what=f"{cfg.runners} idle runners")
    except BaseException:
        _stop_runners(procs, stop, cfg.idle_poll)
        raise
    errors = [a for a in answers if a != "ok"]
    info = {"connected": len(answers) - len(errors), "errors": errors[:5],
            "error_count": len(errors), "seconds_to_connect": time.perf_counter() - began}
    return procs, stop, info


def _stop_runners(procs: list[Any], stop: Any, poll: float) -> None:
    stop.set()
    deadline = time.monotonic() + poll + 15
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.terminate()
            proc.join(2)


def _idle_cpu(server: Server, seconds: float = 1.0) -> float:
    """Cores the server burns while only the idle runners are connected."""
    cpu0 = server.cpu_seconds()
    time.sleep(seconds)
    return (server.cpu_seconds() - cpu0) / seconds


def _with_runners(bench: Bench, srv: Server, sentinel: str, mode: str,
                  without: dict[str, Any]) -> dict[str, Any]:
    """Hold ``runners`` idle connections in ``mode``, run the cycle, let them go."""
    cfg = bench.cfg
    rss0, threads0 = srv.rss(), srv.threads()
    budget = 60.0 + cfg.runners / 10 + cfg.repeats * (cfg.duration + 5) + cfg.idle_poll
    bench.log(f"runners: starting {cfg.runners} idle connections ({mode})")
    procs, stop, info = _start_runners(bench, srv, sentinel, time.time() + budget, mode)
    try:
        rss1, threads1 = srv.rss(), srv.threads()
        idle_cpu = _idle_cpu(srv)
        bench.log(f"runners ({mode}): {info['connected']} connected in "
                  f"{info['seconds_to_connect']:.1f}s; server threads {threads0} -> "
                  f"{threads1}, RSS {rss0 / MB:.0f} -> {rss1 / MB:.0f} MB, "
                  f"idle CPU {idle_cpu:.0%}")
        with_idle = repeated(bench, srv, "cycle", cfg.runners_k, f"runners-{mode}")
    finally:
        _stop_runners(procs, stop, cfg.idle_poll)
    n = max(1, info["connected"])
    return {
        "idle_mode": mode, **info, "with": with_idle,
        "ratio_with_to_without": ratio(with_idle["ops_per_s"], without["ops_per_s"]),
        "server_idle_cpu": idle_cpu,
        "rss_before_mb": rss0 / MB, "rss_with_mb": rss1 / MB,
        "rss_kb_per_connection": (rss1 - rss0) / n / 1024,
        "threads_before": threads0, "threads_with": threads1,
        "threads_per_connection": (threads1 - threads0) / n,
        "threads_after_stop": _settled_threads(srv, threads0),
    }


def run_runners(bench: Bench) -> None:
    """The cycle at K=``runners_k`` without, then with ``runners`` idle connections in each
    idle mode; the first mode is the one the issue-4 target is judged on."""
    cfg = bench.cfg
    # Every idle runner process also holds its main thread's connection, the pool its own:
    # raise the server's cap (1024 by default) above what this scenario opens.
    extra = (["--max-connections", str(cfg.runners + 256)]
             if "--max-connections" in store_help() else [])
    with bench.server(store_server(bench.workdir, "runners", extra)) as srv:
        without = repeated(bench, srv, "cycle", cfg.runners_k, "runners-without")
        client = workload._connect_store(srv.target)
        sentinel = client.start_rollout({"sentinel": True}).rollout_id  # never finishes
        getattr(client, "close", lambda: None)()
        modes = {mode: _with_runners(bench, srv, sentinel, mode, without)
                 for mode in cfg.idle_modes}
    primary = modes[cfg.idle_modes[0]]
    bench.results["runners"] = {
        "k": cfg.runners_k, "idle_connections": cfg.runners, "idle_poll_s": cfg.idle_poll,
        "runner_procs": cfg.runner_procs, "server_args": extra, "without": without,
        **primary, "modes": modes,
    }


def _settled_threads(server: Server, baseline: int, timeout: float = 10.0) -> int:
    """The server's thread count once it has dropped back to ``baseline`` (or after
    ``timeout``): a count that stays high means per-connection threads leak."""
    deadline = time.monotonic() + timeout
    count = server.threads()
    while count > baseline + 2 and time.monotonic() < deadline:
        time.sleep(0.25)
        count = server.threads()
    return count


# ------------------------------------------------------------------ durable
def run_durable(bench: Bench) -> None:
    """The cycle at K=``durable_k`` against ``--data-dir`` (default ``--synchronous``, and
    ``full`` too when the CLI has it) beside an in-memory server of its own, their windows
    interleaved ``repeats`` times (each figure the median window); skipped if the CLI has
    no ``--data-dir``.

    Why its own in-memory server, interleaved: the machine's speed drifts over a full run
    (the same in-memory cycle measured 899 cycles/s in the first minute and ~1,300 four
    minutes later), so a ratio against the main section's figure measured minutes earlier
    said as much about the drift as about the durable store."""
    cfg = bench.cfg
    help_text = store_help()
    if "--data-dir" not in help_text:
        bench.results["durable"] = {"skipped": "agl store has no --data-dir"}
        return
    levels = ["normal", "full"] if "--synchronous" in help_text else [None]
    windows: dict[str, list[dict[str, Any]]] = {"memory": []}
    with contextlib.ExitStack() as stack:
        servers = {"memory": stack.enter_context(
            bench.server(store_server(bench.workdir, "durable-baseline")))}
        for level in levels:
            name = f"durable-{level or 'default'}"
            extra = ["--data-dir", str(bench.workdir / name)]
            extra += ["--synchronous", level] if level else []
            servers[level or "default"] = stack.enter_context(
                bench.server(store_server(bench.workdir, name, extra)))
            windows[level or "default"] = []
        for rep in range(cfg.repeats):
            for key, srv in servers.items():
                label = f"durable-{key}" if cfg.profile and rep == 0 else None
                windows[key].append(throughput(bench, srv, "cycle", cfg.durable_k, label))
    memory = summarize(windows.pop("memory"))
    figures = {key: summarize(runs) for key, runs in windows.items()}
    first = figures[levels[0] or "default"]
    bench.results["durable"] = {
        "k": cfg.durable_k, "durable": first, "memory": memory, "synchronous": figures,
        "ratio_durable_to_memory": ratio(first["ops_per_s"], memory["ops_per_s"]),
        "ratios_by_synchronous": {lvl: ratio(f["ops_per_s"], memory["ops_per_s"])
                                  for lvl, f in figures.items()},
    }
