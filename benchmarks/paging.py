"""Paging: a page of 100 rollouts out of ``scale_rollouts`` (100,000 in a full run) must cost
about what all rollouts of a store holding only 100 cost: the store reads the page, not the
whole table. Measured through a server (one client, sequential calls), against that baseline
measured in the same run."""

from __future__ import annotations

import time
from typing import Any

from . import workload
from .common import latency_summary, ratio
from .scenarios import Bench
from .servers import store_server

PAGE = 100

#: name -> query_rollouts keyword arguments (``N`` stands for the number stored).
QUERIES: dict[str, dict[str, Any]] = {
    "first_page": {"limit": PAGE},
    "last_page": {"limit": PAGE, "offset": -PAGE},
    "status_page": {"status_in": ["queuing"], "limit": PAGE, "offset": PAGE},
    "rare_status_page": {"status_in": ["succeeded"], "limit": PAGE},
    "sorted_page": {"sort_by": "start_time", "sort_order": "desc", "limit": PAGE},
}


def _fill(client: Any, rollouts: int) -> None:
    for start in range(0, rollouts, 1000):
        client.enqueue_many_rollouts([{"input": {"i": i}} for i in
                                      range(start, min(start + 1000, rollouts))])


def _time(call: Any, n: int) -> dict[str, Any]:
    samples = []
    for _ in range(n):
        began = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - began)
    return latency_summary(samples)


def _measure(bench: Bench, rollouts: int, queries: dict[str, dict[str, Any]], n: int
             ) -> dict[str, Any]:
    with bench.server(store_server(bench.workdir, f"paging-{rollouts}")) as srv:
        client = workload._connect_store(srv.target)
        try:
            _fill(client, rollouts)
            rare = client.query_rollouts(limit=PAGE, offset=rollouts // 2)
            for rollout in rare:  # a status only 1 rollout in 1,000 has, scattered
                client.update_rollout(rollout.rollout_id, status="succeeded")
            out = {}
            for name, kwargs in queries.items():
                given = {k: (rollouts + v if k == "offset" and v < 0 else v)
                         for k, v in kwargs.items()}
                assert len(client.query_rollouts(**given)) <= PAGE
                out[name] = _time(lambda g=given: client.query_rollouts(**g), n)
            return out
        finally:
            client.close()


def run_paging(bench: Bench) -> None:
    """p50 of each page query on a store of ``scale_rollouts`` rollouts, and the ratio to
    ``query_rollouts()`` of a store holding exactly one page."""
    cfg = bench.cfg
    n = max(20, cfg.latency_n // 10)
    stored = max(cfg.scale_rollouts, 2 * PAGE)
    bench.log(f"paging: {stored:,} rollouts, pages of {PAGE}")
    loaded = _measure(bench, stored, QUERIES, n)
    baseline = _measure(bench, PAGE, {"whole_store": {}}, n)["whole_store"]
    bench.results["paging"] = {
        "stored_rollouts": stored, "page": PAGE, "baseline_whole_store_of_one_page": baseline,
        **loaded,
        "ratios_to_baseline": {name: ratio(data["p50_us"], baseline["p50_us"])
                               for name, data in loaded.items()},
    }
