"""Workers (runners) derived from what they do, as agent-lightning 0.3.0 derives them.

A worker record appears with a worker's first dequeue, claim or ``update_worker`` heartbeat.
Its status follows its attempts, never its own word:

* a claim (``dequeue_rollout``, ``start_attempt``, ``start_rollout`` with a ``worker_id``)
  makes it busy on that attempt; a dequeue also stamps ``last_dequeue_time``;
* a dequeue that claims nothing makes it idle (``last_idle_time`` only when it was not idle
  already) and stamps ``last_dequeue_time``;
* an attempt update that sets a status on an attempt with a worker (or sets the worker)
  applies :data:`STATUS_AFTER` to the attempt's status: succeeded/failed -> idle,
  timeout/unresponsive -> unknown (the watchdog's verdicts count too), anything else -> busy;
* ``update_worker`` is a heartbeat: ``last_heartbeat_time`` and, when given, the stats.

Functions here take the state's ``workers`` dict and ``now``; the caller holds the lock.
"""

from __future__ import annotations

from typing import Any

from .types import Attempt, AttemptStatus, Worker, WorkerStatus

__all__ = ["STATUS_AFTER", "attempt_changed", "dequeued_nothing", "heartbeat"]

#: A worker's status after its attempt reached a status (agent-lightning 0.3.0); statuses
#: not listed (preparing, running) make it busy.
STATUS_AFTER: dict[AttemptStatus, WorkerStatus] = {
    AttemptStatus.SUCCEEDED: WorkerStatus.IDLE,
    AttemptStatus.FAILED: WorkerStatus.IDLE,
    AttemptStatus.TIMEOUT: WorkerStatus.UNKNOWN,
    AttemptStatus.UNRESPONSIVE: WorkerStatus.UNKNOWN,
}


def _worker(workers: dict[str, Worker], worker_id: str) -> Worker:
    worker = workers.get(worker_id)
    if worker is None:
        worker = workers[worker_id] = Worker(worker_id)
    return worker


def attempt_changed(workers: dict[str, Worker], attempt: Attempt, now: float,
                    dequeued: bool = False) -> None:
    """The attempt's worker after the attempt was claimed or reached a status."""
    if not attempt.worker_id:
        return
    worker = _worker(workers, attempt.worker_id)
    if dequeued:
        worker.last_dequeue_time = now
    status = STATUS_AFTER.get(attempt.status, WorkerStatus.BUSY)
    worker.status = status
    if status is WorkerStatus.BUSY:
        worker.last_busy_time = now
        worker.current_rollout_id, worker.current_attempt_id = (
            attempt.rollout_id, attempt.attempt_id)
    else:
        worker.last_idle_time = now
        worker.current_rollout_id = worker.current_attempt_id = None


def dequeued_nothing(workers: dict[str, Worker], worker_id: str, now: float) -> None:
    """A dequeue by ``worker_id`` found the queue empty: the worker is idle."""
    worker = _worker(workers, worker_id)
    worker.last_dequeue_time = now
    if worker.status is not WorkerStatus.IDLE:
        worker.status = WorkerStatus.IDLE
        worker.last_idle_time = now


def heartbeat(workers: dict[str, Worker], worker_id: str, stats: dict[str, Any] | None,
              given: bool, now: float) -> Worker:
    """``update_worker``: stamp the heartbeat; replace the stats when ``given``."""
    worker = _worker(workers, worker_id)
    worker.last_heartbeat_time = now
    if given:
        worker.heartbeat_stats = stats
    return worker
