"""No call lost or applied twice (issue 12): runners go through enqueue -> dequeue -> spans
-> update while connections are cut mid-request (in memory, through tests/lossy.py) and
while a durable server is killed with SIGKILL and restarted again and again. Every call is
retried within ``retry_for``; the store must show each rollout enqueued once, claimed by
the attempt its runner saw, finished, and listed once in the feed of finished rollouts.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from mpstore import InMemoryStore, Span, StoreUnavailable, connect
from mpstore.api import REQUEST_KEY
from mpstore.testing import ServerProcess, start_server, write_key_file
from tests.faults import wait_until
from tests.lossy import LossyProxy

RUNNERS = 3
RESTARTS_CI, RESTARTS_STRESS = 20, 200


def _runner(address: str, key: bytes, seed: int, cycles: int, log: str) -> None:
    """Child process: ``cycles`` full cycles; one JSON line per finished cycle. Exit 1 on
    StoreUnavailable (the test requires none)."""
    store = connect(address, key, retry_for=60.0, timeout=10.0)
    with open(log, "a", buffering=1) as out:
        for n in range(cycles):
            token = f"{seed}-{n}"
            try:
                made = store.enqueue_rollout({"token": token})
                claimed = store.dequeue_rollout(worker_id=f"runner-{seed}", wait=10.0)
                assert claimed is not None, "the queue cannot be empty here"
                rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
                store.add_many_spans([Span(rid, aid, seq, "step", span_id=f"{token}-{seq}")
                                      for seq in (1, 2)])
                store.update_attempt(rid, aid, status="succeeded")
            except StoreUnavailable as exc:
                out.write(json.dumps({"unavailable": str(exc)}) + "\n")
                raise SystemExit(1) from None
            out.write(json.dumps({"token": token, "made": made.rollout_id, "rid": rid,
                                  "aid": aid}) + "\n")


def start_runners(address: str, key: bytes, cycles: int, log: Path) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    runners = [ctx.Process(target=_runner, args=(address, key, seed, cycles, str(log)))
               for seed in range(RUNNERS)]
    for runner in runners:
        runner.start()
    return runners


def check(store: Any, log: Path, cycles: int) -> dict[str, int]:
    """Every cycle's effects exactly once; returns figures for the report."""
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert not [x for x in lines if "unavailable" in x]
    assert len(lines) == RUNNERS * cycles
    rollouts = store.query_rollouts()
    tokens = [r.input["token"] for r in rollouts]
    assert len(tokens) == len(set(tokens)) == RUNNERS * cycles  # each enqueued once
    assert {x["made"] for x in lines} == {r.rollout_id for r in rollouts}
    seen = {x["rid"]: x["aid"] for x in lines}
    assert len(seen) == len(rollouts)  # each claimed by one runner
    for rollout in rollouts:
        attempts = store.query_attempts(rollout.rollout_id)
        assert [a.attempt_id for a in attempts] == [seen[rollout.rollout_id]]  # seen, once
        assert rollout.status == "succeeded" and attempts[0].status == "succeeded"
        assert len(store.query_spans(rollout.rollout_id)) == 2
    feed = store.finished_rollouts(0, 10 * len(rollouts))
    finished = [r.rollout_id for r in feed.rollouts]
    assert sorted(finished) == sorted(seen) and len(set(finished)) == len(finished)
    stats = store.statistics()
    return {"rollouts": len(rollouts), "remembered": stats["remembered_replies"]}


def test_connections_cut_mid_request(tmp_path: Path) -> None:
    cycles = 40
    key = write_key_file(tmp_path / "authkey")
    log = tmp_path / "runs.jsonl"
    with start_server(authkey_file=key, log_path=tmp_path / "server.log") as server:
        proxy = LossyProxy(server.port, loss=0.04, seed=3)
        try:
            runners = start_runners(proxy.address, key.read_bytes().strip(), cycles, log)
            for runner in runners:
                runner.join(240)
            assert [r.exitcode for r in runners] == [0] * RUNNERS, log.read_text()[-2000:]
        finally:
            proxy.close()
        with server.connect() as store:
            figures = check(store, log, cycles)
    assert proxy.cuts >= 10, "the proxy cut too few replies for the test to mean much"
    print(f"cut {proxy.cuts} connections; {figures}")


def _restart_rounds(tmp_path: Path, restarts: int, cycles: int) -> None:
    key = write_key_file(tmp_path / "authkey")
    data, log, server_log = tmp_path / "data", tmp_path / "runs.jsonl", tmp_path / "server.log"
    log.touch()
    args = ("--data-dir", str(data))
    server = start_server(authkey_file=key, log_path=server_log, args=args)
    live: list[ServerProcess] = [server]
    try:
        runners = start_runners(server.address, key.read_bytes().strip(), cycles, log)
        for round_no in range(restarts):
            done = log.read_text().count("\n")
            if done >= RUNNERS * cycles:
                break
            # A point of progress, not a sleep: the runners made one more cycle.
            wait_until(lambda done=done: log.read_text().count("\n") > done, timeout=120,
                       what=f"progress before restart {round_no}")
            assert live[0].kill() == -9
            live[0] = start_server(server.port, authkey_file=key, log_path=server_log,
                                   args=args)
        for runner in runners:
            runner.join(300)
        assert [r.exitcode for r in runners] == [0] * RUNNERS, log.read_text()[-2000:]
        assert round_no >= min(restarts, 5) - 1, "the runners finished before the restarts"
        with live[0].connect() as store:
            figures = check(store, log, cycles)
        print(f"{round_no + 1} restarts; {figures}")
        assert live[0].stop() == 0
    finally:
        live[0].kill()


def test_sigkill_and_restart_of_a_durable_server(tmp_path: Path) -> None:
    _restart_rounds(tmp_path, RESTARTS_CI, cycles=60)


@pytest.mark.stress
def test_sigkill_and_restart_of_a_durable_server_many_times(tmp_path: Path) -> None:
    _restart_rounds(tmp_path, RESTARTS_STRESS, cycles=600)


def test_a_resend_after_sigkill_is_answered_once(tmp_path: Path) -> None:
    """The same request id sent before and after a SIGKILL and restart: one rollout, the
    same answer (the reply was committed with the change)."""
    key = write_key_file(tmp_path / "authkey")
    args = ("--data-dir", str(tmp_path / "data"))
    server = start_server(authkey_file=key, log_path=tmp_path / "server.log", args=args)
    try:
        request = {REQUEST_KEY: ("test-client", 1)}
        with server.connect() as store:
            first = store._call("enqueue_rollout", ({"q": 1},), request)
        assert server.kill() == -9
        server = start_server(server.port, authkey_file=key, log_path=tmp_path / "server.log",
                              args=args)
        with server.connect() as store:
            again = store._call("enqueue_rollout", ({"q": 1},), request)
            assert again == first
            assert store.statistics()["total_rollouts"] == 1
        assert server.stop() == 0
    finally:
        server.kill()


def test_a_forgotten_reply_is_refused_not_applied_again(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    import mpstore.replies

    monkeypatch.setattr(mpstore.replies, "PER_CLIENT", 2)
    store = InMemoryStore()
    answers = [store.once(("c", n), store.enqueue_rollout)(n) for n in range(1, 7)]
    with pytest.raises(StoreUnavailable, match="forgotten"):
        store.once(("c", 1), store.enqueue_rollout)(1)
    assert store.once(("c", 6), store.enqueue_rollout)(6) == answers[-1]
    assert store.statistics()["total_rollouts"] == 6
    assert store.statistics()["remembered_replies"] <= 4
    with pytest.raises(Exception, match="request id"):
        store.once("not an id", store.enqueue_rollout)


def test_the_reply_memory_is_bounded_per_client_and_in_time(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    import mpstore.replies

    clock = [0.0]
    store = InMemoryStore(clock=lambda: 1e6 + clock[0], monotonic=lambda: clock[0])
    for n in range(1, 301):
        store.once(("busy", n), store.get_next_span_sequence_id)("ro-x", "at-x")
    assert store.statistics()["remembered_replies"] <= 2 * mpstore.replies.PER_CLIENT
    clock[0] += mpstore.replies.TTL + 1
    store.once(("other", 1), store.get_next_span_sequence_id)("ro-y", "at-y")
    stats = store.statistics()
    assert stats["reply_clients"] == 1 and stats["remembered_replies"] == 1


def _allocated(calls: Any) -> int:
    import tracemalloc

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    calls()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(s.size_diff for s in after.compare_to(before, "filename"))


def test_memory_per_remembered_reply() -> None:
    """What a remembered reply costs the server (reported in the README): the memory of
    2,000 enqueues answered through once(), less that of 2,000 plain ones."""
    plain, remembered = InMemoryStore(copy_records=False), InMemoryStore(copy_records=False)
    without = _allocated(lambda: [plain.enqueue_rollout({"n": n}) for n in range(2_000)])
    with_ids = _allocated(lambda: [
        remembered.once((f"client-{n % 50}", n), remembered.enqueue_rollout)({"n": n})
        for n in range(2_000)])
    assert remembered.statistics()["remembered_replies"] == 2_000
    per_reply = (with_ids - without) / 2_000
    print(f"memory per remembered reply: {per_reply:.0f} B")
    assert 0 < per_reply < 1_000
