"""Run the mpstore benchmarks: ``python -m benchmarks.run [--quick] [--only NAMES] [--k 4]``.

Starts real servers (``python -m mpstore store``, a raw ``multiprocessing.connection`` echo, a
``BaseManager`` echo) on free loopback ports with fresh 0600 key files, drives them from K
client processes, prints a table and writes JSON (default ``benchmarks/results/latest.json``).
Scenarios: limits, cycle, batched, inprocess, latency, connect, scale, runners, durable,
metrics, tls, backend (PostgreSQL: one and two servers; skipped without its binaries), agl
(only with ``--compare-agl VENV``). Exit status 1 if any scenario failed (its traceback is in
the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import servers
from .backend import run_backend
from .common import round_floats
from .compare import run_agl
from .extra import run_durable, run_runners, run_scale
from .observe import run_metrics
from .paging import run_paging
from .report import compute_ratios, compute_targets
from .scenarios import SCENARIOS, Bench, Config, run_main, warm_up
from .table import render
from .tls import run_tls

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; known: {SCENARIOS}")
    return names


def _modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    bad = [m for m in modes if m not in ("wait", "ping", "hold")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"idle modes are wait, ping, hold (not {bad})")
    return modes


def build_parser() -> argparse.ArgumentParser:
    """The command line (every numeric option overrides the full/quick default)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows, small counts (~30 s)")
    p.add_argument("--only", type=_names, help=f"comma list of {','.join(SCENARIOS)}")
    p.add_argument("--skip", type=_names, default=(), help="comma list of scenarios to skip")
    p.add_argument("--k", type=_ints, help="client process counts, e.g. 1,4,8 or 4")
    p.add_argument("--duration", type=float, help="seconds per measurement window")
    p.add_argument("--repeats", type=int, help="windows per figure (the median is reported)")
    p.add_argument("--batch", type=int, help="rollouts per batch in the batched cycle")
    p.add_argument("--latency-n", type=int, help="calls per latency sample set")
    p.add_argument("--scale-rollouts", type=int, help="finished rollouts to pre-fill (x10 "
                   "spans)")
    p.add_argument("--fill-procs", type=int, help="client processes filling the store")
    p.add_argument("--runners", type=int, help="idle connections in the runners scenario")
    p.add_argument("--runner-procs", type=int, help="processes holding those connections")
    p.add_argument("--runner-burst", type=int,
                   help="idle threads per process connecting at the same time (0: all)")
    p.add_argument("--idle-mode", type=_modes,
                   help="comma list of what idle runners do: wait (long-poll "
                        "wait_for_rollouts on a rollout that never finishes; the target's "
                        "mode), ping (every --idle-poll s), hold (nothing); full: wait,hold")
    p.add_argument("--idle-poll", type=float, help="idle runner poll period, seconds")
    p.add_argument("--metrics-repeats", type=int,
                   help="windows per server in the metrics on/off pair (alternating)")
    p.add_argument("--scrape-interval", type=float,
                   help="seconds between scrapes of the metrics endpoint while measured")
    p.add_argument("--warmup", type=float,
                   help="seconds of unmeasured load before the first scenario (full: 45, "
                        "quick: 0); the VM runs its first minute of load slower")
    p.add_argument("--start-method", choices=["spawn", "fork", "forkserver"],
                   help="multiprocessing start method of the client processes (spawn)")
    p.add_argument("--compare-agl", metavar="VENV",
                   help="virtual environment with agentlightning==0.2.2: run the same cycle "
                        "against its agl store")
    p.add_argument("--agl-k", type=_ints, help="K values for the agl comparison")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file to write")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the server and client 0 during the first window of each K "
                        "(collapsed stacks in profiles/ next to the JSON, summary printed)")
    p.add_argument("--server-log-level", default="warning",
                   choices=["debug", "info", "warning", "error"],
                   help="--log-level of the store servers (their logs are in the scratch "
                        "directory: see --keep-workdir)")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the scratch directory (server logs, key files)")
    return p


_OVERRIDES = {"k": "ks", "duration": "duration", "repeats": "repeats", "batch": "batch",
              "latency_n": "latency_n", "scale_rollouts": "scale_rollouts",
              "fill_procs": "fill_procs", "runners": "runners", "runner_procs": "runner_procs",
              "runner_burst": "runner_burst",
              "idle_mode": "idle_modes", "idle_poll": "idle_poll",
              "metrics_repeats": "metrics_repeats", "scrape_interval": "scrape_interval",
              "start_method": "start_method", "agl_k": "agl_ks", "warmup": "warmup"}


def config_from_args(args: argparse.Namespace) -> Config:
    """Full or quick defaults, then every option given on the command line."""
    cfg = Config.quick_config() if args.quick else Config()
    for option, attr in _OVERRIDES.items():
        value = getattr(args, option)
        if value is not None:
            setattr(cfg, attr, value)
    only = args.only or SCENARIOS
    cfg.only = tuple(n for n in only if n not in args.skip)
    cfg.compare_agl = args.compare_agl
    cfg.output = args.output
    cfg.keep_workdir = args.keep_workdir
    cfg.profile = args.profile
    cfg.runner_procs = max(1, min(cfg.runner_procs, cfg.runners))
    return cfg


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _meta(cfg: Config, seconds: float, load_start: list[float] | None) -> dict[str, Any]:
    try:
        from mpstore import __version__ as version
    except ImportError:
        version = None
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": "quick" if cfg.quick
            else "full", "argv": sys.argv[1:], "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "mpstore_version": version, "git_commit": _git_commit(), "ks": cfg.ks,
            "window_s": cfg.duration, "warmup_s": cfg.warmup, "repeats": cfg.repeats,
            "batch": cfg.batch,
            "start_method": cfg.start_method, "scenarios": list(cfg.only),
            "duration_s": seconds, "loadavg_start": load_start, "loadavg_end": _loadavg()}


def run_scenarios(bench: Bench) -> None:
    """Every selected scenario; a failure is recorded and the run goes on."""
    cfg = bench.cfg
    steps: list[tuple[str, bool, Callable[[Bench], None]]] = [
        ("warm-up", True, warm_up),
        ("main", any(cfg.wants(n) for n in ("limits", "cycle", "batched", "inprocess",
                                            "latency", "connect")), run_main),
        ("scale", cfg.wants("scale"), run_scale),
        ("runners", cfg.wants("runners"), run_runners),
        ("durable", cfg.wants("durable"), run_durable),
        ("paging", cfg.wants("paging"), run_paging),
        ("metrics", cfg.wants("metrics"), run_metrics),
        ("tls", cfg.wants("tls"), run_tls),
        ("backend", cfg.wants("backend"), run_backend),
        ("agl", cfg.wants("agl") and bool(cfg.compare_agl), run_agl),
    ]
    for name, wanted, fn in steps:
        if not wanted:
            continue
        began = time.perf_counter()
        try:
            fn(bench)
        except Exception:
            bench.errors[name] = traceback.format_exc()
            bench.log(f"{name} FAILED:\n{bench.errors[name]}")
            bench.reset_pool()
        bench.log(f"{name} done in {time.perf_counter() - began:.1f}s")


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write the JSON; 0 if every scenario ran."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    servers.STORE_LOG_LEVEL[0] = args.server_log_level
    began, load_start = time.perf_counter(), _loadavg()
    bench = Bench(cfg)
    try:
        run_scenarios(bench)
    finally:
        bench.close()
    results: dict[str, Any] = {"meta": _meta(cfg, time.perf_counter() - began, load_start),
                               **bench.results}
    results["ratios"] = compute_ratios(results)
    results["targets"] = compute_targets(results, results["ratios"])
    results["errors"] = bench.errors
    results = round_floats(results)
    print(render(results))
    try:
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        cfg.output.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    except OSError as exc:
        print(f"\ncould not write {cfg.output}: {exc}", file=sys.stderr)
        return 1
    print(f"\nJSON: {cfg.output}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
