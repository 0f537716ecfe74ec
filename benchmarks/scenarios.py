"""The main scenarios: the two limits, the unbatched and batched cycle at each K, single-call
latency and connect-to-first-call; plus the shared machinery (configuration, the ``Bench``
context, one throughput measurement, medians of repeats)."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import workload
from .common import latency_summary, median
from .pool import WorkerPool
from .profile import profiling
from .servers import Server, echo_server, running, store_server

#: every scenario ``--only`` accepts, in the order a full run does them
SCENARIOS = ("limits", "cycle", "batched", "inprocess", "latency", "connect", "scale",
             "runners", "durable", "paging", "metrics", "tls", "backend", "agl")
TASK_TIMEOUT = 120.0


@dataclass
class Config:
    """Everything a run is parameterised by (``run.py`` fills it from the command line)."""

    ks: list[int] = field(default_factory=lambda: [1, 4, 8])
    duration: float = 2.0
    repeats: int = 3
    batch: int = 10
    latency_n: int = 2000
    first_call_samples: int = 5
    scale_rollouts: int = 100_000
    fill_procs: int = 4
    fill_timeout: float = 120.0
    scale_k: int = 4
    runners: int = 1000
    runner_procs: int = 10
    runner_burst: int = 10
    idle_modes: list[str] = field(default_factory=lambda: ["wait", "hold"])
    idle_poll: float = 5.0
    runners_k: int = 4
    durable_k: int = 4
    metrics_k: int = 4
    metrics_repeats: int = 6
    scrape_interval: float = 1.0
    tls_k: int = 4
    #: seconds of unmeasured load before the first scenario (see warm_up)
    warmup: float = 45.0
    start_method: str = "spawn"
    quick: bool = False
    only: tuple[str, ...] = SCENARIOS
    compare_agl: str | None = None
    agl_ks: list[int] = field(default_factory=lambda: [1, 4, 8])
    output: Path = Path("benchmarks/results/latest.json")
    keep_workdir: bool = False
    profile: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        """Small counts and short windows: a whole pass in about half a minute."""
        return cls(ks=[1, 4, 8], duration=0.5, repeats=1, latency_n=300, first_call_samples=3,
                   scale_rollouts=5_000, fill_procs=2, fill_timeout=30.0, runners=100,
                   runner_procs=4, idle_poll=2.0, idle_modes=["wait"], quick=True,
                   metrics_repeats=2, scrape_interval=0.25,
                   agl_ks=[1, 4], warmup=0.0)

    def wants(self, name: str) -> bool:
        """Whether scenario ``name`` is part of this run."""
        return name in self.only


class Bench:
    """One harness run: configuration, a scratch directory, the client pool, the results."""

    def __init__(self, config: Config) -> None:
        self.cfg = config
        self.workdir = Path(tempfile.mkdtemp(prefix="mpstore-bench-"))
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self._pool: WorkerPool | None = None

    @property
    def profile_dir(self) -> Path:
        """Where py-spy's collapsed stacks go: ``profiles/`` next to the JSON file."""
        path = self.cfg.output.parent / "profiles"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def pool(self) -> WorkerPool:
        """The client processes (started on first use, as many as the largest K)."""
        if self._pool is None:
            size = max([*self.cfg.ks, self.cfg.scale_k, self.cfg.runners_k, self.cfg.durable_k,
                        self.cfg.metrics_k, self.cfg.fill_procs])
            self._pool = WorkerPool(size, self.cfg.start_method)
        return self._pool

    def reset_pool(self) -> None:
        """Throw the pool away (after a timeout its pipes may hold stale replies)."""
        if self._pool is not None:
            self._pool.close(timeout=2.0)
            self._pool = None

    def drop_sessions(self) -> None:
        """Close every worker's connections (before the servers they point at stop)."""
        if self._pool is not None:
            self._pool.run_same(workload.drop_sessions, self._pool.size, TASK_TIMEOUT)

    def log(self, message: str) -> None:
        """A progress line on stderr."""
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop the pool and remove the scratch directory (unless asked to keep it)."""
        self.reset_pool()
        if self.cfg.keep_workdir:
            self.log(f"scratch directory kept: {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def server(self, server: Server) -> Iterator[Server]:
        """Start ``server``, yield it; drop the pool's sessions and stop it afterwards."""
        with running(server) as srv:
            self.log(f"{srv.name} up (pid {srv.pid}) in {srv.start_seconds:.2f}s")
            try:
                yield srv
            finally:
                with contextlib.suppress(Exception):
                    self.drop_sessions()


# ------------------------------------------------------------------ measurements
def throughput(bench: Bench, server: Server, workload_name: str, k: int,
               profile: str | None = None) -> dict[str, Any]:
    """One window of ``workload_name`` from ``k`` clients: summed rates, and the server's
    CPU over the window (fraction of one core, microseconds per call). With ``profile`` (a
    label), py-spy samples the server and client 0 during the window."""
    cfg, pool, target = bench.cfg, bench.pool, server.target
    warmup = {"echo": 200, "cycle": 10, "batched": 3}[workload_name]
    prepared = pool.run_same(workload.prepare, k, TASK_TIMEOUT, target=target,
                             workload=workload_name, batch=cfg.batch, warmup_ops=warmup)
    start_at = time.time() + 0.15
    end_at = start_at + cfg.duration
    pool.submit(workload.measure, [
        {"target": target, "workload": workload_name, "start_at": start_at, "end_at": end_at,
         "worker": i, "batch": cfg.batch} for i in range(k)])
    time.sleep(max(0.0, start_at - time.time()))
    sampler: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if profile:
        sampler = profiling({"server": server.pid, "client0": prepared[0]["pid"]},
                            cfg.duration, bench.profile_dir, profile,
                            bench.results.setdefault("profiles", {}))
    with sampler:
        cpu0, ctx0 = server.cpu_seconds(), server.ctx_switches()
        time.sleep(max(0.0, end_at - time.time()))
        cpu1, ctx1 = server.cpu_seconds(), server.ctx_switches()
        runs = pool.collect(k, cfg.duration + TASK_TIMEOUT, workload_name)
    calls, ops = sum(r["calls_per_s"] for r in runs), sum(r["ops_per_s"] for r in runs)
    busy = (cpu1 - cpu0) / cfg.duration
    total_calls = calls * cfg.duration
    return {"ops_per_s": ops, "calls_per_s": calls, "server_cpu": busy,
            "server_us_per_call": busy / calls * 1e6 if calls else None,
            "server_us_per_op": busy / ops * 1e6 if ops else None,
            "server_ctx_switches_per_call": ((ctx1 - ctx0) / total_calls
                                             if calls and ctx0 is not None and ctx1 is not None
                                             else None),
            "ops": sum(r["ops"] for r in runs)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeated windows, with every window's rate kept under ``runs``."""
    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return median(values) if values else None

    return {"ops_per_s": med("ops_per_s"), "calls_per_s": med("calls_per_s"),
            "server_cpu": med("server_cpu"), "server_us_per_call": med("server_us_per_call"),
            "server_us_per_op": med("server_us_per_op"),
            "server_ctx_switches_per_call": med("server_ctx_switches_per_call"),
            "runs": [r["ops_per_s"] for r in runs],
            "spread": _spread([r["ops_per_s"] for r in runs])}


def _spread(values: list[float]) -> float | None:
    """(max - min) / median of repeated windows: how far to trust a figure."""
    mid = median(values) if values else 0.0
    return (max(values) - min(values)) / mid if mid else None


def repeated(bench: Bench, server: Server, workload_name: str, k: int,
             label: str | None = None) -> dict[str, Any]:
    """:func:`throughput` ``repeats`` times, summarised; with ``--profile`` the first window
    is sampled under ``label``."""
    profile = label if bench.cfg.profile else None
    runs = [throughput(bench, server, workload_name, k, profile if i == 0 else None)
            for i in range(bench.cfg.repeats)]
    return summarize(runs)


def latencies(bench: Bench, server: Server, op: str) -> dict[str, Any]:
    """p50/p99 of ``op`` from one client (worker 0), one sample set."""
    samples = bench.pool.run(workload.latency, [
        {"target": server.target, "op": op, "n": bench.cfg.latency_n}], TASK_TIMEOUT)[0]
    return latency_summary(samples)


def merge_latency(sets: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each latency figure over repeated sample sets."""
    keys = [k for k in sets[0] if k != "n"]
    merged: dict[str, Any] = {k: median([s[k] for s in sets]) for k in keys}
    merged["n"] = sum(s["n"] for s in sets)
    return merged


# ------------------------------------------------------------------ main section
def _k_figures(bench: Bench, servers: dict[str, Server], store: dict[str, Any]) -> None:
    """For every repeat and K: the echoes, the cycle, the batched cycle (interleaved, so the
    limits and the store are measured under the same conditions)."""
    cfg = bench.cfg
    plan = [(name, server, wl) for name, server, wl in (
        ("raw_echo", servers.get("raw"), "echo"),
        ("manager_echo", servers.get("manager"), "echo"),
        ("cycle", servers.get("store") if cfg.wants("cycle") else None, "cycle"),
        ("batched", servers.get("store") if cfg.wants("batched") else None, "batched"),
    ) if server is not None]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rep in range(cfg.repeats):
        for k in cfg.ks:
            for name, server, wl in plan:
                label = f"{name}:K={k}" if cfg.profile and rep == 0 else None
                run = throughput(bench, server, wl, k, label)
                runs.setdefault((name, k), []).append(run)
                bench.log(f"rep {rep + 1}/{cfg.repeats} K={k} {name}: "
                          f"{run['ops_per_s']:,.0f} ops/s, {run['calls_per_s']:,.0f} calls/s,"
                          f" server {run['server_cpu']:.0%} CPU")
    for (name, k), k_runs in runs.items():
        store.setdefault(name, {})[str(k)] = summarize(k_runs)


def _latency_figures(bench: Bench, servers: dict[str, Server]) -> dict[str, Any]:
    """Single-client p50/p99 of the echoes and of ping, get_rollout_by_id, add_span."""
    plan = [("raw_echo", "raw", "echo"), ("manager_echo", "manager", "echo"),
            ("ping", "store", "ping"), ("get_rollout_by_id", "store", "get_rollout_by_id"),
            ("add_span", "store", "add_span")]
    sets: dict[str, list[dict[str, Any]]] = {}
    for _ in range(bench.cfg.repeats):
        for name, kind, op in plan:
            if kind in servers:
                sets.setdefault(name, []).append(latencies(bench, servers[kind], op))
    return {name: merge_latency(s) for name, s in sets.items()}


def _first_call_figures(bench: Bench, servers: dict[str, Server]) -> dict[str, Any]:
    """Milliseconds from a new connection to the first answered call (median of samples)."""
    out: dict[str, Any] = {}
    for kind, server in servers.items():
        samples = bench.pool.run(workload.first_call, [
            {"target": server.target, "samples": bench.cfg.first_call_samples}],
            TASK_TIMEOUT)[0]
        out[kind] = {"median_ms": median(samples) * 1e3,
                     "samples_ms": [s * 1e3 for s in samples]}
    return out


def _inprocess_figures(bench: Bench) -> dict[str, Any]:
    """The cycle and the batched cycle against an ``InMemoryStore`` inside one client process
    (no transport): what the store logic and building the records cost per call."""
    cfg = bench.cfg
    target = {"kind": "inprocess", "address": "memory"}
    out: dict[str, Any] = {}
    for name in ("cycle", "batched"):
        runs = []
        for _ in range(cfg.repeats):
            bench.pool.run(workload.prepare, [{"target": target, "workload": name,
                                                "batch": cfg.batch}], TASK_TIMEOUT)
            start_at = time.time() + 0.05
            runs.append(bench.pool.run(workload.measure, [
                {"target": target, "workload": name, "start_at": start_at,
                 "end_at": start_at + cfg.duration, "batch": cfg.batch}], TASK_TIMEOUT +
                cfg.duration)[0])
        calls = median([r["calls_per_s"] for r in runs])
        out[name] = {"ops_per_s": median([r["ops_per_s"] for r in runs]), "calls_per_s": calls,
                     "us_per_call": 1e6 / calls if calls else None}
    bench.pool.run(workload.drop_sessions, [{}], TASK_TIMEOUT)
    return out


def warm_up(bench: Bench) -> None:
    """``cfg.warmup`` seconds of the K=4 cycle against an in-memory server, measured by
    nobody. Why: after a pause, this VM ran the first minute of load ~30 % slower than the
    rest of the run (the in-memory cycle read 899 cycles/s in a run's first minute and ~1,300
    later, benchmarks/README.md "The drift within a run"), and every ratio whose two sides
    are measured minutes apart (the agl ones, the runners' baseline) moved with it."""
    cfg = bench.cfg
    if cfg.warmup <= 0:
        return
    bench.log(f"warm-up: {cfg.warmup:.0f} s of the K=4 cycle, not measured")
    with bench.server(store_server(bench.workdir, "warmup")) as server:
        ends = time.monotonic() + cfg.warmup
        while time.monotonic() < ends:
            throughput(bench, server, "cycle", 4)


def run_main(bench: Bench) -> None:
    """limits, cycle, batched, latency, connect: one store server, two echo servers."""
    cfg = bench.cfg
    wanted = [n for n in ("limits", "cycle", "batched", "inprocess", "latency", "connect")
              if cfg.wants(n)]
    if not wanted:
        return
    need_echo = any(cfg.wants(n) for n in ("limits", "latency", "connect"))
    need_store = any(cfg.wants(n) for n in ("cycle", "batched", "latency", "connect"))
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        if need_echo:
            for kind in ("raw", "manager"):
                servers[kind] = stack.enter_context(bench.server(echo_server(bench.workdir,
                                                                             kind)))
        if need_store:
            servers["store"] = stack.enter_context(bench.server(store_server(bench.workdir)))
        figures: dict[str, Any] = {}
        if cfg.wants("limits") or cfg.wants("cycle") or cfg.wants("batched"):
            k_servers = {k: v for k, v in servers.items()
                         if k == "store" or cfg.wants("limits")}
            _k_figures(bench, k_servers, figures)
        if cfg.wants("limits"):
            bench.results["limits"] = {"raw_echo": figures.get("raw_echo", {}),
                                       "manager_echo": figures.get("manager_echo", {})}
        for name in ("cycle", "batched"):
            if cfg.wants(name):
                bench.results[name] = {"per_k": figures.get(name, {}), "batch": cfg.batch,
                                       "calls_per_cycle": workload.CALLS_PER_CYCLE}
        if cfg.wants("inprocess"):
            bench.log("inprocess: the cycle against an InMemoryStore in one client process")
            bench.results["inprocess"] = _inprocess_figures(bench)
        if cfg.wants("latency"):
            bench.log("latency: single client")
            bench.results["latency"] = _latency_figures(bench, servers)
        if cfg.wants("connect"):
            bench.log("connect: new connection to first answered call")
            bench.results["connect"] = _first_call_figures(bench, servers)
        if "store" in servers:
            bench.results.setdefault("servers", {})["main_store_rss_mb"] = (
                servers["store"].rss() / 2**20)
