"""Timeouts and unresponsive runners: the server's watchdog requeues their rollouts.

    python examples/retries.py

Two rollouts, each allowed 3 attempts, retried after "timeout" or "unresponsive":

* one is claimed by a runner process that then crashes (SIGKILL): its heartbeats (spans) stop,
  and after ``unresponsive_seconds`` the watchdog marks the attempt unresponsive and requeues
  the rollout;
* one is claimed by a runner that keeps sending heartbeats but is too slow: after
  ``timeout_seconds`` the attempt times out and the rollout is requeued.

A healthy runner then completes both, and the trainer, blocked in ``wait_for_rollouts``,
wakes up. The server runs its watchdog every 0.1 s here (``agl store --watchdog-interval``),
so this happens even while nobody calls.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

from mpstore import RolloutConfig, Span, StoreClient
from mpstore.testing import start_server

CONFIG = RolloutConfig(timeout_seconds=2.0, unresponsive_seconds=0.5, max_attempts=3,
                       retry_condition=["timeout", "unresponsive"])


def heartbeat(store: StoreClient, rollout_id: str, attempt_id: str, name: str) -> None:
    sequence_id = store.get_next_span_sequence_id(rollout_id, attempt_id)
    store.add_span(Span(rollout_id, attempt_id, sequence_id, name))


def crashing_runner(store: StoreClient, claims: multiprocessing.Queue) -> None:
    """Claims a rollout, reports one span, then hangs until it is killed."""
    claimed = store.dequeue_rollout(worker_id="runner-crashing", wait=5)
    assert claimed is not None
    heartbeat(store, claimed.rollout_id, claimed.attempt.attempt_id, "started")
    claims.put(claimed.rollout_id)
    threading.Event().wait()  # "working" until SIGKILL


def slow_runner(store: StoreClient, claimed_one: threading.Event) -> None:
    """Heartbeats every 0.2 s but never finishes; stops once its attempt is taken away."""
    claimed = store.dequeue_rollout(worker_id="runner-slow", wait=5)
    assert claimed is not None
    claimed_one.set()
    rollout_id, attempt_id = claimed.rollout_id, claimed.attempt.attempt_id
    while True:
        mine = next(a for a in store.query_attempts(rollout_id) if a.attempt_id == attempt_id)
        if mine.status not in ("preparing", "running"):
            print(f"runner-slow: my attempt is {mine.status}; giving up")
            return
        heartbeat(store, rollout_id, attempt_id, "still thinking")
        time.sleep(0.2)  # the "work" between two heartbeats


def healthy_runner(store: StoreClient, count: int) -> None:
    for _ in range(count):
        claimed = store.dequeue_rollout(worker_id="runner-healthy", wait=10)
        assert claimed is not None, "the watchdog should have requeued it"
        heartbeat(store, claimed.rollout_id, claimed.attempt.attempt_id, "done quickly")
        store.update_attempt(claimed.rollout_id, "latest", status="succeeded")


def main() -> None:
    with start_server(args=["--watchdog-interval", "0.1"]) as server:
        store = server.connect()
        ids = [store.enqueue_rollout({"task": task}, config=CONFIG).rollout_id
               for task in ("will crash", "too slow")]

        ctx = multiprocessing.get_context("spawn")
        claims = ctx.Queue()
        crasher = ctx.Process(target=crashing_runner, args=(store, claims))
        crasher.start()
        claims.get(timeout=30)  # it holds the first rollout ...
        crasher.kill()  # ... and dies without a word
        crasher.join()
        print("runner-crashing claimed the first rollout and was killed")

        claimed_one = threading.Event()
        slow = threading.Thread(target=slow_runner, args=(store, claimed_one))
        slow.start()
        claimed_one.wait(30)  # it holds the second rollout; a healthy runner comes next
        healthy = threading.Thread(target=healthy_runner, args=(store, 2))
        healthy.start()

        start = time.monotonic()
        done = store.wait_for_rollouts(rollout_ids=ids, timeout=30)
        print(f"trainer: {len(done)} rollouts finished after {time.monotonic() - start:.1f} s")
        slow.join(10)
        healthy.join(10)
        history = {}
        for rollout in done:
            print(f"{rollout.rollout_id}  {rollout.input['task']!r}: {rollout.status}")
            attempts = store.query_attempts(rollout.rollout_id)
            for attempt in attempts:
                print(f"    attempt {attempt.sequence_id}  {attempt.worker_id:<16} "
                      f"{attempt.status}")
            history[rollout.input["task"]] = [str(a.status) for a in attempts]
        if history != {"will crash": ["unresponsive", "succeeded"],
                       "too slow": ["timeout", "succeeded"]}:
            raise SystemExit(f"unexpected history: {history}")
        store.close()


if __name__ == "__main__":
    main()
