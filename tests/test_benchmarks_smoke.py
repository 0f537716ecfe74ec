"""Smoke test of the benchmark harness: it runs end to end in a tiny mode and writes JSON
with the expected shape. Nothing here asserts a timing (the benchmark measures; tests don't).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import run as bench_run
from benchmarks.common import latency_summary, percentile, write_keyfile
from benchmarks.report import compute_ratios, compute_targets

TINY = ["--quick", "--k", "1,2", "--duration", "0.2", "--repeats", "1", "--latency-n", "20",
        "--scale-rollouts", "200", "--fill-procs", "2", "--runners", "6", "--runner-procs",
        "2", "--idle-poll", "0.5", "--start-method", "spawn"]


def test_keyfile_is_private_and_random(tmp_path: Path) -> None:
    path, key = write_keyfile(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == key and len(key) == 64
    other, key2 = write_keyfile(tmp_path, "second")
    assert key2 != key and other != path


def test_statistics_helpers() -> None:
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([], 50) != percentile([], 50)  # NaN
    summary = latency_summary([1000, 2000, 3000])
    assert summary["p50_us"] == 2.0 and summary["n"] == 3


def test_targets_without_measurements_are_not_applicable() -> None:
    ratios = compute_ratios({})
    targets = compute_targets({}, ratios)
    assert targets and all(t["met"] is None for t in targets)


@pytest.mark.timeout(180)
def test_quick_run_writes_expected_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = bench_run.main([*TINY, "--skip", "agl,backend", "--output", str(out)])
    data = json.loads(out.read_text())
    assert data["errors"] == {}, data["errors"]
    assert code == 0
    assert {"meta", "limits", "cycle", "batched", "inprocess", "latency", "connect", "scale",
            "runners", "durable", "metrics", "ratios", "targets", "errors"} <= set(data)
    assert {"ops_per_s", "us_per_call"} <= set(data["inprocess"]["cycle"])
    for name in ("raw_echo", "manager_echo"):
        assert set(data["limits"][name]) == {"1", "2"}
        assert {"ops_per_s", "calls_per_s", "runs"} <= set(data["limits"][name]["1"])
    for name in ("cycle", "batched"):
        assert {"ops_per_s", "calls_per_s", "server_us_per_call"} <= set(
            data[name]["per_k"]["2"])
    for op in ("manager_echo", "get_rollout_by_id", "add_span", "ping"):
        assert {"p50_us", "p99_us", "n"} <= set(data["latency"][op])
    assert {"store", "manager", "raw"} <= set(data["connect"])
    assert {"empty", "loaded", "ratio_loaded_to_empty", "rss_bytes_per_span"} <= set(
        data["scale"])
    assert {"with", "without", "ratio_with_to_without", "threads_per_connection",
            "rss_kb_per_connection"} <= set(data["runners"])
    assert data["runners"]["connected"] == 6
    assert "skipped" in data["durable"] or "ratio_durable_to_memory" in data["durable"]
    assert {"off", "on", "ratio_on_to_off", "scrapes"} <= set(data["metrics"])
    ids = {t["id"] for t in data["targets"]}
    assert {"calls_vs_echo", "cycle_vs_agl", "batched_vs_agl", "scale", "runners",
            "metrics"} <= ids
    assert all(t["met"] in (True, False, None) for t in data["targets"])


@pytest.mark.timeout(180)
def test_backend_scenario(tmp_path: Path) -> None:
    """PostgreSQL beside in-memory (one and two servers); skipped inside without PostgreSQL."""
    out = tmp_path / "backend.json"
    code = bench_run.main([*TINY, "--only", "backend", "--k", "2", "--output", str(out)])
    data = json.loads(out.read_text())
    assert data["errors"] == {}, data["errors"]
    assert code == 0
    back = data["backend"]
    if "skipped" in back:
        return
    assert set(back["servers"]) == {"1", "2"}
    for figure in back["servers"].values():
        assert figure["ops_per_s"] > 0
        assert {"server_us_per_op", "postgres_us_per_op", "runs"} <= set(figure)
    assert "postgres" in {t["id"] for t in data["targets"]}


def test_only_one_scenario(tmp_path: Path) -> None:
    out = tmp_path / "one.json"
    code = bench_run.main([*TINY, "--only", "limits", "--k", "1", "--output", str(out)])
    data = json.loads(out.read_text())
    assert code == 0
    assert "cycle" not in data and "scale" not in data
    assert set(data["limits"]["manager_echo"]) == {"1"}


@pytest.mark.timeout(120)
def test_a_warm_up_runs_before_the_scenarios_and_is_recorded(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = bench_run.main([*TINY, "--only", "cycle", "--warmup", "0.5", "--output", str(out)])
    data = json.loads(out.read_text())
    assert data["errors"] == {}, data["errors"]  # its server beside the main one's
    assert code == 0 and data["meta"]["warmup_s"] == 0.5
    assert data["cycle"]["per_k"]["2"]["ops_per_s"] > 0
