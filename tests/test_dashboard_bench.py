"""Smoke test of ``python -m benchmarks.dashboard``: it runs end to end in a tiny mode and
writes the expected figures. Nothing here asserts a timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="needs mpstore[dashboard]")

from benchmarks import dashboard


@pytest.mark.timeout(240)
def test_tiny_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "dashboard.json"
    code = dashboard.main(["--quick", "--rollouts", "300", "--spans", "40", "--requests", "2",
                           "--k", "2", "--duration", "0.3", "--idle", "0.5",
                           "--output", str(out)])
    data = json.loads(out.read_text())
    assert code == 0
    assert set(data["page_ratio_small_over_full"]) == {"rollouts", "rollouts_by_status",
                                                      "trace_40_spans"}
    assert all(v > 0 for v in data["page_ms_full_store"].values())
    assert data["meta"]["stored"] == 300 + 61
    assert data["cycle_per_s"]["without_polling"] > 0
    assert data["polling_share_of_one_core"] >= 0
