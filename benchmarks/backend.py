"""The ``backend`` scenario: the cycle at K=``durable_k`` (4) on PostgreSQL (``agl store
--backend``), with one server and with two servers on one database (client i talks to
server i mod 2), beside the in-memory server, in the same run: the three windows are
interleaved, ``repeats`` times, and each figure is its median window.

Besides the rate it reports, per cycle, the CPU of the mpstore server(s) and of PostgreSQL
(the postmaster and all its backend processes, by psutil), from which benchmarks/README.md
argues the ceiling on a machine with more cores. The database is a throwaway cluster
(:mod:`mpstore.postgres.cluster`) with fsync on and ``synchronous_commit=off``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psutil

from . import workload
from .common import ratio
from .scenarios import TASK_TIMEOUT, Bench
from .servers import Server, store_server


def _tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live children."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def _window(bench: Bench, servers: list[Server], k: int, postmaster: int) -> dict[str, Any]:
    """One window of the cycle from ``k`` clients spread over ``servers``."""
    cfg, pool = bench.cfg, bench.pool
    targets = [servers[i % len(servers)].target for i in range(k)]
    pool.run(workload.prepare, [{"target": t, "workload": "cycle", "worker": i,
                                 "warmup_ops": 10} for i, t in enumerate(targets)],
             TASK_TIMEOUT)
    start_at = time.time() + 0.15
    end_at = start_at + cfg.duration
    pool.submit(workload.measure, [
        {"target": t, "workload": "cycle", "start_at": start_at, "end_at": end_at,
         "worker": i} for i, t in enumerate(targets)])
    time.sleep(max(0.0, start_at - time.time()))
    server0 = sum(s.cpu_seconds() for s in servers)
    pg0 = _tree_cpu(postmaster)
    time.sleep(max(0.0, end_at - time.time()))
    server1 = sum(s.cpu_seconds() for s in servers)
    pg1 = _tree_cpu(postmaster)
    runs = pool.collect(k, cfg.duration + TASK_TIMEOUT, "cycle")
    ops = sum(r["ops_per_s"] for r in runs)
    cycles = ops * cfg.duration
    return {"ops_per_s": ops, "calls_per_s": sum(r["calls_per_s"] for r in runs),
            "server_cpu": (server1 - server0) / cfg.duration,
            "postgres_cpu": (pg1 - pg0) / cfg.duration,
            "server_us_per_op": (server1 - server0) / cycles * 1e6 if cycles else None,
            "postgres_us_per_op": (pg1 - pg0) / cycles * 1e6 if cycles else None}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r["ops_per_s"])
    middle = dict(runs[len(runs) // 2])  # the median window, whole
    middle["runs"] = [r["ops_per_s"] for r in runs]
    return middle


@contextlib.contextmanager
def _servers(bench: Bench, url: str, count: int) -> Iterator[list[Server]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(bench.server(store_server(
            bench.workdir, f"pg-{i}", ["--backend", url]))) for i in range(count)]


def run_backend(bench: Bench) -> None:
    """See the module docstring; skipped (with the reason) without PostgreSQL."""
    from mpstore.postgres import cluster as pg

    reason = pg.unavailable()
    if reason is not None:
        bench.results["backend"] = {"skipped": reason}
        return
    k, repeats = bench.cfg.durable_k, bench.cfg.repeats
    db = pg.Cluster(durable=True)
    try:
        import psycopg

        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE mpstore_bench")
        url = db.url.rsplit("/", 1)[0] + "/mpstore_bench"
        setups: dict[str, list[Server]] = {}
        windows: dict[str, list[dict[str, Any]]] = {"memory": [], "1": [], "2": []}
        with contextlib.ExitStack() as stack:
            memory = stack.enter_context(bench.server(store_server(bench.workdir,
                                                                   "backend-memory")))
            servers = stack.enter_context(_servers(bench, url, 2))
            setups = {"memory": [memory], "1": servers[:1], "2": servers}
            # Interleaved, so that a change in the machine's load hits every figure alike.
            for i in range(repeats):
                for name, group in setups.items():
                    bench.log(f"backend: cycle K={k}, {name} ({i + 1}/{repeats})")
                    windows[name].append(_window(bench, group, k, db.postmaster_pid()))
    finally:
        db.remove()
    figures = {name: _median(runs) for name, runs in windows.items()}
    memory_rate = figures["memory"]["ops_per_s"]
    bench.results["backend"] = {
        "k": k, "memory": figures.pop("memory"), "servers": figures,
        "ratio_one_to_memory": ratio(figures["1"]["ops_per_s"], memory_rate),
        "ratio_two_to_memory": ratio(figures["2"]["ops_per_s"], memory_rate),
        "postgres": "throwaway cluster: fsync on, synchronous_commit=off",
    }
