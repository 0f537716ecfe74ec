"""Runner crashes (issue 5): runner processes killed with SIGKILL in the middle of an attempt,
against a real ``agl store`` with a fast watchdog.

* The killed runner's attempt goes unresponsive and its rollout is requeued within
  ``unresponsive_seconds`` + the watchdog interval (+ a margin); another runner, long-polling
  in ``dequeue_rollout(wait=...)``, completes it; a trainer blocked in ``wait_for_rollouts``
  wakes up. A late result from the dead attempt (simulated: ``update_attempt`` and
  ``add_span`` on its id) is recorded on that attempt but does not change the rollout (D2-D4).
* A runner killed while it long-polls an empty queue claims nothing enqueued after its death.
* Under load, runners that hang mid-attempt at random are killed and replaced; every rollout
  ends, each succeeded one with exactly one succeeded attempt (its latest).
"""

from __future__ import annotations

import os
import queue
import random
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import pytest

from mpstore import Span, connect
from mpstore.manager.server import BLOCKING_SLICE
from mpstore.testing import ServerProcess
from tests.faults import ABANDONED, blocked_reading, mp_context, wait_until
from tests.remote import running_server

UNRESPONSIVE = 0.5  # config.unresponsive_seconds of the rollouts here
INTERVAL = 0.1  # the server's --watchdog-interval
MARGIN = 1.0  # scheduling on a loaded 2-core machine
CONFIG = {"unresponsive_seconds": UNRESPONSIVE, "max_attempts": 3,
          "retry_condition": ["unresponsive", "failed"]}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path, "--watchdog-interval", str(INTERVAL)) as srv:
        yield srv


# --------------------------------------------------------------------------- child processes
# Each child reports on its own one-way pipe: a send is done when it returns, and there is
# no lock shared between processes (a multiprocessing.Queue's is held by its feeder thread
# while it writes: a child killed at that moment would leave it held and block every other
# child's reports).
def pipe() -> tuple[Connection, Connection]:
    return mp_context().Pipe(duplex=False)  # type: ignore[no-any-return]


def receive(reader: Connection, timeout: float = 30) -> Any:
    assert reader.poll(timeout), "no report from the child"
    return reader.recv()


def start(target: Any, *args: Any) -> tuple[Any, Connection]:
    """A child process running ``target(*args, report)``; returns it and the read end."""
    reader, writer = pipe()
    proc = mp_context().Process(target=target, args=(*args, writer), daemon=True)
    proc.start()
    writer.close()  # the child's copy is the only one: its death reads as EOF here
    return proc, reader


def _hanging_runner(address: str, key: bytes, report: Connection) -> None:
    """Claims one rollout, sends a span, reports, then works on it for ever (a long model
    call), sending heartbeats, until it is killed: only its death stops the heartbeats."""
    store = connect(address, key)
    claimed = store.dequeue_rollout(worker_id="A", wait=30)
    assert claimed is not None
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    store.add_span(Span(rid, aid, 1, "started"))
    report.send(("hanging", rid, aid))
    pace = threading.Event()
    for _ in range(6000):  # SIGKILL ends it long before
        store.update_attempt(rid, aid, last_heartbeat_time=time.time())
        pace.wait(UNRESPONSIVE / 5)


def _rescuing_runner(address: str, key: bytes, go: Any, report: Connection) -> None:
    """Long-polls for a rollout, reports the claim and when, finishes it once told to."""
    store = connect(address, key)
    report.send(("polling", os.getpid()))
    claimed = store.dequeue_rollout(worker_id="B", wait=30)
    assert claimed is not None
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    report.send(("claimed", rid, aid, time.time()))
    assert go.wait(30)
    store.add_span(Span(rid, aid, 2, "work"))
    store.update_attempt(rid, aid, status="succeeded")
    report.send(("done", rid, aid))


def _long_poller(address: str, key: bytes, report: Connection) -> None:
    store = connect(address, key)
    report.send(("polling", os.getpid()))
    store.dequeue_rollout(worker_id="dead", wait=60)  # killed while it waits
    report.send(("returned",))


# --------------------------------------------------------------------------- tests
def test_killed_runner_attempt_is_requeued_completed_and_the_trainer_wakes(
        server: ServerProcess) -> None:
    go = mp_context().Event()
    store = server.connect()
    rollout = store.enqueue_rollout({"task": 1}, config=CONFIG)
    rid = rollout.rollout_id

    woke: list[Any] = []
    with server.connect() as trainer_client:
        trainer = threading.Thread(target=lambda: woke.append(
            trainer_client.wait_for_rollouts(rollout_ids=[rid], timeout=60)))
        trainer.start()

        runner_a, report_a = start(_hanging_runner, server.address, server.authkey)
        kind, got_rid, dead_aid = receive(report_a)
        assert (kind, got_rid) == ("hanging", rid)
        runner_b, report_b = start(_rescuing_runner, server.address, server.authkey, go)
        kind, pid_b = receive(report_b)
        assert kind == "polling"
        wait_until(lambda: blocked_reading(pid_b), 10, "runner B blocked in dequeue_rollout")

        os.kill(runner_a.pid, signal.SIGKILL)
        killed_at = time.time()
        runner_a.join(10)

        kind, got_rid, new_aid, claimed_at = receive(report_b)
        assert (kind, got_rid) == ("claimed", rid) and new_aid != dead_aid
        assert claimed_at - killed_at <= UNRESPONSIVE + INTERVAL + MARGIN
        attempts = store.query_attempts(rid)
        assert [a.status for a in attempts] == ["unresponsive", "preparing"]
        assert not woke  # the trainer still waits: the rollout is not finished

        # The dead runner's late result arrives while B works on the rollout.
        store.update_attempt(rid, dead_aid, status="failed")
        store.add_span(Span(rid, dead_aid, 7, "late"))
        during = store.get_rollout_by_id(rid)
        assert during.status == "preparing"  # B's attempt decides, not the dead one (D3/D4)
        assert store.get_latest_attempt(rid).attempt_id == new_aid

        go.set()
        assert receive(report_b) == ("done", rid, new_aid)
        trainer.join(30)
        assert not trainer.is_alive()
        runner_b.join(10)
    assert [r.status for r in woke[0]] == ["succeeded"]

    # Another late result from the dead attempt after the rollout finished changes nothing.
    finished = store.get_rollout_by_id(rid)
    store.update_attempt(rid, dead_aid, status="succeeded")
    store.add_span(Span(rid, dead_aid, 8, "later still"))
    after = store.get_rollout_by_id(rid)
    assert (after.status, after.end_time) == ("succeeded", finished.end_time)
    statuses = {a.attempt_id: a.status for a in store.query_attempts(rid)}
    assert statuses == {dead_aid: "succeeded", new_aid: "succeeded"}  # recorded, no effect
    assert {s.name for s in store.query_spans(rid, dead_aid)} == {"started", "late",
                                                                   "later still"}
    assert [s.name for s in store.query_spans(rid, "latest")] == ["work"]
    store.close()


def test_runner_killed_while_long_polling_claims_nothing(server: ServerProcess) -> None:
    with server.connect() as store:
        poller, report = start(_long_poller, server.address, server.authkey)
        _, pid = receive(report)
        wait_until(lambda: blocked_reading(pid), 10, "the poller blocked in dequeue_rollout")
        os.kill(pid, signal.SIGKILL)
        poller.join(10)
        # The server notices at its next check (BLOCKING_SLICE) and abandons the call,
        # instead of keeping it for its 60 s ...
        wait_until(lambda: ABANDONED in server.log(), BLOCKING_SLICE + 5,
                   "the dead poller's call abandoned")
        # ... so a rollout enqueued now goes to a live runner, not to the dead one.
        rollout = store.enqueue_rollout({"task": "after the death"})
        claimed = store.dequeue_rollout(worker_id="alive", wait=5)
        assert claimed is not None and claimed.rollout_id == rollout.rollout_id
        assert [a.worker_id for a in store.query_attempts(rollout.rollout_id)] == ["alive"]
        with pytest.raises(EOFError):  # it died without a word more
            receive(report, timeout=5)


# --------------------------------------------------------------------------- under load
def _flaky_runner(address: str, key: bytes, seed: int, hang: float, report: Connection
                  ) -> None:
    """Works rollouts until told to stop (an empty queue for long); with probability ``hang``
    an attempt gets stuck after its first span (and the test kills this process)."""
    rng = random.Random(seed)
    store = connect(address, key, retry_for=2.0)
    while True:
        claimed = store.dequeue_rollout(worker_id=f"r{seed}", wait=10)
        if claimed is None:
            return
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        store.add_span(Span(rid, aid, 1, "first"))
        if rng.random() < hang:
            report.send(("hanging", rid, aid))
            threading.Event().wait(600)
        for n in range(2, 2 + rng.randrange(3)):
            store.add_span(Span(rid, aid, n, "step"))
        status = "failed" if rng.random() < 0.2 else "succeeded"
        store.update_attempt(rid, aid, status=status)


def run_chaos(server: ServerProcess, runners: int, rollouts: int, hang: float,
              seed: int) -> dict[str, int]:
    """``rollouts`` rollouts worked by ``runners`` flaky runner processes; hanging runners
    are SIGKILLed and replaced. Returns counts; asserts the end state."""
    store = server.connect()
    ids = [r.rollout_id for r in store.enqueue_many_rollouts(
        [{"input": {"i": i}, "config": CONFIG} for i in range(rollouts)])]
    done: queue.Queue[list[Any]] = queue.Queue()
    trainer = threading.Thread(target=lambda: done.put(
        server.connect().wait_for_rollouts(rollout_ids=ids, timeout=900)))
    trainer.start()
    counter = iter(range(seed * 1000, seed * 1000 + 100_000))
    procs: dict[Connection, Any] = {}  # report pipe -> runner process

    def spawn() -> None:
        proc, report = start(_flaky_runner, server.address, server.authkey, next(counter),
                             hang)
        procs[report] = proc

    for _ in range(runners):
        spawn()
    kills, hung_attempts = 0, set()
    deadline = time.monotonic() + 900
    while done.empty():
        assert time.monotonic() < deadline, "the rollouts did not all finish"
        for report in wait(list(procs), timeout=0.1):
            proc = procs.pop(report)
            try:
                _, _rid, aid = report.recv()
            except EOFError:  # it ended (an empty queue for long): not replaced
                proc.join(10)
                continue
            proc.kill()  # SIGKILL, mid-attempt
            proc.join(10)
            kills += 1
            hung_attempts.add(aid)
            spawn()
    finished = done.get()
    trainer.join(10)
    for proc in procs.values():
        proc.kill()
        proc.join(10)

    assert [r.rollout_id for r in finished] == ids  # all of them, in input order
    succeeded = 0
    for rollout in store.query_rollouts(rollout_ids=ids):
        attempts = store.query_attempts(rollout.rollout_id)
        for attempt in attempts:
            if attempt.attempt_id in hung_attempts:
                assert attempt.status == "unresponsive", attempt
        if rollout.status == "succeeded":
            succeeded += 1
            assert [a.status for a in attempts].count("succeeded") == 1
            assert attempts[-1].status == "succeeded"
        else:
            assert rollout.status == "failed"
            assert attempts[-1].status in ("failed", "unresponsive")
            assert len(attempts) == 3  # both outcomes are retried up to max_attempts
    store.close()
    return {"rollouts": rollouts, "kills": kills, "succeeded": succeeded}


def test_runners_killed_at_random_under_load(server: ServerProcess) -> None:
    counts = run_chaos(server, runners=3, rollouts=30, hang=0.15, seed=1)
    assert counts["kills"] >= 1  # the seed makes some runners hang


@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_runners_killed_at_random_under_load_stress(server: ServerProcess) -> None:
    start = time.monotonic()
    counts = run_chaos(server, runners=8, rollouts=4000, hang=0.05, seed=2)
    print(f"\nchaos: {counts} in {time.monotonic() - start:.1f} s")
    assert counts["kills"] >= 100
