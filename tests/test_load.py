"""Load (issue 5): 8 runner processes and a trainer process against a real ``agl store``.

The trainer enqueues rollouts in batches (``max_attempts=3``, ``retry_condition=["failed"]``),
publishes a new resources version per batch and waits for all of them. Runners long-poll
``dequeue_rollout``, read the latest resources, emit spans (one at a time and in batches),
and fail a random share of their attempts, which the store retries.

Every process keeps its own record of what the server acknowledged. At the end: every rollout
is terminal; each succeeded rollout has exactly one succeeded attempt (its latest) and each
failed one three failed attempts; the attempts are exactly those the runners claimed, with
the statuses they set; every acknowledged span is returned by ``query_spans``; and
``statistics()`` agrees with the counts the clients kept.

The CI version runs a few hundred rollouts in seconds; the stress version (MPSTORE_STRESS=1)
twenty thousand.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from mpstore import Span, connect
from tests.faults import mp_context
from tests.remote import running_server

CONFIG = {"max_attempts": 3, "retry_condition": ["failed"]}
FAIL_RATE = 0.3


def _trainer(address: str, key: bytes, total: int, batch: int, out: str) -> None:
    store = connect(address, key)
    ids: list[str] = []
    for start in range(0, total, batch):
        count = min(batch, total - start)
        created = store.enqueue_many_rollouts(
            [{"input": {"task": start + i}, "config": CONFIG} for i in range(count)])
        ids.extend(r.rollout_id for r in created)
        store.update_resources("policy", {"llm": {"resource_type": "llm",
                                                  "endpoint": "http://127.0.0.1:1/v1",
                                                  "model": f"m-{start}"}})
    finished = store.wait_for_rollouts(rollout_ids=ids, timeout=600)
    Path(out).write_text(json.dumps({
        "ids": ids, "finished": [[r.rollout_id, str(r.status)] for r in finished],
        "resource_versions": total // batch + (total % batch > 0)}))


def _runner(address: str, key: bytes, seed: int, stop: Any, out: str) -> None:
    rng = random.Random(seed)
    store = connect(address, key)
    attempts: list[list[str]] = []  # [rid, aid, status set by this runner]
    spans: list[list[str]] = []  # [rid, aid, span_id] acknowledged
    calls = 0
    while not stop.is_set():
        claimed = store.dequeue_rollout(worker_id=f"runner-{seed}", wait=0.2)
        calls += 1
        if claimed is None:
            continue
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        store.get_latest_resources()
        calls += 1
        batch = []
        for n in range(rng.randrange(6)):
            span = Span(rid, aid, store.get_next_span_sequence_id(rid, aid), f"step-{n}",
                        attributes={"n": n, "text": "x" * rng.randrange(200)})
            calls += 1
            if rng.random() < 0.5:
                batch.append(span)
                continue
            stored = store.add_span(span)
            calls += 1
            spans.append([rid, aid, stored.span_id])
        if batch:
            stored_many = store.add_many_spans(batch)
            calls += 1
            spans.extend([rid, aid, s.span_id] for s in stored_many)
        status = "failed" if rng.random() < FAIL_RATE else "succeeded"
        store.update_attempt(rid, aid, status=status)
        calls += 1
        attempts.append([rid, aid, status])
    Path(out).write_text(json.dumps({"attempts": attempts, "spans": spans, "calls": calls}))


def run_load(tmp_path: Path, rollouts: int, runners: int = 8, batch: int = 50,
             seed: int = 0) -> dict[str, Any]:
    ctx = mp_context()
    with running_server(tmp_path, "--watchdog-interval", "0.2") as server:
        stop = ctx.Event()
        started = time.monotonic()
        key = server.authkey
        procs = [ctx.Process(target=_runner, daemon=True,
                             args=(server.address, key, seed + i, stop,
                                   str(tmp_path / f"runner-{i}.json")))
                 for i in range(runners)]
        trainer = ctx.Process(target=_trainer, daemon=True,
                              args=(server.address, key, rollouts, batch,
                                    str(tmp_path / "trainer.json")))
        for proc in [*procs, trainer]:
            proc.start()
        trainer.join(600)
        assert trainer.exitcode == 0, "the trainer failed"
        stop.set()
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0, "a runner failed"
        elapsed = time.monotonic() - started
        with server.connect() as store:
            return check(store, tmp_path, runners, rollouts) | {"seconds": elapsed,
                                                                "processes": runners + 1}


def check(store: Any, tmp_path: Path, runners: int, rollouts: int) -> dict[str, Any]:
    """The end state against what the clients recorded; returns the counts."""
    trainer = json.loads((tmp_path / "trainer.json").read_text())
    records = [json.loads((tmp_path / f"runner-{i}.json").read_text()) for i in range(runners)]
    ids = trainer["ids"]
    assert len(ids) == len(set(ids)) == rollouts
    # The trainer's wait returned every rollout, finished, in input order.
    assert [rid for rid, _ in trainer["finished"]] == ids
    assert {status for _, status in trainer["finished"]} <= {"succeeded", "failed"}

    claimed: dict[str, dict[str, str]] = defaultdict(dict)  # rid -> aid -> status set
    for record in records:
        for rid, aid, status in record["attempts"]:
            assert aid not in claimed[rid], "an attempt was handed to two runners"
            claimed[rid][aid] = status
    acked: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for record in records:
        for rid, aid, span_id in record["spans"]:
            acked[rid].add((aid, span_id))

    by_status: Counter[str] = Counter()
    for rollout in store.query_rollouts():
        rid = rollout.rollout_id
        attempts = store.query_attempts(rid)
        assert {a.attempt_id: str(a.status) for a in attempts} == claimed[rid], rid
        statuses = [str(a.status) for a in attempts]
        if rollout.status == "succeeded":
            assert statuses.count("succeeded") == 1 and statuses[-1] == "succeeded", statuses
            assert set(statuses[:-1]) <= {"failed"}
        else:
            assert rollout.status == "failed" and statuses == ["failed"] * 3, statuses
        by_status[str(rollout.status)] += 1
        stored = {(s.attempt_id, s.span_id) for s in store.query_spans(rid)}
        assert stored == acked[rid], rid  # every acknowledged span, and nothing else

    stats = store.statistics()
    total_spans = sum(len(spans) for spans in acked.values())
    assert stats["total_rollouts"] == rollouts == sum(by_status.values())
    assert stats["total_attempts"] == sum(len(a) for a in claimed.values())
    assert stats["total_spans"] == total_spans
    assert stats["queue_length"] == 0
    assert {k: v for k, v in stats["rollouts_by_status"].items() if v} == dict(by_status)
    latest = store.get_latest_resources()
    assert latest is not None and latest.version == trainer["resource_versions"]
    return {"rollouts": rollouts, "attempts": stats["total_attempts"], "spans": total_spans,
            "succeeded": by_status["succeeded"], "failed": by_status["failed"],
            "runner_calls": sum(r["calls"] for r in records)}


def test_load_8_runners_and_a_trainer(tmp_path: Path) -> None:
    counts = run_load(tmp_path, rollouts=400)
    assert counts["failed"] > 0 and counts["attempts"] > counts["rollouts"]  # retries happened


@pytest.mark.stress
def test_load_8_runners_and_a_trainer_stress(tmp_path: Path) -> None:
    counts = run_load(tmp_path, rollouts=20_000, batch=500)
    print(f"\nload: {counts}")
    assert counts["failed"] > 0
