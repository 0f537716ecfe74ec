"""Faults of a PostgreSQL deployment under load: a server killed, PostgreSQL restarted.

Runners are threads of this process, each with its own client (connections are per thread
anyway), so that what every runner was told can be checked against the database afterwards:

* every rollout ends succeeded, and every acknowledged span and finish is there;
* no attempt was handed to two runners (a rollout gets a second attempt only when the
  watchdog gave its first up: its runner's claim or finish was lost with its server);
* no write was applied twice: a producer enqueues rollouts with no caller-chosen id through
  the server that is killed, each with an input of its own, and every input is stored once
  (a resend after the failover is answered from the database's stored replies).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpstore import Span, StorageError, StoreUnavailable, connect
from tests import pg
from tests.remote import running_server

ROLLOUTS = 60
RUNNERS = 8
#: Attempts of a runner whose server died are given up after this (and retried).
CONFIG = {"unresponsive_seconds": 5.0, "max_attempts": 10,
          "retry_condition": ["unresponsive", "timeout"]}


@pytest.fixture
def url(postgres_server: str, postgres_shared: str) -> Iterator[str]:
    with pg.fresh_database(postgres_server) as own:
        yield own


class Runner(threading.Thread):
    """Claims, adds two spans, finishes, until told to stop; records what it was told."""

    def __init__(self, name: str, address: str, authkey: bytes, stop: threading.Event,
                 progress: threading.Semaphore) -> None:
        super().__init__(name=name, daemon=True)
        self.client = connect(address, authkey, retry_for=10.0, timeout=10.0)
        self.stop, self.progress = stop, progress
        self.claims: list[tuple[str, str]] = []  # acknowledged (rollout_id, attempt_id)
        self.spans: list[tuple[str, str, str]] = []  # acknowledged span keys
        self.finished: list[tuple[str, str]] = []  # acknowledged update_attempt(succeeded)
        self.errors: list[tuple[float, BaseException]] = []  # the expected kinds
        self.crash: BaseException | None = None  # anything else (e.g. a lost attempt)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    self.step()
                except (StoreUnavailable, StorageError) as exc:
                    self.errors.append((time.monotonic(), exc))
        except BaseException as exc:
            self.crash = exc
        finally:
            self.client.close()

    def step(self) -> None:
        claimed = self.client.dequeue_rollout(worker_id=self.name, wait=0.5)
        if claimed is None:
            return
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        self.claims.append((rid, aid))
        for seq in (1, 2):
            span = Span(rid, aid, seq, f"s{seq}")
            self.client.add_span(span)
            self.spans.append((rid, aid, span.span_id))
        self.client.update_attempt(rid, aid, status="succeeded")
        self.finished.append((rid, aid))
        self.progress.release()


class Producer(threading.Thread):
    """Enqueues rollouts with no caller-chosen id (a resend that is applied again makes a
    second rollout), one distinct input each, until told to stop."""

    def __init__(self, address: str, authkey: bytes, stop: threading.Event) -> None:
        super().__init__(name="producer", daemon=True)
        self.client = connect(address, authkey, retry_for=10.0, timeout=10.0)
        self.stop = stop
        self.acknowledged: list[str] = []
        self.acked = threading.Semaphore(0)  # released once per acknowledged enqueue
        self.crash: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(100_000):
                if self.stop.is_set():
                    return
                try:
                    self.client.enqueue_rollout(f"p{i}", config=CONFIG)
                except (StoreUnavailable, StorageError):
                    continue  # not acknowledged: applied once or not at all
                self.acknowledged.append(f"p{i}")
                self.acked.release()
        except BaseException as exc:
            self.crash = exc
        finally:
            self.client.close()


def _check_applied_once(client: Any, producer: Producer) -> None:
    """Every input the producer sent is stored at most once, every acknowledged one once."""
    counts: dict[Any, int] = {}
    for rollout in client.query_rollouts():
        counts[rollout.input] = counts.get(rollout.input, 0) + 1
    assert producer.crash is None
    assert len(producer.acknowledged) > 0
    twice = {i: n for i, n in counts.items() if isinstance(i, str) and n > 1}
    assert twice == {}, "a write was applied twice"
    assert all(counts.get(i) == 1 for i in producer.acknowledged)


def _check(client: Any, ids: list[str], runners: list[Runner]) -> None:
    """Every rollout succeeded; nothing acknowledged is missing; no attempt claimed twice."""
    done = client.wait_for_rollouts(rollout_ids=ids, timeout=60.0)
    assert [r.status for r in done] == ["succeeded"] * len(ids)
    assert [r.crash for r in runners] == [None] * len(runners)
    claims = [c for r in runners for c in r.claims]
    assert len(claims) == len(set(claims)), "an attempt was handed out twice"
    attempts = {rid: client.query_attempts(rid) for rid in ids}
    for rid in ids:
        assert attempts[rid][-1].status == "succeeded"
    # Every acknowledged claim is one of its rollout's attempts (none overwritten by a
    # second claim of the same rollout), each with a sequence number of its own.
    by_id = {a.attempt_id: a for rid in ids for a in attempts[rid]}
    claims = [(rid, aid) for rid, aid in claims if rid in attempts]  # the trainer's rollouts
    assert all(aid in by_id for _, aid in claims), "a claimed attempt was lost"
    numbers = [(rid, by_id[aid].sequence_id) for rid, aid in claims]
    assert len(numbers) == len(set(numbers)), "two claims of one rollout's attempt"
    for rid, aid in (f for r in runners for f in r.finished):
        assert client.get_rollout_by_id(rid).status == "succeeded"
        assert [a.status for a in client.query_attempts(rid) if a.attempt_id == aid] == [
            "succeeded"]
    stored = {(s.rollout_id, s.attempt_id, s.span_id) for rid in ids
              for s in client.query_spans(rid)}
    assert {s for r in runners for s in r.spans if s[0] in attempts} <= stored


def _wait_progress(progress: threading.Semaphore, count: int) -> None:
    for _ in range(count):
        assert progress.acquire(timeout=60.0), "the runners stopped making progress"


def _leader(servers: list[Any]) -> Any:
    for server in servers:
        with server.connect() as client:
            if client.statistics()["watchdog_leader"]:
                return server
    return None


@pytest.mark.timeout(240)
def test_a_server_killed_mid_load(url: str, tmp_path: Path) -> None:
    pg.two_keys(tmp_path)
    with running_server(tmp_path / "a", "--backend", url) as a, \
            running_server(tmp_path / "b", "--backend", url) as b:
        trainer = connect(f"{a.address},{b.address}", a.authkey, retry_for=10.0)
        ids = [r.rollout_id for r in trainer.enqueue_many_rollouts(
            [{"input": i, "config": CONFIG} for i in range(ROLLOUTS)])]
        deadline = time.monotonic() + 10
        while _leader([a, b]) is None:  # the first background pass takes the lead
            assert time.monotonic() < deadline, "no server leads the watchdog"
            time.sleep(0.1)
        victim = _leader([a, b])
        survivor = b if victim is a else a
        stop, progress = threading.Event(), threading.Semaphore(0)
        runners = [Runner(f"runner-{i}", f"{first.address},{second.address}", a.authkey,
                          stop, progress)
                   for i, (first, second) in enumerate([(a, b), (b, a)] * (RUNNERS // 2))]
        producer = Producer(f"{victim.address},{survivor.address}", a.authkey, stop)
        for runner in runners:
            runner.start()
        _wait_progress(progress, ROLLOUTS // 3)
        producer.start()
        _wait_progress(producer.acked, 20)  # the producer is sending to the victim
        victim.kill()  # SIGKILL: the watchdog's leader, mid-load
        try:
            _check(trainer, ids, runners)
            _wait_progress(producer.acked, 20)  # and then to the survivor
        finally:
            stop.set()
            for thread in [*runners, producer]:
                if thread.ident is not None:
                    thread.join(30)
        _check_applied_once(trainer, producer)
        # The survivor took the watchdog over: a claim nobody finishes is given up by a
        # background pass alone (read here from the database, so no call runs the watchdog).
        # The producer's last rollouts may still be queued ahead of it (FIFO): claimed too.
        with survivor.connect() as client:
            late = client.enqueue_rollout("late", config={"unresponsive_seconds": 0.5})
            while (claimed := client.dequeue_rollout()) is not None:
                if claimed.rollout_id == late.rollout_id:
                    break
            assert claimed is not None, "the late rollout was not claimed"
        _wait_status(url, late.rollout_id, "failed", within=15.0)
        with survivor.connect() as client:
            assert client.statistics()["watchdog_leader"]
        trainer.close()
        assert victim.popen.returncode == -9


def _wait_status(url: str, rollout_id: str, status: str, within: float) -> None:
    import psycopg

    deadline = time.monotonic() + within
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT status FROM mpstore_rollouts WHERE rollout_id = %s",
                               (rollout_id,)).fetchone()
            if row[0] == status:
                return
            assert time.monotonic() < deadline, f"still {row[0]} after {within} s"
            time.sleep(0.1)


@pytest.mark.timeout(240)
def test_postgres_restarted_mid_load(tmp_path: Path) -> None:
    from mpstore.postgres.cluster import Cluster

    if pg.unavailable() or pg.os.environ.get(pg.ENV_URL):
        pytest.skip("needs a throwaway cluster of its own, to restart it")
    cluster = Cluster()
    try:
        url = pg.prepare_template(cluster.url)
        with running_server(tmp_path, "--backend", url) as server:
            trainer = server.connect(retry_for=10.0)
            ids = [r.rollout_id for r in trainer.enqueue_many_rollouts(
                [{"input": i, "config": CONFIG} for i in range(ROLLOUTS)])]
            stop, progress = threading.Event(), threading.Semaphore(0)
            runners = [Runner(f"runner-{i}", server.address, server.authkey, stop, progress)
                       for i in range(RUNNERS // 2)]
            for runner in runners:
                runner.start()
            _wait_progress(progress, ROLLOUTS // 3)
            began = time.monotonic()
            cluster.stop("fast")
            cluster.start()
            back = time.monotonic()
            try:
                _check(trainer, ids, runners)
            finally:
                stop.set()
                for runner in runners:
                    runner.join(30)
            errors = [(t, e) for r in runners for t, e in r.errors]
            late = [(round(t - back, 2), e) for t, e in errors if not began <= t <= back + 10.0]
            assert late == [], "errors outside the restart and its retry window"
            trainer.close()
    finally:
        cluster.remove()
