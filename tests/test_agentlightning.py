"""The agent-lightning adapter's tests, run inside one virtual environment per supported
agent-lightning release (.ci/setup.d/50-agentlightning.sh makes them and exports their
Pythons as MPSTORE_AGL_030_PYTHON and MPSTORE_AGL_022_PYTHON).

agent-lightning is never installed in the test environment itself (it is not a dependency of
mpstore): ``python -m pytest`` here runs ``<venv python> -m pytest tests/agentlightning`` as a
subprocess per release and fails when that run fails. Without the variable (a local run that
skipped the setup step) the release is skipped, saying how to get it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RELEASES = {"0.3.0": "MPSTORE_AGL_030_PYTHON", "0.2.2": "MPSTORE_AGL_022_PYTHON"}


def release_python(version: str) -> str:
    variable = RELEASES[version]
    python = os.environ.get(variable)
    if not python:
        pytest.skip(f"{variable} is not set: source .ci/setup.d/50-agentlightning.sh (it "
                    f"makes a virtual environment with agentlightning=={version})")
    assert Path(python).exists(), f"{variable}={python} does not exist"
    return python


def run_in(python: str, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(ROOT)}
    return subprocess.run([python, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("version", sorted(RELEASES))
def test_adapter_suite_passes_on_agent_lightning(version: str) -> None:
    python = release_python(version)
    installed = run_in(python, "-c", "import agentlightning; print(agentlightning.__version__)")
    assert installed.stdout.strip() == version, installed.stderr
    result = run_in(python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "tests/agentlightning")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_the_core_package_never_imports_agentlightning() -> None:
    code = ("import sys, mpstore, mpstore.manager.server; "
            "assert 'agentlightning' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr
