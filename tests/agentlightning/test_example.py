"""examples/agentlightning_trainer.py end to end: agent-lightning's Trainer with 2 runner
processes in client-server mode, handed the mpstore store, against a real ``agl store``
server started as a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.remote import running_server

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agentlightning_trainer.py"


def load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("agentlightning_trainer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)
def test_the_trainer_runs_every_rollout_through_the_store(tmp_path: Path) -> None:
    example = load_example()
    tasks = 6
    with running_server(tmp_path) as server:
        result = subprocess.run(
            [sys.executable, str(EXAMPLE), "--address", f"127.0.0.1:{server.port}",
             "--authkey-file", str(tmp_path / "authkey"), "--tasks", str(tasks),
             "--runners", "2", "--timeout", "600"],
            capture_output=True, text=True, timeout=840, check=False,
            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
        assert result.returncode == 0, result.stderr[-4000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])["rollouts"]
        stats = server.connect().statistics()
    assert len(report) == tasks
    for row in report:
        assert row["status"] == "succeeded", row
        assert row["reward"] == pytest.approx(example.reward_of(row["input"])), row
        assert row["spans"] == example.STEPS + 1, row  # the messages and the reward span
        assert row["worker_id"], row
    assert stats["total_rollouts"] == tasks
    assert stats["total_spans"] == tasks * (example.STEPS + 1)
