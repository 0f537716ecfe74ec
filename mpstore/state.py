"""The store's state and the operations on it, without locks, waits or copies.

``StoreState`` holds the records and the indexes that keep every operation's cost independent
of the store's size:

* the queue is an ``OrderedDict`` (O(1) append, pop-left and removal by id), kept in exact sync
  with the status: a rollout is queued if and only if it is queuing/requeuing (REF I1), so a
  dequeue never skips stale heads;
* ``by_status`` indexes rollout ids per status, for ``query_rollouts(status=...)`` and O(1)
  ``statistics()``;
* the watchdog keeps a heap of "earliest time something could happen" per watched rollout,
  so a pass costs O(rollouts due) instead of O(rollouts running).

Every method takes ``now`` from the caller and returns the store's own objects; the caller
(``store.InMemoryStore``) holds the lock, reads the clock and decides what to copy. Methods
validate everything before their first write (D1), so an exception leaves the state as it was.
Status rules come from ``transitions``; this module only applies them. The reads (queries,
spans, the feed's pages, statistics) are in :mod:`mpstore.state_reads`.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple

from . import transitions as tr
from . import workers as wk
from .changes import Changes, ChangeSet, RolloutRow, Saved
from .errors import AttemptNotFound, NoAttempts, RolloutNotFound
from .eviction import Thresholds, choose_victims, span_size
from .feed import FinishLog
from .replies import ReplyMemory
from .state_reads import StateReads
from .types import (
    Attempt,
    AttemptStatus,
    ResourcesUpdate,
    Rollout,
    RolloutStatus,
    Span,
    Worker,
    new_attempt_id,
    new_resources_id,
    new_rollout_id,
)

__all__ = ["StoreState"]

logger = logging.getLogger("mpstore.store")

#: How much earlier than its exact deadline a rollout is looked at (clock units, seconds).
_EARLY = 1e-6


def _span_key(span: Span) -> int:
    return span.sequence_id


class _Timed(NamedTuple):
    """An attempt's status and times in monotonic time, for the watchdog rules."""

    status: AttemptStatus
    start_time: float
    last_heartbeat_time: float | None


class StoreState(StateReads):
    """All rollouts, attempts, spans and resources, plus their indexes. Not thread-safe."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self.rollouts: dict[str, Rollout] = {}  # creation order
        self.created: dict[str, int] = {}  # rollout id -> creation number, for sorting
        self.attempts: dict[str, list[Attempt]] = {}
        self.by_status: dict[RolloutStatus, dict[str, None]] = {s: {} for s in RolloutStatus}
        self.queue: OrderedDict[str, int] = OrderedDict()  # rollout id -> queue position
        self.spans: dict[str, list[Span]] = {}
        self.span_index: dict[str, dict[tuple[str, str], Span]] = {}  # D7 duplicate check
        self.sequence: dict[str, int] = {}
        self.span_bytes: dict[str, int] = {}
        self.total_span_bytes = 0
        self.total_spans = 0
        self.total_attempts = 0
        # Counted for operators (statistics(), metrics) since this process started: attempts
        # that retried a rollout, attempts that became timeout / unresponsive (watchdog or
        # update_attempt), spans dropped by eviction.
        self.retried_attempts = self.spans_evicted = 0
        self.attempts_became = dict.fromkeys(AttemptStatus, 0)
        self.evicted: set[str] = set()
        self.resources: dict[str, ResourcesUpdate] = {}
        self.latest_resources_id: str | None = None
        #: Runners by worker id, derived from claims and attempt updates (mpstore.workers);
        #: telemetry, not journaled.
        self.workers: dict[str, Worker] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._scheduled: dict[str, float] = {}
        self._tiebreak = itertools.count()
        self._creation = itertools.count()
        self._queue_position = itertools.count()
        #: Set by a durable store (``track_changes``); None keeps an in-memory store free of
        #: the bookkeeping.
        self.changes: Changes | None = None
        # Bumped on every write the waiters care about; the store compares them to notify.
        self.terminal_writes = 0
        self.finished: list[str] = []  # ids written terminal, until the store notifies
        self.queue_appends = 0
        self.finishes = FinishLog()  # the feed of finished rollouts
        self.freed_bytes = 0  # span bytes evicted or deleted, until the store releases them
        self.replies = ReplyMemory()  # for resent requests (mpstore.replies)
        #: Wall-clock minus monotonic time, set by the caller before each operation. Every
        #: deadline is kept in monotonic time (timestamp - the skew it was taken at), so a
        #: step of the wall clock changes no deadline. ``_skews``: for the latest attempt of
        #: each watched rollout, the skews at its start and at its last heartbeat; absent
        #: (restored attempts) means "the current skew": re-anchored on the wall clock.
        self.skew = 0.0
        self._skews: dict[str, tuple[float, float]] = {}

    # ----------------------------------------------------------------- lookups (raise)
    def rollout(self, rollout_id: str) -> Rollout:
        try:
            return self.rollouts[rollout_id]
        except KeyError:
            raise RolloutNotFound(rollout_id) from None

    def attempt(self, rollout_id: str, attempt_id: str) -> Attempt:
        """The attempt ``attempt_id`` (or ``"latest"``), with REF's error order (E6)."""
        self.rollout(rollout_id)
        attempts = self.attempts[rollout_id]
        if not attempts:
            raise NoAttempts(rollout_id)
        if attempt_id == "latest":
            return attempts[-1]
        for attempt in reversed(attempts):  # the latest ones are the ones updated most
            if attempt.attempt_id == attempt_id:
                return attempt
        raise AttemptNotFound(rollout_id, attempt_id)

    def latest_attempt(self, rollout_id: str) -> Attempt | None:
        attempts = self.attempts.get(rollout_id)
        return attempts[-1] if attempts else None

    # ----------------------------------------------------------------- change tracking
    def track_changes(self) -> None:
        """From now on, record what changes, for :meth:`take_changes` (durable stores)."""
        self.changes = Changes()

    def touch(self, rollout_id: str) -> None:
        """Mark a rollout's row as changed. Called by the few primitives that write a rollout,
        an attempt or a counter (``write_status``, ``_set``, ``create``, ``next_sequence_id``
        ...), never by the operations built on them; tests/test_staging.py checks after every
        public method that what was taken equals the state."""
        if self.changes is not None:
            self.changes.rollouts.add(rollout_id)

    def take_changes(self) -> ChangeSet | None:
        """What changed since the last call, as rows (None: nothing); resets the record."""
        changes = self.changes
        if not changes:
            return None
        out = ChangeSet()
        for rid in changes.rollouts:
            rollout = self.rollouts.get(rid)
            if rollout is None:
                out.counters.append((rid, self.sequence.get(rid, 0)))
            else:
                out.rollouts.append(RolloutRow(rollout, self.attempts[rid], self.created[rid],
                                               self.queue.get(rid), self.sequence.get(rid, 0),
                                               self.finishes.number.get(rid)))
        out.spans, out.evicted, out.deleted = changes.spans, changes.evicted, changes.deleted
        out.replies, out.forgotten = changes.replies, changes.forgotten
        out.resources = [self.resources[r] for r in changes.resources]
        if changes.resources:
            out.latest_resources_id = self.latest_resources_id
        self.changes = Changes()
        return out

    def _enqueue(self, rollout_id: str) -> None:
        self.queue[rollout_id] = next(self._queue_position)
        self.queue_appends += 1

    # ----------------------------------------------------------------- status writes
    def write_status(self, rollout: Rollout, status: RolloutStatus, now: float) -> None:
        """The one path every rollout status change takes (REF E5): indexes, queue, end_time,
        waiters, watchdog schedule."""
        rid = rollout.rollout_id
        self.touch(rid)
        del self.by_status[rollout.status][rid]
        self.by_status[status][rid] = None
        rollout.status = status
        if status in tr.TERMINAL:
            rollout.end_time = now
            self.terminal_writes += 1
            self.finished.append(rid)
            self.finishes.add(rid)
        if status in tr.QUEUED:
            if rid not in self.queue:
                self._enqueue(rid)
        else:
            self.queue.pop(rid, None)
        if status in tr.WATCHED:
            self.schedule(rid, now)
        else:
            self._skews.pop(rid, None)

    def propagate(self, rollout: Rollout, now: float) -> None:
        """R := P(latest attempt), unless cancelled (D2); an unchanged status writes nothing
        (D12), so end_time is not re-stamped by a no-op."""
        latest = self.latest_attempt(rollout.rollout_id)
        if latest is None or rollout.status is RolloutStatus.CANCELLED:
            return
        status = tr.propagate(latest, rollout.config)
        if status is not rollout.status:
            self.write_status(rollout, status, now)

    # ----------------------------------------------------------------- watchdog
    def schedule(self, rollout_id: str, now: float) -> None:
        """(Re-)arm the watchdog for a watched rollout from its current state."""
        rollout = self.rollouts[rollout_id]
        latest = self.latest_attempt(rollout_id)
        if rollout.status not in tr.WATCHED or latest is None:
            return
        when = tr.next_check_time(self._timed(latest), rollout.config)
        if when is None:
            return
        # A little early, never late: "now - start > t" and "now > start + t" can disagree in
        # the last bit; a check that finds nothing due is re-armed (see _rearm).
        when -= _EARLY
        current = self._scheduled.get(rollout_id)
        if current is not None and current <= when:
            return
        self._scheduled[rollout_id] = when
        heapq.heappush(self._heap, (when, next(self._tiebreak), rollout_id))

    def _timed(self, attempt: Attempt) -> _Timed:
        """The latest attempt of a watched rollout, its times in monotonic time."""
        start_skew, beat_skew = self._skews.get(attempt.rollout_id) or (self.skew, self.skew)
        beat = attempt.last_heartbeat_time
        return _Timed(attempt.status, attempt.start_time - start_skew,
                      beat - beat_skew if beat else beat)

    def _stamped(self, attempt: Attempt, start: bool) -> None:
        """Note the skew at which the latest attempt's start or heartbeat was stamped."""
        rid = attempt.rollout_id
        if start:
            self._skews[rid] = (self.skew, self.skew)
        elif attempt is self.latest_attempt(rid):
            self._skews[rid] = ((self._skews.get(rid) or (self.skew,))[0], self.skew)

    def watchdog(self, now: float) -> int:
        """One pass (REF §2.4) over the rollouts due by ``now`` (wall clock; the pass runs in
        monotonic time, ``now - skew``); returns how many it checked.

        Due rollouts are checked in creation order, as REF's full scan does, so rollouts that
        requeue in the same pass enter the queue in a predictable order.
        """
        heap, due, steady = self._heap, [], now - self.skew
        while heap and heap[0][0] <= steady:
            when, _, rid = heapq.heappop(heap)
            if self._scheduled.get(rid) != when:
                continue  # superseded by an earlier entry
            del self._scheduled[rid]
            due.append(rid)
        if len(due) > 1:
            due.sort(key=self.created.__getitem__)
        for rid in due:
            self._check(rid, now, steady)
            self._rearm(rid, steady)
        return len(due)

    def _check(self, rid: str, now: float, steady: float) -> None:
        rollout = self.rollouts[rid]
        if rollout.status not in tr.WATCHED:
            return
        latest = self.latest_attempt(rid)
        if latest is None:
            logger.error("Rollout %s is running but has no attempts", rid)
            return
        verdict = tr.watchdog_verdict(self._timed(latest), rollout.config, steady)
        if verdict.attempt_status is not None:
            self._set(latest, {"status": verdict.attempt_status})
            wk.attempt_changed(self.workers, latest, now)
            self.attempts_became[latest.status] += 1
        if verdict.propagate:
            self.propagate(rollout, now)

    def _rearm(self, rid: str, now: float) -> None:
        """Re-arm after a check at monotonic time ``now``."""
        self.schedule(rid, now)
        # A check that changed nothing at its own deadline (float rounding between
        # "now - start > t" and "now > start + t") looks again at the next representable time.
        if self._scheduled.get(rid, math.inf) <= now:
            self._scheduled[rid] = math.nextafter(now, math.inf)
            heapq.heappush(self._heap, (self._scheduled[rid], next(self._tiebreak), rid))

    # ----------------------------------------------------------------- creating and claiming
    def create(self, fields: dict[str, Any], status: RolloutStatus, now: float,
               worker_id: str | None = None) -> Rollout:
        """A new rollout; ``fields`` were validated by the caller (with ``rollout_id``: an id
        not in use). Not queuing: claimed at once, by attempt 1 of ``worker_id`` (E2)."""
        resources_id = fields["resources_id"] or self.latest_resources_id  # REF Q12
        rid = fields.get("rollout_id")  # caller-chosen: the caller checked it is new
        while rid is None or rid in self.rollouts:  # 48 random bits: a clash is rare
            rid = new_rollout_id()
        rollout = Rollout(
            rid, fields["input"], now, None, fields["mode"], resources_id,
            RolloutStatus.QUEUING, fields["config"],
            {} if fields["metadata"] is None else fields["metadata"],
        )
        self.rollouts[rid] = rollout
        self.created[rid] = next(self._creation)
        self.attempts[rid] = []
        self.by_status[RolloutStatus.QUEUING][rid] = None
        self.sequence[rid] = 0
        self.touch(rid)
        if status is RolloutStatus.QUEUING:
            self._enqueue(rid)
        else:
            self.new_attempt(rollout, worker_id, now)
        return rollout

    def new_attempt(self, rollout: Rollout, worker_id: str | None, now: float) -> Attempt:
        """Claim: attempt n+1, rollout preparing and out of the queue (E3/E4)."""
        attempts = self.attempts[rollout.rollout_id]
        attempt = Attempt(
            rollout.rollout_id, new_attempt_id(), len(attempts) + 1, now, worker_id=worker_id
        )
        self.retried_attempts += len(attempts) > 0
        attempts.append(attempt)
        self.total_attempts += 1
        self._stamped(attempt, start=True)
        self.write_status(rollout, RolloutStatus.PREPARING, now)
        if worker_id:
            wk.attempt_changed(self.workers, attempt, now)
        return attempt

    def dequeue(self, worker_id: str | None, now: float) -> tuple[Rollout, Attempt] | None:
        if not self.queue:
            return None
        rid, _ = self.queue.popitem(last=False)
        rollout = self.rollouts[rid]
        attempt = self.new_attempt(rollout, worker_id, now)
        if worker_id:
            self.workers[worker_id].last_dequeue_time = now
        return rollout, attempt

    # ----------------------------------------------------------------- updates
    def _set(self, record: Rollout | Attempt, fields: dict[str, Any]) -> None:
        """Write fields of a stored rollout or attempt: the one primitive for it."""
        self.touch(record.rollout_id)
        for name, value in fields.items():
            setattr(record, name, value)

    def update_attempt(self, attempt: Attempt, changes: dict[str, Any], now: float) -> None:
        """Apply validated ``changes``; propagate only when a status was set (D3)."""
        old = attempt.status
        self._set(attempt, changes)
        if "last_heartbeat_time" in changes:
            self._stamped(attempt, start=False)
        if attempt.status is not old:
            self.attempts_became[attempt.status] += 1
        if "status" in changes and changes["status"] in tr.ATTEMPT_ENDED:
            attempt.end_time = now
        if changes.get("worker_id") or ("status" in changes and attempt.worker_id):
            wk.attempt_changed(self.workers, attempt, now)
        rollout = self.rollouts[attempt.rollout_id]
        if attempt is not self.latest_attempt(attempt.rollout_id):
            return
        if "status" in changes:
            self.propagate(rollout, now)
        if rollout.status in tr.WATCHED:
            self.schedule(rollout.rollout_id, now)

    def update_rollout(self, rollout: Rollout, changes: dict[str, Any], now: float) -> None:
        status = changes.pop("status", None)
        self._set(rollout, changes)
        if status is not None:
            self.write_status(rollout, status, now)
        elif "config" in changes and rollout.status in tr.WATCHED:
            self.schedule(rollout.rollout_id, now)

    # ----------------------------------------------------------------- spans
    def next_sequence_id(self, rollout_id: str) -> int:
        value = self.sequence.get(rollout_id, 0) + 1
        self.sequence[rollout_id] = value
        self.touch(rollout_id)
        return value

    def check_span(self, span: Span) -> Attempt:
        """The span's attempt, or RolloutNotFound / AttemptNotFound (nothing is written)."""
        self.rollout(span.rollout_id)
        for attempt in reversed(self.attempts[span.rollout_id]):
            if attempt.attempt_id == span.attempt_id:
                return attempt
        raise AttemptNotFound(span.rollout_id, span.attempt_id)

    def add_span(self, span: Span, attempt: Attempt, now: float) -> Span | None:
        """Store a checked span (E7, D4, D7, D8). Returns the already stored duplicate, if any
        (then nothing else happens), else None."""
        rid = span.rollout_id
        index = self.span_index.get(rid)
        duplicate = None if index is None else index.get((span.attempt_id, span.span_id))
        if duplicate is not None:
            return duplicate
        if span.sequence_id > self.sequence.get(rid, 0):
            self.sequence[rid] = span.sequence_id
        if self._heartbeat(attempt, now) or rid in self.evicted:
            # A journal rewrites the rollout when a status changed. Otherwise the span's row
            # alone records the heartbeat and the counter (see ``restore``), which keeps the
            # hottest write to one row.
            self.touch(rid)
        if rid in self.evicted:
            return None  # D8: a heartbeat, but no longer kept
        if self.changes is not None:
            self.changes.spans.append((span, now))
        self._keep_span(span)
        if self.total_span_bytes > self.thresholds.eviction:
            self.evict()
        return None

    def _keep_span(self, span: Span) -> None:
        rid = span.rollout_id
        self.span_index.setdefault(rid, {})[(span.attempt_id, span.span_id)] = span
        spans = self.spans.setdefault(rid, [])
        if not spans or spans[-1].sequence_id <= span.sequence_id:
            spans.append(span)
        else:
            # Kept sorted by sequence_id, ties in arrival order (D6): insert after equals.
            bisect.insort_right(spans, span, key=_span_key)
        size = span_size(span)
        self.span_bytes[rid] = self.span_bytes.get(rid, 0) + size
        self.total_span_bytes += size
        self.total_spans += 1

    def _heartbeat(self, attempt: Attempt, now: float) -> bool:
        """A span's effect on its attempt and rollout (E7, D4); True if a status changed."""
        rollout = self.rollouts[attempt.rollout_id]
        latest = attempt is self.latest_attempt(attempt.rollout_id)
        revive = tr.span_revives_rollout(rollout.status, attempt.status, latest)
        attempt.last_heartbeat_time = now
        self._stamped(attempt, start=False)
        old, attempt.status = attempt.status, tr.span_attempt_status(attempt.status)
        if revive:
            self.write_status(rollout, RolloutStatus.RUNNING, now)
        return revive or attempt.status is not old

    def evict(self) -> None:
        """Drop whole rollouts' spans, finished ones first, oldest first (D8)."""
        def holders(finished: bool) -> Iterator[tuple[str, int]]:
            for rid, rollout in self.rollouts.items():
                if (rollout.status in tr.TERMINAL) is finished and rid in self.span_bytes:
                    yield rid, self.span_bytes[rid]

        victims = choose_victims(
            self.total_span_bytes, self.thresholds.safe, holders(True), holders(False)
        )
        logger.info("Evicting spans for %d rollouts to free up memory...", len(victims))
        freed = 0
        for rid in victims:
            size, dropped = self.span_bytes.pop(rid), len(self.spans.pop(rid, ()))
            self.total_spans -= dropped
            self.spans_evicted += dropped
            self.span_index.pop(rid, None)
            self.evicted.add(rid)
            if self.changes is not None:
                self.changes.evicted.append(rid)
            freed += size
        self.total_span_bytes -= freed
        self.freed_bytes += freed
        logger.info("Freed up %d bytes of memory", freed)

    # ----------------------------------------------------------------- resources
    def put_resources(
        self, resources_id: str | None, resources: dict[str, Any], now: float
    ) -> ResourcesUpdate:
        """Add (new id) or upsert (given id); either way it becomes "latest"."""
        if resources_id is None:
            resources_id = new_resources_id()
        old = self.resources.get(resources_id)
        if old is None:
            update = ResourcesUpdate(resources_id, resources, now, now, 1)
        else:
            update = ResourcesUpdate(resources_id, resources, old.create_time, now, old.version + 1)
        self.resources[resources_id] = update
        self.latest_resources_id = resources_id
        if self.changes is not None:
            self.changes.resources.add(resources_id)
        return update

    # ----------------------------------------------------------------- restore
    def restore(self, saved: Saved, now: float) -> None:
        """Rebuild an empty state, indexes included, from what a journal saved."""
        tickets: dict[str, int] = {}
        finished: list[tuple[int, str]] = []
        for (rollout, attempts, created, position, counter, number), ticket in saved.rollouts:
            rid = rollout.rollout_id
            if number is not None:
                finished.append((number, rid))
            tickets[rid] = ticket
            self.sequence[rid] = counter
            self.rollouts[rid] = rollout
            self.created[rid] = created
            self.attempts[rid] = attempts
            self.by_status[rollout.status][rid] = None
            self.total_attempts += len(attempts)
            if position is not None:
                self.queue[rid] = position
        self.queue = OrderedDict(sorted(self.queue.items(), key=lambda item: item[1]))
        self.finishes.restore(finished)
        self.replies.restore(saved.replies, now - self.skew)
        self._creation = itertools.count(max(self.created.values(), default=-1) + 1)
        self._queue_position = itertools.count(max(self.queue.values(), default=-1) + 1)
        self.sequence.update(saved.counters)
        self.evicted.update(saved.evicted)
        for ticket, arrived, span in saved.spans:
            self._keep_span(span)
            rid = span.rollout_id
            self.sequence[rid] = max(self.sequence.get(rid, 0), span.sequence_id)
            if ticket > tickets[rid]:  # newer than its rollout's row: its heartbeat is newer
                self.check_span(span).last_heartbeat_time = arrived
        for update in saved.resources:
            self.resources[update.resources_id] = update
        self.latest_resources_id = saved.latest_resources_id
        for rid in self.by_status[RolloutStatus.PREPARING] | self.by_status[RolloutStatus.RUNNING]:
            self.schedule(rid, now)  # running attempts keep their clocks: times are absolute

    # ----------------------------------------------------------------- replies
    def remember(self, request: tuple[str, int], result: Any, steady: float) -> None:
        """Keep the result of the request that made this operation's changes (steady:
        monotonic seconds). A durable state remembers only when something changed: a
        request that changed nothing is answered the same when it is run again."""
        if self.changes is not None and not self.changes:
            return
        client, seq = request
        forgotten = self.replies.remember(client, seq, result, steady)
        if self.changes is not None:
            self.changes.replies.append((client, seq, result))
            self.changes.forgotten.extend(forgotten)

    # ----------------------------------------------------------------- deleting
    def delete(self, rollout_id: str) -> bool:
        """Forget a rollout with its attempts, spans, counter, feed entry and indexes; False
        if it is not known. Its waiters are woken (it is unknown now: not waited for)."""
        rollout = self.rollouts.pop(rollout_id, None)
        if rollout is None:
            return False
        rid = rollout_id
        del self.created[rid], self.by_status[rollout.status][rid]
        self.total_attempts -= len(self.attempts.pop(rid))
        self.queue.pop(rid, None)
        self.total_spans -= len(self.spans.pop(rid, ()))
        self.span_index.pop(rid, None)
        freed = self.span_bytes.pop(rid, 0)
        self.total_span_bytes -= freed
        self.freed_bytes += freed
        self.sequence.pop(rid, None)
        self.evicted.discard(rid)
        self._scheduled.pop(rid, None)  # its heap entry is skipped when it comes up
        self._skews.pop(rid, None)
        self.finishes.discard(rid)
        self.finished.append(rid)
        if self.changes is not None:
            self.changes.rollouts.discard(rid)
            self.changes.deleted.append(rid)
        return True
