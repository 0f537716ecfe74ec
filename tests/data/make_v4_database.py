"""Writes ``v4/`` (a data directory of schema version 4: spans one row each, and a log file
holding commits not yet applied to the database) and ``v4.json`` (what the public API read
back), for tests/test_durable_migration.py.

It was run once with mpstore at commit 5c04481 (the last commit that wrote schema version 4),
from the repository root: ``python tests/data/make_v4_database.py``. It cannot be run again
with a later mpstore (that one writes the current schema); the files it made are committed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
START = 1_700_000_000.0


def write() -> None:
    """In a child process: write the directory, leave the last commits in the log (exit
    without close, as a killed server does) and print what the API shows."""
    from mpstore import LLM, InMemoryStore, Span
    from tests.data.make_v1_database import public

    now = [START]
    target = HERE / "v4"
    store = InMemoryStore(clock=lambda: now[0], data_dir=target, eviction_threshold=20_000,
                          safe_threshold=12_000)
    store.add_resources({"llm": LLM("http://127.0.0.1:1/v1", "m")})
    done = store.start_rollout("compacted one")
    for seq in (1, 2, 3):
        store.add_span(Span(done.rollout_id, done.attempt.attempt_id, seq, f"early-{seq}",
                            attributes={"seq": seq}, start_time=now[0], end_time=now[0] + 1))
    store.update_attempt(done.rollout_id, "latest", status="succeeded")
    store.close()  # everything so far is in the database, the log is empty
    store = InMemoryStore(clock=lambda: now[0], data_dir=target, eviction_threshold=20_000,
                          safe_threshold=12_000)
    now[0] += 1.0
    queued = [store.enqueue_rollout({"q": i}) for i in range(3)]
    running = store.dequeue_rollout(worker_id="w-1")
    assert running is not None and running.rollout_id == queued[0].rollout_id
    for seq in (1, 2):  # in the log only
        store.add_span(Span(running.rollout_id, running.attempt.attempt_id, seq, f"late-{seq}",
                            attributes={"seq": seq}, start_time=now[0], end_time=now[0] + 1))
    store.add_span(Span(done.rollout_id, done.attempt.attempt_id, 4, "after-the-end"))
    print(json.dumps(public(store), sort_keys=True))
    sys.stdout.flush()
    os._exit(0)  # no close: the log keeps the last commits


def main() -> None:
    target = HERE / "v4"
    shutil.rmtree(target, ignore_errors=True)
    out = subprocess.run([sys.executable, __file__, "--child"], check=True,
                         capture_output=True, text=True).stdout
    expected = json.loads(out)
    (HERE / "v4.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    (target / "mpstore.lock").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    if sys.argv[1:] == ["--child"]:
        write()
    else:
        main()
