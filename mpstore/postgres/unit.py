"""One rollout and its attempts, loaded for update: the unit every change of a database
backend applies to.

``StoreState`` (in memory) keeps every record and index in dicts; a database keeps them in
rows, and a call loads only the rollouts it touches, under a row lock. :class:`Unit` is that
loaded rollout: the same write path as ``StoreState`` (one ``write_status`` for every status
change, ``propagate``, claims, attempt/rollout updates, a span's heartbeat, a watchdog check),
with every rule taken from :mod:`mpstore.transitions`, plus what the storage must write back:

* ``dirty``: the rollout's row must be rewritten;
* ``queued`` (must the row hold a queue position) and ``appended`` (it just entered the
  queue: a new position at the tail, and a "queued" notification);
* ``finished``: it was written terminal (waiters are notified);
* :meth:`check_at`: the watchdog's next look, from ``transitions.next_check_time``.

It knows nothing of SQL: the storage reads rows into units and writes units back into rows.
"""

from __future__ import annotations

import math
from typing import Any

from .. import transitions as tr
from ..errors import AttemptNotFound, NoAttempts
from ..types import Attempt, AttemptedRollout, Rollout, RolloutStatus, new_attempt_id

__all__ = ["EARLY", "Unit"]

#: How much earlier than its exact deadline a rollout is looked at (as StoreState does).
EARLY = 1e-6
_RUNNING = RolloutStatus.RUNNING


class Unit:
    """A rollout and its attempts (in sequence order), with what changed; see the module."""

    __slots__ = ("appended", "attempts", "checked", "dirty", "finished", "new", "queued",
                 "rollout", "version", "worker_events")

    def __init__(self, rollout: Rollout, attempts: list[Attempt], queued: bool,
                 *, new: bool = False, version: int = 0) -> None:
        self.version = version  # of the row it was read from (the storage's concern)
        self.rollout = rollout
        self.attempts = attempts
        self.queued = queued
        self.new = new  # not yet a row: inserted, not updated
        self.dirty = new
        self.appended = False
        self.finished = False
        self.checked: float | None = None  # set by watchdog(): the time it looked
        #: (attempt as it was then, claimed by a dequeue) for mpstore.workers.attempt_changed,
        #: in order: the worker records the storage must update with the rollout
        self.worker_events: list[tuple[Attempt, bool]] = []

    @property
    def terminal(self) -> bool:
        return self.rollout.status in tr.TERMINAL

    @property
    def rollout_id(self) -> str:
        return self.rollout.rollout_id

    def latest(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def attempt(self, attempt_id: str) -> Attempt:
        """The attempt ``attempt_id`` or ``"latest"``, with REF's error order (E6)."""
        if not self.attempts:
            raise NoAttempts(self.rollout_id)
        if attempt_id == "latest":
            return self.attempts[-1]
        return self.span_attempt(attempt_id)

    def span_attempt(self, attempt_id: str) -> Attempt:
        for attempt in reversed(self.attempts):
            if attempt.attempt_id == attempt_id:
                return attempt
        raise AttemptNotFound(self.rollout_id, attempt_id)

    # ----------------------------------------------------------------- status writes
    def write_status(self, status: RolloutStatus, now: float) -> None:
        """The one path every status change takes (REF E5): end_time, queue membership."""
        self.dirty = True
        self.rollout.status = status
        if status in tr.TERMINAL:
            self.rollout.end_time = now
            self.finished = True
        if status in tr.QUEUED:
            if not self.queued:
                self.queued = self.appended = True
        else:
            self.queued = False

    def propagate(self, now: float) -> None:
        """R := P(latest attempt), unless cancelled (D2); an unchanged status writes nothing."""
        latest = self.latest()
        if latest is None or self.rollout.status is RolloutStatus.CANCELLED:
            return
        status = tr.propagate(latest, self.rollout.config)
        if status is not self.rollout.status:
            self.write_status(status, now)

    def new_attempt(self, worker_id: str | None, now: float, dequeued: bool = False
                    ) -> Attempt:
        """Claim: attempt n+1, rollout preparing and out of the queue (E3/E4); its worker
        becomes busy (``dequeued``: by a dequeue, which stamps its last dequeue)."""
        attempt = Attempt(self.rollout_id, new_attempt_id(), len(self.attempts) + 1, now,
                          worker_id=worker_id)
        self.attempts.append(attempt)
        self.write_status(RolloutStatus.PREPARING, now)
        self._worker_event(attempt, dequeued)
        return attempt

    def dequeue(self, worker_id: str | None, now: float) -> AttemptedRollout:
        """A dequeue's claim (:meth:`new_attempt`): the rollout with its new attempt, as
        ``dequeue_rollout`` answers."""
        attempt = self.new_attempt(worker_id, now, dequeued=True)
        return AttemptedRollout.of(self.rollout.snapshot(), attempt.snapshot())

    def _worker_event(self, attempt: Attempt, dequeued: bool = False) -> None:
        if attempt.worker_id:
            self.worker_events.append((attempt.snapshot(), dequeued))

    # ----------------------------------------------------------------- updates
    def update_attempt(self, attempt: Attempt, changes: dict[str, Any], now: float) -> None:
        """Apply validated ``changes``; propagate only when a status was set on the latest
        attempt (D3)."""
        self.dirty = True
        for name, value in changes.items():
            setattr(attempt, name, value)
        if "status" in changes and changes["status"] in tr.ATTEMPT_ENDED:
            attempt.end_time = now
        if changes.get("worker_id") or "status" in changes:
            self._worker_event(attempt)
        if attempt is self.latest() and "status" in changes:
            self.propagate(now)

    def update_rollout(self, changes: dict[str, Any], now: float) -> None:
        self.dirty = True
        status = changes.pop("status", None)
        for name, value in changes.items():
            setattr(self.rollout, name, value)
        if status is not None:
            self.write_status(status, now)

    def heartbeat(self, attempt: Attempt, now: float) -> None:
        """A new span's effect on its attempt and the rollout (E7, D4)."""
        self.dirty = True
        revive = tr.span_revives_rollout(self.rollout.status, attempt.status,
                                         attempt is self.latest())
        attempt.last_heartbeat_time = now
        attempt.status = tr.span_attempt_status(attempt.status)
        if revive:
            self.write_status(_RUNNING, now)

    # ----------------------------------------------------------------- watchdog
    def watchdog(self, now: float) -> None:
        """One watchdog look (REF §2.4) at a rollout that was due by ``now``."""
        self.dirty = True
        self.checked = now
        latest = self.latest()
        if self.rollout.status not in tr.WATCHED or latest is None:
            return
        verdict = tr.watchdog_verdict(latest, self.rollout.config, now)
        if verdict.attempt_status is not None:
            latest.status = verdict.attempt_status
            self._worker_event(latest)
        if verdict.propagate:
            self.propagate(now)

    def check_at(self) -> float | None:
        """When the watchdog must look next (None: never, until something changes). A
        little early, never late; a look that found nothing at its own deadline (float
        rounding) looks again at the next representable time."""
        latest = self.latest()
        if self.rollout.status not in tr.WATCHED or latest is None:
            return None
        when = tr.next_check_time(latest, self.rollout.config)
        if when is None:
            return None
        when -= EARLY
        if self.checked is not None and when <= self.checked:
            when = math.nextafter(self.checked, math.inf)
        return when
