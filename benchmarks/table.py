"""The printed summary of a run (the JSON file has everything; this is what a human reads)."""

from __future__ import annotations

from typing import Any

from .report import _get, _per_k


def _fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "nan"
    return format(value, spec)


def _throughput_rows(results: dict[str, Any], ratios: dict[str, Any]) -> list[str]:
    ks = sorted({k for s in ("raw_echo", "manager_echo", "cycle", "batched")
                 for k in _per_k(results, s)} | set(_get(results, "agl", "cycle", "per_k")
                                                    or {}), key=int)
    if not ks:
        return []
    head = f"{'throughput (median of windows)':<44}" + "".join(f"{'K=' + k:>11}" for k in ks)
    rows = [head, "-" * len(head)]
    spec = [
        ("raw echo round trips/s", "raw_echo", "ops_per_s", ",.0f"),
        ("BaseManager echo round trips/s", "manager_echo", "ops_per_s", ",.0f"),
        ("cycle cycles/s", "cycle", "ops_per_s", ",.0f"),
        ("cycle store calls/s", "cycle", "calls_per_s", ",.0f"),
        ("batched cycles/s", "batched", "ops_per_s", ",.0f"),
        ("batched store calls/s", "batched", "calls_per_s", ",.0f"),
        ("server CPU us/call: BaseManager echo", "manager_echo", "server_us_per_call", ".1f"),
        ("server CPU us/call: cycle", "cycle", "server_us_per_call", ".1f"),
        ("server CPU us/cycle: cycle", "cycle", "server_us_per_op", ".0f"),
        ("server CPU us/cycle: batched", "batched", "server_us_per_op", ".0f"),
        ("server CPU (cores): cycle", "cycle", "server_cpu", ".2f"),
        ("server context switches/call: echo", "manager_echo", "server_ctx_switches_per_call",
         ".2f"),
        ("server context switches/call: cycle", "cycle", "server_ctx_switches_per_call",
         ".2f"),
    ]
    for label, scenario, key, fmt in spec:
        per = _per_k(results, scenario)
        if per:
            rows.append(f"{label:<44}" + "".join(f"{_fmt(_get(per, k, key), fmt):>11}"
                                                 for k in ks))
    for label, key in (("agl 0.2.2 cycle cycles/s", "cycle"),
                       ("agl 0.2.2 gather cycles/s", "gather")):
        agl = _get(results, "agl", key, "per_k") or {}
        if agl:
            rows.append(f"{label:<44}" + "".join(
                f"{_fmt(_get(agl, k, 'ops_per_s'), ',.1f'):>11}" for k in ks))
    for label, key in (("ratio cycle calls / BaseManager echo", "cycle_calls_to_manager_echo"),
                       ("ratio cycle calls / raw echo", "cycle_calls_to_raw_echo"),
                       ("ratio batched calls / BaseManager echo",
                        "batched_calls_to_manager_echo"),
                       ("ratio BaseManager echo / raw echo", "manager_echo_to_raw_echo"),
                       ("ratio cycle / agl cycle", "cycle_to_agl"),
                       ("ratio batched / agl cycle", "batched_to_agl")):
        values = [_get(ratios, "per_k", k, key) for k in ks]
        if any(v is not None for v in values):
            rows.append(f"{label:<44}" + "".join(f"{_fmt(v, '.3f'):>11}" for v in values))
    return rows


def _latency_rows(results: dict[str, Any], ratios: dict[str, Any]) -> list[str]:
    lat = results.get("latency") or {}
    agl = _get(results, "agl", "latency") or {}
    if not lat and not agl:
        return []
    head = (f"{'single-client latency':<32}{'p50 us':>10}{'p99 us':>10}"
            f"{'p50/echo p50':>14}{'p99/own p50':>13}")
    rows = [head, "-" * len(head)]
    for op, data in [*lat.items(), *((f"agl 0.2.2 {k}", v) for k, v in agl.items())]:
        rat = _get(ratios, "latency", op) or {}
        rows.append(f"{op:<32}{_fmt(data.get('p50_us'), ',.1f'):>10}"
                    f"{_fmt(data.get('p99_us'), ',.1f'):>10}"
                    f"{_fmt(rat.get('p50_to_manager_echo_p50'), '.2f'):>14}"
                    f"{_fmt(rat.get('p99_to_own_p50'), '.2f'):>13}")
    return rows


def _small_rows(results: dict[str, Any]) -> list[str]:
    rows: list[str] = []
    inproc = results.get("inprocess") or {}
    if inproc:
        rows.append("in-process InMemoryStore, one client, no transport: " + ", ".join(
            f"{name} {_fmt(d.get('ops_per_s'))} cycles/s = {_fmt(d.get('us_per_call'), '.1f')}"
            f" us/call" for name, d in inproc.items()))
    con = results.get("connect") or {}
    parts = [f"{k} {_fmt(v.get('median_ms'), '.2f')} ms" for k, v in con.items()]
    agl = _get(results, "agl", "connect", "median_ms")
    if agl is not None:
        parts.append(f"agl 0.2.2 {agl:.2f} ms")
    if parts:
        rows.append("connect -> first answered call (median): " + ", ".join(parts))
    dur = results.get("durable") or {}
    if dur.get("skipped"):
        rows.append(f"durable: skipped ({dur['skipped']})")
    elif dur:
        levels = ", ".join(
            f"synchronous={lvl} {_fmt(fig.get('ops_per_s'))} cycles/s "
            f"(x{_fmt(_get(dur, 'ratios_by_synchronous', lvl), '.3f')}, server "
            f"{_fmt(fig.get('server_us_per_op'))} us CPU/cycle)"
            for lvl, fig in (dur.get("synchronous") or {}).items())
        rows.append(f"durable K={dur['k']}: {levels}; in-memory "
                    f"{_fmt(_get(dur, 'memory', 'ops_per_s'))} cycles/s")
    met = results.get("metrics") or {}
    if met.get("skipped"):
        rows.append(f"metrics: skipped ({met['skipped']})")
    elif met:
        rows.append(
            f"metrics K={met['k']}: off {_fmt(_get(met, 'off', 'ops_per_s'))} -> on "
            f"{_fmt(_get(met, 'on', 'ops_per_s'))} cycles/s "
            f"(x{_fmt(met.get('ratio_on_to_off'), '.3f')}); server CPU/call "
            f"{_fmt(_get(met, 'off', 'server_us_per_call'), '.1f')} -> "
            f"{_fmt(_get(met, 'on', 'server_us_per_call'), '.1f')} us; "
            f"{met.get('scrapes', 0)} scrapes ({met.get('failures', 0)} failed)")
    rows += _tls_rows(results)
    rows += _backend_rows(results.get("backend") or {})
    return rows


def _tls_rows(results: dict[str, Any]) -> list[str]:
    tls = results.get("tls") or {}
    if tls.get("skipped"):
        return [f"tls: skipped ({tls['skipped']})"]
    if not tls:
        return []
    return [f"tls K={tls['k']}: cycle {_fmt(_get(tls, 'tls', 'ops_per_s'))} cycles/s with TLS, "
            f"{_fmt(_get(tls, 'plain', 'ops_per_s'))} without (x"
            f"{_fmt(tls.get('ratio_tls_to_plain'), '.3f')}; server "
            f"{_fmt(_get(tls, 'tls', 'server_us_per_op'))} vs "
            f"{_fmt(_get(tls, 'plain', 'server_us_per_op'))} us CPU/cycle); connect -> first "
            f"call {_fmt(_get(tls, 'first_call_ms', 'tls'), '.2f')} ms with TLS, "
            f"{_fmt(_get(tls, 'first_call_ms', 'plain'), '.2f')} ms without"]


def _backend_rows(back: dict[str, Any]) -> list[str]:
    if back.get("skipped"):
        return [f"backend: skipped ({back['skipped']})"]
    if not back:
        return []
    keys = {"1": "ratio_one_to_memory", "2": "ratio_two_to_memory"}
    parts = [f"{n} server(s) {_fmt(fig.get('ops_per_s'))} cycles/s "
             f"(x{_fmt(back.get(keys.get(n, '')), '.3f')}; per cycle: servers "
             f"{_fmt(fig.get('server_us_per_op'))} us CPU, PostgreSQL "
             f"{_fmt(fig.get('postgres_us_per_op'))} us CPU)"
             for n, fig in (back.get("servers") or {}).items()]
    return [f"postgres K={back['k']}: " + "; ".join(parts)
            + f"; in-memory {_fmt(_get(back, 'memory', 'ops_per_s'))} cycles/s"]


def _scale_rows(results: dict[str, Any]) -> list[str]:
    rows: list[str] = []
    scale = results.get("scale") or {}
    if scale:
        rows.append(
            f"scale K={scale['k']}: {scale.get('stored_rollouts') or 0:,} rollouts / "
            f"{scale.get('stored_spans') or 0:,} spans stored (fill "
            f"{scale['fill']['seconds']:.1f}s, {scale['fill_rollouts_per_s']:,.0f} rollouts/s); "
            f"cycle {_fmt(_get(scale, 'empty', 'ops_per_s'))} -> "
            f"{_fmt(_get(scale, 'loaded', 'ops_per_s'))} cycles/s "
            f"(x{_fmt(scale.get('ratio_loaded_to_empty'), '.3f')}); RSS "
            f"{_fmt(scale.get('rss_bytes_per_span'))} B/span "
            f"(store's estimate {_fmt(scale.get('store_span_bytes_per_span'))} B)")
    paging = results.get("paging") or {}
    if paging:
        ratios = paging.get("ratios_to_baseline") or {}
        rows.append(
            f"paging: a page of {paging['page']} of {paging['stored_rollouts']:,} rollouts, "
            f"p50 us (x a store of one page, "
            f"{_fmt(_get(paging, 'baseline_whole_store_of_one_page', 'p50_us'), '.0f')} us): "
            + ", ".join(f"{name} {_fmt(_get(paging, name, 'p50_us'), '.0f')} "
                        f"(x{_fmt(ratios.get(name), '.2f')})" for name in ratios))
    run = results.get("runners") or {}
    for mode, data in (run.get("modes") or {}).items():
        rows.append(
            f"runners K={run['k']}: {data.get('connected', 0):,} idle ({mode}) "
            f"connected in {data['seconds_to_connect']:.1f}s; cycle "
            f"{_fmt(_get(run, 'without', 'ops_per_s'))} -> "
            f"{_fmt(_get(data, 'with', 'ops_per_s'))} cycles/s "
            f"(x{_fmt(data.get('ratio_with_to_without'), '.3f')}); server idle CPU "
            f"{_fmt(data.get('server_idle_cpu'), '.2f')} cores; "
            f"{_fmt(data.get('rss_kb_per_connection'), '.1f')} KiB and "
            f"{_fmt(data.get('threads_per_connection'), '.2f')} threads per connection; "
            f"threads {data['threads_before']} -> {data['threads_with']} -> "
            f"{data['threads_after_stop']} after")
    return rows


def _target_rows(targets: list[dict[str, Any]]) -> list[str]:
    rows = ["issue-4 targets", "-" * 15]
    for t in targets:
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[t["met"]]
        rows.append(f"[{mark}] {t['target']}: {_fmt(t['value'], '.3f')} "
                    f"(threshold {t['threshold']}; {t['basis']})")
    return rows


def _profile_rows(results: dict[str, Any], top: int = 8) -> list[str]:
    rows: list[str] = []
    for label, roles in (results.get("profiles") or {}).items():
        if "skipped" in roles:
            return [f"profiles: {roles['skipped']}"]
        for role, data in roles.items():
            if "error" in data:
                rows.append(f"profile {label} {role}: py-spy failed: {data['error']}")
                continue
            rows.append(f"profile {label} {role}: GIL held {data['gil_held_pct']}% of the window"
                        f" ({data['samples']} samples, {data['file']})")
            rows.append("  self:      " + "; ".join(
                f"{pct}% {frame}" for frame, pct in data["self_pct"][:top]))
            rows.append("  inclusive: " + "; ".join(
                f"{pct}% {frame}" for frame, pct in data["inclusive_pct"][:top]))
    return rows


def render(results: dict[str, Any]) -> str:
    """The whole table as text."""
    ratios, targets = results.get("ratios", {}), results.get("targets", [])
    meta = results.get("meta", {})
    blocks = [[f"mpstore benchmark ({meta.get('mode', '?')} mode, {meta.get('cpus', '?')} CPUs,"
               f" {meta.get('duration_s', 0):.0f}s, windows of {meta.get('window_s')}s x "
               f"{meta.get('repeats')}; load average {meta.get('loadavg_start')} at start, "
               f"{meta.get('loadavg_end')} at end: other work on the machine skews figures, "
               f"ratios less)"],
              _throughput_rows(results, ratios), _latency_rows(results, ratios),
              _small_rows(results) + _scale_rows(results), _profile_rows(results),
              _target_rows(targets)]
    errors = results.get("errors") or {}
    if errors:
        blocks.append([f"ERROR in {name}: {msg.splitlines()[-1] if msg else ''}"
                       for name, msg in errors.items()])
    return "\n\n".join("\n".join(b) for b in blocks if b)
