"""``agl`` with both mpstore and agentlightning installed: mpstore's script serves its own
commands and hands every other one to agent-lightning's CLI (issue 11)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import agentlightning

AGL = Path(sys.executable).with_name("agl")
V030 = agentlightning.__version__.startswith("0.3")


def agl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AGL), *args], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})


def test_the_agl_script_is_mpstores() -> None:
    # .ci/setup.d installs mpstore last, as README tells users to.
    assert "mpstore.cli" in AGL.read_text()


def test_mpstores_own_commands_stay_mpstores() -> None:
    result = agl("store", "--help")
    assert result.returncode == 0, result.stderr
    assert "--data-dir" in result.stdout and "--busy-poll" in result.stdout
    assert agl("stats", "--port", "1", "--timeout", "0.5").returncode == 1  # mpstore's stats


def test_other_commands_go_to_agent_lightning() -> None:
    if V030:
        # 0.3.0's own parser answers.
        result = agl("no-such-command")
        assert result.returncode == 2
        assert "choose from" in result.stderr and "prometheus" in result.stderr
        handed = agl("prometheus", "--help")
        # agent-lightning's module ran: its usage, or (without prometheus_client, which
        # mpstore's test extra installs) its complaint about the missing package.
        assert (("usage: agl prometheus" in handed.stdout and "--metrics-path" in handed.stdout)
                or "prometheus_client" in handed.stderr), handed.stdout + handed.stderr
    else:
        result = agl("agentops", "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: agl agentops" in result.stdout and "--daemon" in result.stdout
