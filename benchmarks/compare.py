"""Comparison mode: the same cycle against agent-lightning 0.2.2's ``agl store``.

agent-lightning lives in its own virtual environment (never a dependency of mpstore); the
harness starts its store server and its workload with that environment's interpreter, running
``benchmarks/agl_workload.py`` (which imports only agentlightning and the stdlib), and reads
the JSON it prints. See ``benchmarks/README.md`` for the set-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from .common import HOST, free_port, median
from .scenarios import Bench
from .servers import Server, running

SCRIPT = Path(__file__).resolve().parent / "agl_workload.py"
RUN_TIMEOUT = 600.0


def venv_python(venv: str) -> Path:
    """The interpreter of the virtual environment ``venv`` (a directory or a python path)."""
    path = Path(venv)
    if path.is_file():
        return path
    return path / "bin" / "python"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no network fetch on import
    return env


def agl_server(bench: Bench, python: Path) -> Server:
    """agent-lightning's store server on a free loopback port (not started yet)."""
    port = free_port()
    url = f"http://{HOST}:{port}"

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)

    server = Server("agl-store", [str(python), str(SCRIPT), "serve", "--port", str(port)],
                    bench.workdir / "agl-store.log", ready, {"kind": "agl", "url": url})
    server.env = _env()
    return server


def agl_run(python: Path, url: str, *args: str) -> dict[str, Any]:
    """One ``agl_workload.py run`` in the agl environment; its JSON."""
    out = subprocess.run([str(python), str(SCRIPT), "run", "--url", url, *args],
                         capture_output=True, text=True, timeout=RUN_TIMEOUT, env=_env(),
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"agl workload failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _windows(bench: Bench, python: Path, url: str) -> dict[str, Any]:
    """Every agl throughput window in one run of the workload (its clients import
    agentlightning once): the cycle at each K, the gather form at K=4."""
    cfg = bench.cfg
    gather_k = 4 if 4 in cfg.agl_ks else cfg.agl_ks[-1]
    plan = [f"cycle:{k}" for k in cfg.agl_ks] + [f"gather:{gather_k}"]
    out = agl_run(python, url, "--plan", ",".join(plan), "--repeats", str(cfg.repeats),
                  "--duration", str(max(cfg.duration, 2.0)), "--batch", str(cfg.batch),
                  "--n", "100" if cfg.quick else "300")
    figures: dict[str, Any] = {"cycle": {}, "gather": {}}
    for key, runs in out["windows"].items():
        mode, k = key.split(":")
        rates = [r["ops_per_s"] for r in runs]
        figures[mode][k] = {"ops_per_s": median(rates),
                            "calls_per_s": median([r["calls_per_s"] for r in runs]),
                            "runs": rates, "late_workers": sum(r["late_workers"] for r in runs)}
        bench.log(f"agl {mode} K={k}: {median(rates):,.1f} cycles/s (runs {rates})")
    figures["version"] = out.get("agentlightning")
    figures["latency"] = out.get("latency", {})
    figures["connect_ms"] = out["first_call"]["median_s"] * 1e3
    return figures


def run_agl(bench: Bench) -> None:
    """cycle at every agl K, the asyncio.gather form at K=4, latency, first call."""
    cfg = bench.cfg
    if not cfg.compare_agl:
        return
    python = venv_python(cfg.compare_agl)
    if not python.exists():
        bench.results["agl"] = {"skipped": f"no interpreter at {python}"}
        return
    server = agl_server(bench, python)
    with running(server, timeout=120.0) as srv:
        url = srv.target["url"]
        bench.log(f"agl-store up (pid {srv.pid}) at {url}")
        figures = _windows(bench, python, url)
        rss = srv.rss()
    bench.results["agl"] = {
        "version": figures["version"], "python": str(python),
        "cycle": {"per_k": figures["cycle"]},
        "gather": {"per_k": figures["gather"], "batch": cfg.batch},
        "latency": figures["latency"], "connect": {"median_ms": figures["connect_ms"]},
        "server_rss_mb": rss / 2**20,
    }
