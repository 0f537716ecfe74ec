"""A step of the wall clock (NTP, a resumed VM) changes no status: deadlines are measured in
monotonic time, timestamps stay wall-clock (see mpstore.sections).

In process with two injected clocks, and once with a real server under libfaketime (Debian
package ``faketime``), whose wall clock the test steps through a timestamp file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mpstore import InMemoryStore, Span
from tests.conftest import FakeClock
from tests.remote import running_server

CONFIG = {"timeout_seconds": 600.0, "unresponsive_seconds": 30.0}


def clocked(data_dir: Path | None = None) -> tuple[InMemoryStore, FakeClock, FakeClock]:
    wall, steady = FakeClock(1_700_000_000.0), FakeClock(50.0)
    return InMemoryStore(clock=wall, monotonic=steady, data_dir=data_dir), wall, steady


@pytest.mark.parametrize("step", [7200.0, -7200.0])
def test_a_wall_clock_step_times_nothing_out(step: float) -> None:
    store, wall, steady = clocked()
    claimed = store.start_rollout("x", config=CONFIG)
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    for n in range(1, 6):  # a runner heartbeating every 0.2 s across the step
        wall.advance(0.2 + (step if n == 3 else 0.0))
        steady.advance(0.2)
        store.add_span(Span(rid, aid, n, "beat"))
        store.run_watchdog()
    assert store.get_latest_attempt(rid).status == "running"  # type: ignore[union-attr]
    assert store.get_rollout_by_id(rid).status == "running"  # type: ignore[union-attr]
    # Timestamps are the wall clock's, step included.
    assert store.get_latest_attempt(rid).last_heartbeat_time == wall.now  # type: ignore[union-attr]


def test_deadlines_still_fire_on_monotonic_time() -> None:
    store, wall, steady = clocked()
    claimed = store.start_rollout("x", config=CONFIG)
    wall.advance(-7200.0)  # the wall clock goes back: the timeout must not wait 2 h more
    steady.advance(601.0)
    store.run_watchdog()
    assert store.get_latest_attempt(claimed.rollout_id).status == "timeout"  # type: ignore[union-attr]
    assert store.get_rollout_by_id(claimed.rollout_id).status == "failed"  # type: ignore[union-attr]


def test_silence_is_measured_from_the_last_heartbeat_in_monotonic_time() -> None:
    store, wall, steady = clocked()
    claimed = store.start_rollout("x", config=CONFIG)
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    steady.advance(20.0)
    wall.advance(20.0 + 3600.0)
    store.add_span(Span(rid, aid, 1, "beat"))  # stamped after the step
    steady.advance(29.0)
    wall.advance(29.0)
    store.run_watchdog()
    assert store.get_latest_attempt(rid).status == "running"  # type: ignore[union-attr]
    steady.advance(2.0)
    store.run_watchdog()
    assert store.get_latest_attempt(rid).status == "unresponsive"  # type: ignore[union-attr]


def test_deadlines_survive_a_restart_on_the_wall_clock(tmp_path: Path) -> None:
    store, wall, steady = clocked(tmp_path)
    claimed = store.start_rollout("x", config={"timeout_seconds": 10.0})
    wall.advance(6.0)
    steady.advance(6.0)
    store.close()
    # A new process: another monotonic origin; the restored attempt is re-anchored on the
    # wall clock (its start time is a wall-clock time), as before.
    reopened = InMemoryStore(clock=wall, monotonic=FakeClock(9_000.0), data_dir=tmp_path)
    reopened._monotonic.advance(3.0)  # type: ignore[attr-defined]
    wall.advance(3.0)
    reopened.run_watchdog()
    assert reopened.get_latest_attempt(claimed.rollout_id).status == "preparing"  # type: ignore[union-attr]
    reopened._monotonic.advance(2.0)  # type: ignore[attr-defined]
    wall.advance(2.0)
    reopened.run_watchdog()
    assert reopened.get_latest_attempt(claimed.rollout_id).status == "timeout"  # type: ignore[union-attr]
    reopened.close()


def _libfaketime() -> str:
    for root in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib"):
        path = Path(root) / "faketime" / "libfaketime.so.1"
        if path.exists():
            return str(path)
    pytest.skip("libfaketime is not installed (Debian package faketime)")


def test_a_real_server_under_a_stepped_clock(tmp_path: Path) -> None:
    """The server's wall clock jumps 2 h forward while a runner heartbeats every 0.2 s on
    an attempt with a 600 s timeout: nothing times out."""
    stamp = tmp_path / "faketime"
    stamp.write_text("+0\n")
    env = {**os.environ, "LD_PRELOAD": _libfaketime(), "FAKETIME_TIMESTAMP_FILE": str(stamp),
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed")
    with running_server(tmp_path, env=env) as server, server.connect() as store:
        claimed = store.start_rollout("x", config=CONFIG)
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        before = store.ping()["time"]
        stamp.write_text("+2h\n")
        after = store.ping()["time"]
        assert after - before > 7000, "libfaketime did not step the server's clock"
        for n in range(1, 4):
            store.add_span(Span(rid, aid, n, "beat"))
            store.run_watchdog()
        assert store.get_latest_attempt(rid).status == "running"
        assert store.get_rollout_by_id(rid).status == "running"
        stamp.write_text("+0\n")  # and back: still nothing
        store.run_watchdog()
        assert store.get_rollout_by_id(rid).status == "running"


def test_faketime_really_steps_a_subprocess(tmp_path: Path) -> None:
    """The fault injector itself works here (so the test above can fail)."""
    stamp = tmp_path / "faketime"
    stamp.write_text("+2h\n")
    env = {**os.environ, "LD_PRELOAD": _libfaketime(), "FAKETIME_TIMESTAMP_FILE": str(stamp),
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    code = "import time; print(time.time())"
    faked = float(subprocess.run(["python3", "-c", code], env=env, capture_output=True,
                                 text=True, check=True).stdout)
    real = float(subprocess.run(["python3", "-c", code], capture_output=True, text=True,
                                check=True).stdout)
    assert faked - real > 7000
