"""What watching a server costs (issue 14): the cycle at K=``metrics_k`` against two servers
started side by side, one with no accounting at all (``--no-call-stats``, the hot path as it
was before metrics) and one with call accounting and ``--metrics-port``, scraped every
``scrape_interval`` seconds while it is measured. Their windows alternate (off, on, on, off,
...) so both see the same load on the machine."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from .common import free_port, ratio
from .scenarios import Bench, summarize, throughput
from .servers import store_help, store_server


@contextlib.contextmanager
def scraping(port: int, interval: float) -> Iterator[dict[str, Any]]:
    """GET http://127.0.0.1:port/metrics every ``interval`` seconds in a thread; yields a
    dict that counts the scrapes (and failures) once the block has ended."""
    done, counts = threading.Event(), {"scrapes": 0, "failures": 0, "bytes": 0}

    def scrape() -> None:
        while not done.wait(interval):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=5) as answer:
                    counts["bytes"] = len(answer.read())
                counts["scrapes"] += 1
            except OSError:
                counts["failures"] += 1

    thread = threading.Thread(target=scrape, name="bench-scraper", daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        done.set()
        thread.join(10)


def run_metrics(bench: Bench) -> None:
    """The metrics on/off pair; skipped if ``agl store`` has no ``--metrics-port``."""
    cfg = bench.cfg
    if "--metrics-port" not in store_help():
        bench.results["metrics"] = {"skipped": "agl store has no --metrics-port"}
        return
    port = free_port()
    off = store_server(bench.workdir, "metrics-off", ["--no-call-stats"])
    on = store_server(bench.workdir, "metrics-on", ["--metrics-port", str(port)])
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    began = time.perf_counter()
    with bench.server(off) as srv_off, bench.server(on) as srv_on, \
            scraping(port, cfg.scrape_interval) as scrapes:
        pair = [("off", srv_off), ("on", srv_on)]
        for i in range(cfg.metrics_repeats):
            for name, srv in pair if i % 2 == 0 else pair[::-1]:
                runs[name].append(throughput(bench, srv, "cycle", cfg.metrics_k))
    off_fig, on_fig = summarize(runs["off"]), summarize(runs["on"])
    kept = ratio(on_fig["ops_per_s"], off_fig["ops_per_s"])
    per_call = ratio(on_fig["server_us_per_call"], off_fig["server_us_per_call"])
    bench.results["metrics"] = {
        "k": cfg.metrics_k, "repeats": cfg.metrics_repeats, "off": off_fig, "on": on_fig,
        "scrape_interval_s": cfg.scrape_interval, **scrapes,
        "seconds": time.perf_counter() - began,
        "ratio_on_to_off": kept,
        "cost_of_cycle": None if kept is None else 1 - kept,
        "server_cpu_per_call_on_to_off": per_call,
    }
