"""Ratios to the physical limits, the targets of issue 4 (met / missed), the printed table."""

from __future__ import annotations

from typing import Any

from .common import ratio

#: agent-lightning 0.2.2 cycles/s at K=4 measured when issue 4 was written (60-73 cycles/s
#: for K=1..8); used for the agl targets only when this run did not measure agl itself.
AGL_REFERENCE_CYCLES = 73.0
TARGET_K = "4"


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _per_k(results: dict[str, Any], scenario: str) -> dict[str, Any]:
    if scenario in ("raw_echo", "manager_echo"):
        return _get(results, "limits", scenario) or {}
    return _get(results, scenario, "per_k") or {}


def compute_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Every ratio the run can form: per K to the echoes, latency, connect, agl, scale..."""
    out: dict[str, Any] = {"per_k": {}}
    mgr, raw = _per_k(results, "manager_echo"), _per_k(results, "raw_echo")
    cyc, bat = _per_k(results, "cycle"), _per_k(results, "batched")
    agl = _get(results, "agl", "cycle", "per_k") or {}
    for k in sorted(set(mgr) | set(cyc) | set(bat) | set(raw), key=int):
        m_ops, r_ops = _get(mgr, k, "ops_per_s"), _get(raw, k, "ops_per_s")
        out["per_k"][k] = {
            "manager_echo_to_raw_echo": ratio(m_ops, r_ops),
            "cycle_calls_to_manager_echo": ratio(_get(cyc, k, "calls_per_s"), m_ops),
            "cycle_calls_to_raw_echo": ratio(_get(cyc, k, "calls_per_s"), r_ops),
            "batched_calls_to_manager_echo": ratio(_get(bat, k, "calls_per_s"), m_ops),
            "cycle_server_us_per_call_to_echo": ratio(_get(cyc, k, "server_us_per_call"),
                                                      _get(mgr, k, "server_us_per_call")),
            "cycle_to_agl": ratio(_get(cyc, k, "ops_per_s"), _get(agl, k, "ops_per_s")),
            "batched_to_agl": ratio(_get(bat, k, "ops_per_s"), _get(agl, k, "ops_per_s")),
        }
    lat = results.get("latency") or {}
    echo_p50 = _get(lat, "manager_echo", "p50_us")
    out["latency"] = {
        op: {"p50_to_manager_echo_p50": ratio(_get(lat, op, "p50_us"), echo_p50),
             "p99_to_own_p50": ratio(_get(lat, op, "p99_us"), _get(lat, op, "p50_us"))}
        for op in ("ping", "get_rollout_by_id", "add_span", "manager_echo", "raw_echo")
        if op in lat}
    con = results.get("connect") or {}
    out["connect_store_to_manager_echo"] = ratio(_get(con, "store", "median_ms"),
                                                 _get(con, "manager", "median_ms"))
    out["scale_loaded_to_empty"] = _get(results, "scale", "ratio_loaded_to_empty")
    out["runners_with_to_without"] = _get(results, "runners", "ratio_with_to_without")
    out["durable_to_memory"] = _get(results, "durable", "ratio_durable_to_memory")
    out["metrics_on_to_off"] = _get(results, "metrics", "ratio_on_to_off")
    out["postgres_one_server_to_memory"] = _get(results, "backend", "ratio_one_to_memory")
    out["postgres_two_servers_to_memory"] = _get(results, "backend", "ratio_two_to_memory")
    return out


def _target(tid: str, text: str, value: float | None, threshold: float, higher: bool,
            basis: str = "measured in this run") -> dict[str, Any]:
    met = None if value is None else (value >= threshold if higher else value <= threshold)
    return {"id": tid, "target": text, "value": value, "threshold": threshold,
            "met": met, "basis": basis}


def compute_targets(results: dict[str, Any], ratios: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue-4 targets as ratios from this run; ``met`` is None when not measured."""
    k = TARGET_K
    targets = [_target("calls_vs_echo", "unbatched store calls/s at K=4 >= 0.6 x BaseManager "
                       "echo round trips/s at K=4",
                       _get(ratios, "per_k", k, "cycle_calls_to_manager_echo"), 0.6, True)]
    agl = _get(results, "agl", "cycle", "per_k", k, "ops_per_s")
    basis = "agent-lightning 0.2.2 measured in this run"
    if agl is None:
        agl = AGL_REFERENCE_CYCLES
        basis = f"issue-4 reference figure for agl 0.2.2 ({AGL_REFERENCE_CYCLES:.0f} cycles/s)"
    for tid, scenario, times in (("cycle_vs_agl", "cycle", 15), ("batched_vs_agl",
                                                                  "batched", 50)):
        value = ratio(_get(results, scenario, "per_k", k, "ops_per_s"), agl)
        targets.append(_target(tid, f"{scenario} cycles/s at K=4 >= {times} x agl 0.2.2",
                               value, float(times), True, basis))
    for op in ("get_rollout_by_id", "add_span"):
        lat = _get(ratios, "latency", op) or {}
        targets.append(_target(f"p50_{op}", f"{op} p50 <= 1.3 x BaseManager echo p50",
                               lat.get("p50_to_manager_echo_p50"), 1.3, False))
        targets.append(_target(f"p99_{op}", f"{op} p99 <= 3 x its own p50",
                               lat.get("p99_to_own_p50"), 3.0, False))
    targets.append(_target("scale", "cycle with 100k rollouts / 1M spans stored >= 0.8 x "
                           "empty store", ratios.get("scale_loaded_to_empty"), 0.8, True,
                           _scale_basis(results)))
    targets.append(_target("runners", "cycle of 4 clients with 1,000 idle connections >= "
                           "0.8 x without", ratios.get("runners_with_to_without"), 0.8, True,
                           _runners_basis(results)))
    metrics = results.get("metrics") or {}
    targets.append(_target("metrics", "cycle at K=4 with call accounting and a scraped "
                           "--metrics-port >= 0.95 x without (issue 14)",
                           ratios.get("metrics_on_to_off"), 0.95, True,
                           f"{metrics.get('repeats')} alternating windows each, scraped every "
                           f"{metrics.get('scrape_interval_s')} s" if metrics.get("on")
                           else "not measured"))
    targets.append(_target("postgres", "cycle at K=4 through one server on PostgreSQL >= 0.25 "
                           "x the in-memory server", ratios.get("postgres_one_server_to_memory"),
                           0.25, True))
    return targets


def _scale_basis(results: dict[str, Any]) -> str:
    scale = results.get("scale") or {}
    if not scale:
        return "not measured"
    return (f"{scale.get('stored_rollouts') or 0:,} rollouts / "
            f"{scale.get('stored_spans') or 0:,} spans stored")


def _runners_basis(results: dict[str, Any]) -> str:
    run = results.get("runners") or {}
    if not run:
        return "not measured"
    return f"{run.get('connected', 0):,} idle connections ({run.get('idle_mode')})"
