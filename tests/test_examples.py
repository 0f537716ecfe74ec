"""Every example runs as is (each starts its own server) and says what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXPECTED = {
    "quickstart.py": ["status=queuing", "status=succeeded", "span 2: reward"],
    "runners.py": ["20/20 finished {'succeeded': 20}, 40 spans", "work per runner",
                   "0 rollouts left after deleting"],
    "retries.py": ["runner-crashing  unresponsive", "runner-slow      timeout",
                   "runner-healthy   succeeded"],
    "tls_cluster.py": ["TLS call: ping -> mpstore", "TLS call: enqueued",
                       "without a client certificate: refused (AuthenticationFailed)",
                       "plaintext: refused (StoreUnavailable)"],
}


#: Examples that need an extra, run by the tests of the environments that have it.
ELSEWHERE = {"agentlightning_trainer.py": "tests/agentlightning/test_example.py"}


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted({*EXPECTED, *ELSEWHERE})
    root = EXAMPLES.parent
    assert all((root / test).exists() for test in ELSEWHERE.values())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    for text in EXPECTED[name]:
        assert text in result.stdout, (text, result.stdout)
