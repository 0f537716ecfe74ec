"""Crash harness (SPEC §9): a server with ``--data-dir`` killed with SIGKILL at random moments
loses nothing it acknowledged.

A writer process makes a random mix of mutations and records, for each, its *intent* before
the call and its *acknowledgement* after the reply. The test kills the server once the writer
has made a random number of acknowledged calls (a point of progress, not a sleep), restarts it
on the same directory and checks every acknowledged mutation; the one call in flight at the
kill may or may not have been applied, and nothing else may differ. Rounds accumulate state.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from mpstore import Span, StoreUnavailable
from mpstore.testing import ServerProcess, start_server, write_key_file

ROUNDS_CI = 3
ROUNDS_STRESS = 25


def _writer(address: str, key: bytes, journal: str, seed: int, known: list[list[str]]) -> None:
    """Child process: random mutations until the server dies; one JSON line per intent/ack."""
    from mpstore import connect

    rng = random.Random(seed)
    claimed = [tuple(pair) for pair in known]  # (rollout, attempt) still running
    store = connect(address, key, retry_for=0.5, timeout=5.0)
    with open(journal, "a", buffering=1) as out:
        def call(intent: dict[str, Any], fn: Any) -> Any:
            out.write(json.dumps({"intent": intent}) + "\n")
            result = fn()
            out.write(json.dumps({"ack": intent}) + "\n")
            return result

        for n in range(100_000):  # bounded; the test kills the server long before
            op = rng.choice(["enqueue", "enqueue", "dequeue", "span", "span", "finish", "res"])
            try:
                if op == "enqueue":
                    token = f"{seed}-{n}"
                    out.write(json.dumps({"intent": {"op": "enqueue", "token": token}}) + "\n")
                    rollout = store.enqueue_rollout({"token": token})
                    out.write(json.dumps({"ack": {"op": "enqueued", "token": token,
                                                  "rid": rollout.rollout_id}}) + "\n")
                elif op == "dequeue":
                    got = call({"op": "dequeue"}, store.dequeue_rollout)
                    if got is not None:
                        claimed.append((got.rollout_id, got.attempt.attempt_id))
                        out.write(json.dumps({"ack": {"op": "dequeued", "rid": got.rollout_id,
                                                      "aid": got.attempt.attempt_id}}) + "\n")
                elif op == "span" and claimed:
                    rid, aid = rng.choice(claimed)
                    span = Span(rid, aid, n, "step", span_id=f"{seed:08x}{n:08x}")
                    call({"op": "span", "rid": rid, "sid": span.span_id},
                         lambda span=span: store.add_span(span))
                elif op == "finish" and claimed:
                    rid, aid = claimed.pop(rng.randrange(len(claimed)))
                    status = rng.choice(["succeeded", "failed"])
                    call({"op": "finish", "rid": rid, "aid": aid, "status": status},
                         lambda rid=rid, aid=aid, status=status:
                         store.update_attempt(rid, aid, status=status))
                elif op == "res":
                    call({"op": "res", "n": n},
                         lambda n=n: store.update_resources("shared", {}))
            except StoreUnavailable:
                return


class Expected:
    """What the acknowledgements say must be in the store."""

    def __init__(self) -> None:
        self.enqueued: dict[str, str] = {}  # rid -> token, in enqueue order
        self.dequeued: dict[str, str] = {}  # rid -> aid of the acknowledged claim
        self.taken: set[str] = set()  # claimed by a dequeue that was never acknowledged
        self.spans: dict[str, set[str]] = {}
        self.finished: dict[str, str] = {}  # aid -> status
        self.resource_updates = 0
        self.in_flight: dict[str, Any] | None = None

    def read(self, journal: Path) -> None:
        self.in_flight = None
        for line in journal.read_text().splitlines():
            entry = json.loads(line)
            if "intent" in entry:
                self.in_flight = entry["intent"]
                continue
            ack, self.in_flight = entry["ack"], None
            op = ack["op"]
            if op == "enqueued":
                self.enqueued[ack["rid"]] = ack["token"]
            elif op == "dequeued":
                self.dequeued[ack["rid"]] = ack["aid"]
            elif op == "span":
                self.spans.setdefault(ack["rid"], set()).add(ack["sid"])
            elif op == "finish":
                self.finished[ack["aid"]] = ack["status"]
            elif op == "res":
                self.resource_updates += 1
        journal.write_text("")  # consumed: the next round appends afresh

    def running(self) -> list[list[str]]:
        return [[rid, aid] for rid, aid in self.dequeued.items() if aid not in self.finished]


def check(store: Any, expected: Expected) -> None:
    """Every acknowledged mutation is there; the queue holds the rest in enqueue order."""
    flight = expected.in_flight or {}
    for rid, token in expected.enqueued.items():
        rollout = store.get_rollout_by_id(rid)
        assert rollout is not None and rollout.input == {"token": token}, rid
    for rid, aid in expected.dequeued.items():
        assert aid in [a.attempt_id for a in store.query_attempts(rid)], rid
    for rid, span_ids in expected.spans.items():
        assert span_ids <= {s.span_id for s in store.query_spans(rid)}, rid
    for rid, aid in expected.dequeued.items():
        if aid in expected.finished:
            attempt = next(a for a in store.query_attempts(rid) if a.attempt_id == aid)
            assert attempt.status == expected.finished[aid], (rid, aid)
    resources = store.get_resources_by_id("shared")
    if expected.resource_updates:
        assert resources is not None and resources.version >= expected.resource_updates
    waiting = [rid for rid in expected.enqueued
               if rid not in expected.dequeued and rid not in expected.taken]
    claimed = store.dequeue_many_rollouts(len(waiting) + 5)
    got = [c.rollout_id for c in claimed]
    known = [rid for rid in got if rid in expected.enqueued]
    if flight.get("op") == "dequeue" and waiting and waiting[0] not in got:
        expected.taken.add(waiting.pop(0))  # the in-flight dequeue took it before the kill
    assert known == waiting  # FIFO order survived
    assert len(got) - len(known) <= (1 if flight else 0)  # only an in-flight enqueue is new
    for c in claimed:
        expected.dequeued[c.rollout_id] = c.attempt.attempt_id
    # The restored store's own bookkeeping agrees with its records (REF I1, I2).
    stats, rollouts = store.statistics(), store.query_rollouts()
    assert stats["total_rollouts"] == len(rollouts) >= len(expected.enqueued)
    assert stats["queue_length"] == 0
    assert not [r for r in rollouts if r.status in ("queuing", "requeuing")]
    attempts = [store.query_attempts(r.rollout_id) for r in rollouts]
    assert stats["total_attempts"] == sum(len(a) for a in attempts)
    assert all([a.sequence_id for a in atts] == list(range(1, len(atts) + 1)) for atts in attempts)


def start(port: int | None, key: Path, data_dir: Path, log: Path) -> ServerProcess:
    return start_server(port, authkey_file=key, log_path=log,
                        args=("--data-dir", str(data_dir), "--watchdog-interval", "60"))


def run_rounds(tmp_path: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    key = write_key_file(tmp_path / "authkey")
    data_dir, journal = tmp_path / "data", tmp_path / "journal.jsonl"
    journal.touch()
    expected = Expected()
    server = start(None, key, data_dir, tmp_path / "server.log")
    live = [server]  # the server of the current round, for the cleanup below
    try:
        _rounds(live, rounds, rng, seed, key, data_dir, journal, expected, tmp_path)
    finally:
        live[0].kill()  # whatever happened, no server outlives the test


def _rounds(live: list[ServerProcess], rounds: int, rng: random.Random, seed: int, key: Path,
            data_dir: Path, journal: Path, expected: Expected, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    server = live[0]
    for round_no in range(rounds):
        writer = ctx.Process(target=_writer, args=(server.address, key.read_bytes().strip(),
                                                   str(journal), seed * 1000 + round_no,
                                                   expected.running()))
        writer.start()
        target = rng.randrange(20, 400)
        deadline = time.monotonic() + 60
        while journal.read_text().count('"ack"') < target and writer.is_alive():
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.005)  # polling the writer's progress, the event we wait for
        assert server.kill() == -9
        writer.join(30)
        assert writer.exitcode == 0, "the writer must end with StoreUnavailable, not hang"
        expected.read(journal)
        server = start(server.port, key, data_dir, tmp_path / "server.log")
        live[0] = server
        with server.connect() as store:
            check(store, expected)
    assert server.stop() == 0


def test_killed_server_loses_nothing_acknowledged(tmp_path: Path) -> None:
    run_rounds(tmp_path, ROUNDS_CI, seed=int(os.environ.get("MPSTORE_CRASH_SEED", "7")))


@pytest.mark.stress
def test_killed_server_loses_nothing_acknowledged_many_times(tmp_path: Path) -> None:
    run_rounds(tmp_path, ROUNDS_STRESS, seed=11)


def test_sequence_ids_survive_sigkill(tmp_path: Path) -> None:
    """A sequence id handed out is acknowledged (its reply left the server): after SIGKILL and
    a restart the counter goes on past it, never hands it out again (SPEC §9)."""
    key = write_key_file(tmp_path / "authkey")
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    server = start(None, key, data_dir, log)
    try:
        with server.connect() as store:
            claimed = store.start_rollout("counted")
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        handed_out: list[int] = []
        for _ in range(4):
            with server.connect(retry_for=0.0) as store:
                handed_out += [store.get_next_span_sequence_id(rid, aid) for _ in range(3)]
                handed_out += store.get_many_span_sequence_ids([(rid, aid), ("ro-none", "x")])
            assert server.kill() == -9
            server = start(server.port, key, data_dir, log)
        with server.connect() as store:
            after = store.get_next_span_sequence_id(rid, aid)
            unknown = store.get_next_span_sequence_id("ro-none", "x")
        mine = [n for i, n in enumerate(handed_out) if i % 5 != 4]
        assert mine == sorted(set(mine)) and after == max(mine) + 1
        assert unknown == 5  # REF counts ids of unknown rollouts too; each round took one
        assert server.stop() == 0
    finally:
        server.kill()
