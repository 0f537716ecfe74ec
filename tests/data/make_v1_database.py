"""Writes ``v1/`` (a data directory of schema version 1) and ``v1.json`` (what the public API
read back from it), for tests/test_durable_migration.py.

It was run once with mpstore at commit 278f169 (the last release that wrote schema version 1),
from the repository root: ``python tests/data/make_v1_database.py``. It cannot be run again
with a later mpstore (that one writes the current schema); the files it made are committed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mpstore import LLM, InMemoryStore, PromptTemplate, Span, SpansEvicted

HERE = Path(__file__).parent
CLOCK = [1_700_000_000.0]


def clock() -> float:
    return CLOCK[0]


def public(store: InMemoryStore) -> dict[str, Any]:
    """Everything the public API shows, as JSON-able values."""
    def plain(record: Any) -> Any:
        if record is None:
            return None
        out = {}
        for name in type(record)._fields:
            value = getattr(record, name)
            if hasattr(type(value), "_fields"):
                value = plain(value)
            elif isinstance(value, dict):
                value = {k: plain(v) if hasattr(type(v), "_fields") else v
                         for k, v in value.items()}
            elif isinstance(value, list):
                value = [str(v) if hasattr(v, "value") else v for v in value]
            elif hasattr(value, "value"):
                value = value.value
            out[name] = value
        return out

    rollouts = store.query_rollouts()
    return {
        "rollouts": [plain(r) for r in rollouts],
        "attempts": {r.rollout_id: [plain(a) for a in store.query_attempts(r.rollout_id)]
                     for r in rollouts},
        "spans": {r.rollout_id: spans(store, r.rollout_id, plain) for r in rollouts},
        "latest_resources": plain(store.get_latest_resources()),
        "statistics": {k: v for k, v in store.statistics().items() if k != "uptime"},
    }


def spans(store: InMemoryStore, rollout_id: str, plain: Any) -> Any:
    try:
        return [plain(s) for s in store.query_spans(rollout_id)]
    except SpansEvicted:
        return "evicted"


def main() -> None:
    target = HERE / "v1"
    shutil.rmtree(target, ignore_errors=True)
    store = InMemoryStore(clock=clock, data_dir=target, eviction_threshold=20_000,
                          safe_threshold=12_000)
    store.add_resources({"llm": LLM("http://127.0.0.1:1/v1", "m", sampling_parameters={"t": 1})})
    store.update_resources("rs-fixed", {"prompt": PromptTemplate("Q: {q}")})
    evicted = store.start_rollout("evicted one")
    store.add_span(Span(evicted.rollout_id, evicted.attempt.attempt_id, 1, "big",
                        attributes={"blob": "x" * 10_000}))
    store.update_attempt(evicted.rollout_id, "latest", status="succeeded")
    queued = [store.enqueue_rollout({"q": i}, metadata={"i": i},
                                    config={"timeout_seconds": 60.0, "max_attempts": 2,
                                            "retry_condition": ["timeout", "failed"]})
              for i in range(4)]
    CLOCK[0] += 1.0
    running = store.dequeue_rollout(worker_id="w-1")
    assert running is not None
    for seq in (1, 2):
        store.add_span(Span(running.rollout_id, running.attempt.attempt_id, seq, f"step-{seq}",
                            parent_id=None if seq == 1 else "p", attributes={"seq": seq},
                            start_time=CLOCK[0], end_time=CLOCK[0] + 0.5))
    handed_out = store.get_next_span_sequence_id(running.rollout_id, running.attempt.attempt_id)
    failed = store.dequeue_rollout(worker_id="w-2")
    assert failed is not None
    store.update_attempt(failed.rollout_id, "latest", status="failed")  # requeued, attempt 2
    store.update_rollout(queued[3].rollout_id, status="cancelled")
    store.add_span(Span(running.rollout_id, running.attempt.attempt_id, 5, "big-2",
                        attributes={"blob": "y" * 8_000}))  # evicts the finished rollout
    expected = public(store)
    expected["handed_out"] = {running.rollout_id: handed_out}
    store.close()
    (HERE / "v1.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    (target / "mpstore.lock").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
