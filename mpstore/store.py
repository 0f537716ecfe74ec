"""``InMemoryStore``: the public, thread-safe store API.

Its public methods check their arguments and run as one critical section each through the
path of :class:`~mpstore.sections.Sections`, which adds to :class:`~mpstore.state.StoreState`:

* **one lock** around every operation, with the watchdog run inside the same critical section
  as the operation on entry of REF's method set (D12), so a read after a deadline already sees
  its effect;
* **waiting** (``wait_for_rollouts``, ``dequeue_rollout(wait=...)``, ``finished_rollouts``)
  on conditions of that lock, woken by the writes that matter, never by polling; while anyone
  waits a ticker runs the watchdog every ``watchdog_interval``, so timeouts fire;
* **persistence**: a durable store commits before a method returns.

This module adds **copies** (D10): in process (``copy_records=True``) caller-given payloads
are copied on the way in and records on the way out, so no caller aliases the store's state;
a server that pickles every reply passes ``copy_records=False`` and gets shallow snapshots
taken under the lock instead (pickling outside the lock is the copy).

Atomicity: every method is one critical section; batch methods validate the whole batch first,
so they apply entirely or not at all. Errors are the ``StoreError`` subclasses of
:mod:`mpstore.errors`; a raised error means nothing changed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import query as q
from . import transitions as tr
from . import validate as v
from . import workers as wk
from ._version import __version__
from .additions import Additions
from .errors import InvalidArgument, StorageError
from .runners import runners
from .sections import Sections
from .types import (
    UNSET,
    Attempt,
    AttemptedRollout,
    FinishedRollouts,
    Page,
    ResourcesUpdate,
    Rollout,
    RolloutStatus,
    Span,
    private_copy,
)

__all__ = ["InMemoryStore"]

T = TypeVar("T")
NOT_GIVEN: Any = UNSET
_QUEUING = RolloutStatus.QUEUING
_PREPARING = RolloutStatus.PREPARING


class InMemoryStore(Additions, Sections):
    """The rollout queue, attempts, spans and resources of one process, safe across threads.

    ``clock`` gives the wall-clock time of timestamps and ``monotonic`` the time deadlines are
    measured in (tests inject fake ones; see :mod:`mpstore.sections`); ``eviction_threshold``
    and ``safe_threshold`` bound span memory (float: ratio of RAM, int: bytes; REF §4.2);
    ``watchdog_interval`` is how often waiters run the watchdog, in real seconds.
    With ``data_dir``, every change is committed to SQLite there before the call returns and
    the state is restored from it on start (see :mod:`mpstore.durable`; ``synchronous`` is
    ``"normal"`` or ``"full"``); call :meth:`close` when done.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
        eviction_threshold: float | int | None = None,
        safe_threshold: float | int | None = None,
        watchdog_interval: float = 1.0,
        copy_records: bool = True,
        data_dir: str | os.PathLike[str] | None = None,
        synchronous: str = "normal",
    ) -> None:
        super().__init__(clock=clock, monotonic=monotonic,
                         eviction_threshold=eviction_threshold, safe_threshold=safe_threshold,
                         watchdog_interval=watchdog_interval, data_dir=data_dir,
                         synchronous=synchronous)
        self._copy = copy_records
        self._out: Callable[[Any], Any] = (
            (lambda r: r.clone()) if copy_records else (lambda r: r.snapshot())
        )
        self._inp: Callable[[Any], Any] = private_copy if copy_records else (lambda x: x)

    # ----------------------------------------------------------------- copies
    def _maybe(self, record: Any) -> Any:
        return None if record is None else self._out(record)

    def _attempted(self, pair: tuple[Rollout, Attempt]) -> AttemptedRollout:
        return AttemptedRollout.of(self._out(pair[0]), self._out(pair[1]))

    # ----------------------------------------------------------------- create
    def _fields(self, input: Any, mode: Any, resources_id: Any, config: Any, metadata: Any,
                rollout_id: Any) -> dict[str, Any]:
        return {
            "input": self._inp(input),
            "mode": v.mode(mode),
            "resources_id": v.optional_str(resources_id, "resources_id"),
            "config": v.config(config),
            "metadata": self._inp(v.metadata(metadata)),
            "rollout_id": v.chosen_id(rollout_id),
        }

    def _create(self, fields: dict[str, Any], status: RolloutStatus, now: float,
                worker: str | None = None) -> Rollout:
        """A new rollout, or the one already stored under the caller's id, unchanged."""
        existing = self._state.rollouts.get(fields["rollout_id"] or "")
        return existing if existing is not None else self._state.create(fields, status, now,
                                                                         worker)

    def start_rollout(self, input: Any, mode: str | None = None, resources_id: str | None = None,
                      config: Any = None, metadata: dict[str, Any] | None = None,
                      worker_id: str | None = None, *, rollout_id: str | None = None
                      ) -> AttemptedRollout:
        """Create a rollout already claimed: status preparing, attempt 1; not queued (E2).

        With ``rollout_id`` (caller-chosen) and a rollout of that id already stored, that
        rollout is returned unchanged, with its latest attempt (a retried creation does
        nothing twice); InvalidArgument if it has no attempt (it was enqueued, never
        started: ``start_attempt`` starts it)."""
        fields = self._fields(input, mode, resources_id, config, metadata, rollout_id)
        worker = v.optional_str(worker_id, "worker_id")

        def run(now: float) -> AttemptedRollout:
            rollout = self._create(fields, _PREPARING, now, worker)
            attempt = self._state.latest_attempt(rollout.rollout_id)
            if attempt is None:
                raise InvalidArgument(
                    f"Rollout {rollout.rollout_id} exists and was never started; "
                    f"start_attempt({rollout.rollout_id!r}) starts it")
            return self._attempted((rollout, attempt))

        return self._section(run)

    def enqueue_rollout(self, input: Any, mode: str | None = None, resources_id: str | None = None,
                        config: Any = None, metadata: dict[str, Any] | None = None, *,
                        rollout_id: str | None = None) -> Rollout:
        """Create a rollout at the queue's tail, status queuing, no attempt (E1). With
        ``rollout_id`` (caller-chosen) already stored, that rollout is returned unchanged."""
        fields = self._fields(input, mode, resources_id, config, metadata, rollout_id)
        return self._section(lambda now: self._out(self._create(fields, _QUEUING, now)))

    def enqueue_many_rollouts(self, requests: Sequence[dict[str, Any]]) -> list[Rollout]:
        """Enqueue several rollouts in order, atomically; each item is a dict of
        ``enqueue_rollout``'s arguments (``input`` required). An item whose ``rollout_id`` is
        already stored (or came earlier in the batch) gives that rollout, unchanged."""
        if isinstance(requests, (str, bytes, dict)) or not isinstance(requests, Sequence):
            raise InvalidArgument("enqueue_many_rollouts takes a list of dicts")
        items = [v.enqueue_request(r, i) for i, r in enumerate(requests)]
        for item in items:
            item["input"], item["metadata"] = self._inp(item["input"]), self._inp(item["metadata"])
        return self._section(
            lambda now: [self._out(self._create(it, _QUEUING, now)) for it in items]
        )

    def delete_rollouts(self, rollout_ids: Sequence[str]) -> int:
        """Delete rollouts with their attempts, spans and counters, atomically, in memory and
        on disk; running ones too (their later spans and updates get RolloutNotFound).
        Unknown ids are ignored (so it is safe to repeat); returns how many were deleted."""
        ids = v.string_list(rollout_ids, "rollout_ids")
        return self._section(lambda now: sum(self._state.delete(rid) for rid in ids))

    # ----------------------------------------------------------------- claim
    def dequeue_rollout(self, worker_id: str | None = None, *, wait: float = 0.0
                        ) -> AttemptedRollout | None:
        """Claim the rollout at the head of the queue (E3), or None when the queue stays
        empty for ``wait`` seconds (D13: a long poll; 0 returns at once)."""
        claimed = self._claim(1, worker_id, wait, lambda got: got[0] if got else None)
        return claimed  # type: ignore[no-any-return]

    def dequeue_many_rollouts(self, limit: int, worker_id: str | None = None, *,
                              wait: float = 0.0) -> list[AttemptedRollout]:
        """Claim up to ``limit`` rollouts from the head, in queue order; with ``wait`` > 0,
        block until at least one is available or the time is up."""
        claimed = self._claim(limit, worker_id, wait, lambda got: got)
        return claimed  # type: ignore[no-any-return]

    def _claim(self, limit: int, worker_id: str | None, wait: float,
               answer: Callable[[list[AttemptedRollout]], Any]) -> Any:
        """Claim up to ``limit``, waiting up to ``wait`` for the first; ``answer`` shapes
        the claimed list into the method's result. Only a claim is remembered for a resent
        request (an empty one changed nothing: a resend may claim)."""
        v.count(limit, "limit")
        worker = v.optional_str(worker_id, "worker_id")
        wait = v.optional_float(wait, "wait") or 0.0
        deadline = time.monotonic() + wait

        def claim(now: float) -> list[AttemptedRollout]:
            claimed = []
            while len(claimed) < limit:
                pair = self._state.dequeue(worker, now)
                if pair is None:
                    break
                claimed.append(self._attempted(pair))
            if not claimed and worker and limit:
                wk.dequeued_nothing(self._state.workers, worker, now)
            if claimed:
                self._remember(answer(claimed), now)
            return claimed

        with self._lock:
            while True:
                claimed, ticket = self._step(claim, True, True)
                if claimed or limit == 0 or not self._wait(self._queued, deadline):
                    break
        self._persisted(ticket)
        return answer(claimed)

    def start_attempt(self, rollout_id: str, worker_id: str | None = None) -> AttemptedRollout:
        """A new attempt from any status; the rollout becomes preparing and leaves the queue
        (E4; max_attempts is not checked: this is the manual retry)."""
        v.identifier(rollout_id, "rollout_id")
        worker = v.optional_str(worker_id, "worker_id")

        def run(now: float) -> AttemptedRollout:
            rollout = self._state.rollout(rollout_id)
            return self._attempted((rollout, self._state.new_attempt(rollout, worker, now)))

        return self._section(run)

    # ----------------------------------------------------------------- read
    def query_rollouts(
        self, *, status_in: Sequence[str] | None = None,
        rollout_id_in: Sequence[str] | None = None, rollout_id_contains: str | None = None,
        filter_logic: str = "and", sort_by: str | None = None, sort_order: str = "asc",
        limit: int = -1, offset: int = 0, status: Sequence[str] | None = None,
        rollout_ids: Sequence[str] | None = None, with_latest_attempt: bool = False,
    ) -> Page:
        """A page of rollouts (agent-lightning 0.3.0's filters; see :mod:`mpstore.query`), in
        creation order unless ``sort_by`` a field. ``status``/``rollout_ids`` are the older
        names of ``status_in``/``rollout_id_in`` (the newer win when both are given). An
        empty list matches nothing (D9). ``with_latest_attempt``: rollouts that have attempts
        come as ``AttemptedRollout`` with their latest (agent-lightning 0.3.0's shape)."""
        f = q.rollout_filters(status_in, rollout_id_in, rollout_id_contains, filter_logic,
                              sort_by, sort_order, limit, offset, status, rollout_ids,
                              with_latest_attempt)
        state = self._state

        def run(now: float) -> Page:
            found = q.rollout_page(state, f.statuses, f.ids, f.contains, f.logic, f.paging)
            if not with_latest_attempt:
                found[:] = [self._out(r) for r in found]
                return found
            for i, rollout in enumerate(found):
                latest = state.latest_attempt(rollout.rollout_id)
                found[i] = self._out(rollout) if latest is None else self._attempted(
                    (rollout, latest))
            return found

        return self._section(run, write=False)

    def get_rollout_by_id(self, rollout_id: str) -> Rollout | None:
        v.identifier(rollout_id, "rollout_id")
        return self._section(lambda now: self._maybe(self._state.rollouts.get(rollout_id)),
                             write=False)

    def query_attempts(self, rollout_id: str, *, sort_by: str | None = "sequence_id",
                       sort_order: str = "asc", limit: int = -1, offset: int = 0) -> Page:
        """A page of the rollout's attempts, by sequence_id unless sorted otherwise; empty
        for an unknown rollout (REF Q11)."""
        v.identifier(rollout_id, "rollout_id")
        paging = q.check_paging(None if sort_by == "sequence_id" and sort_order == "asc"
                                else sort_by, sort_order, limit, offset, q.ATTEMPT_SORT_FIELDS)
        state = self._state

        def run(now: float) -> Page:
            attempts = state.attempts.get(rollout_id, ())
            found = q.page(attempts, paging, None, len(attempts))
            found[:] = [self._out(a) for a in found]
            return found

        return self._section(run, write=False)

    def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        v.identifier(rollout_id, "rollout_id")
        return self._section(lambda now: self._maybe(self._state.latest_attempt(rollout_id)),
                             write=False)

    # ----------------------------------------------------------------- wait
    def finished_rollouts(self, after: int = 0, limit: int = 1000, *, wait: float = 0.0
                          ) -> FinishedRollouts:
        """The feed: rollouts finished after cursor ``after``, in the order they finished, at
        most ``limit``, with the cursor for the next call (``next_after``) and how many are
        finished now (``total``). A rollout that finishes again appears again, later; one
        reopened and not finished again is skipped. With ``wait`` > 0, blocks until at least
        one is there or the time is up. The cursor survives a restart of a durable store.
        Costs O(the page), however many rollouts are stored (see mpstore.feed)."""
        v.count(after, "after")
        v.count(limit, "limit")
        wait = v.optional_float(wait, "wait") or 0.0
        deadline = time.monotonic() + wait

        def page(now: float) -> FinishedRollouts:
            rollouts, cursor = self._state.finished_page(after, limit)
            return FinishedRollouts([self._out(r) for r in rollouts], cursor,
                                    self._state.finished_total())

        with self._lock:
            while True:
                result, ticket = self._step(page, True, False)
                if result.rollouts or limit == 0 or not self._wait(self._finishes, deadline):
                    break
        try:
            self._persisted(ticket)
        except StorageError:  # what it saw was not committed: answer from what is on disk
            return self.finished_rollouts(after, limit)
        return result

    def wait_for_rollouts(self, *, rollout_ids: Sequence[str], timeout: float | None = None
                          ) -> list[Rollout]:
        """The given rollouts that are finished, in input order (D11), once all known ones
        are finished or ``timeout`` seconds passed (None: no limit; <= 0: a snapshot).
        Unknown ids are omitted and not waited for; duplicates give duplicates."""
        ids = v.string_list(rollout_ids, "rollout_ids")
        timeout = v.optional_float(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout

        def pending(now: float) -> bool:
            rollouts = self._state.rollouts  # read anew: a failed write reloads the state
            return any(rid in rollouts and rollouts[rid].status not in tr.TERMINAL for rid in ids)

        condition = threading.Condition(self._lock)
        with self._lock:
            try:
                while True:
                    waiting, ticket = self._step(pending, True, False)
                    if not waiting:
                        break
                    for rid in ids:
                        self._watchers.setdefault(rid, set()).add(condition)
                    if not self._wait(condition, deadline):
                        break
            finally:
                self._unwatch(ids, condition)
            rollouts = self._state.rollouts
            done = [
                self._out(rollouts[rid]) for rid in ids
                if rid in rollouts and rollouts[rid].status in tr.TERMINAL
            ]
        try:
            self._persisted(ticket)
        except StorageError:  # what it saw was not committed: answer from what is on disk
            return self.wait_for_rollouts(rollout_ids=ids, timeout=0)
        return done

    # ----------------------------------------------------------------- update
    def update_rollout(self, rollout_id: str, input: Any = NOT_GIVEN, mode: Any = NOT_GIVEN,
                       resources_id: Any = NOT_GIVEN, status: Any = NOT_GIVEN,
                       config: Any = NOT_GIVEN, metadata: Any = NOT_GIVEN) -> Rollout:
        """Replace the given fields (UNSET: keep). A status is written as given, with its side
        effects (E5): queue membership, end_time for terminal statuses, waiters woken."""
        v.identifier(rollout_id, "rollout_id")
        changes = v.rollout_changes(input, mode, resources_id, status, config, metadata)
        for name in ("input", "metadata"):  # the caller's objects are not kept
            if name in changes:
                changes[name] = self._inp(changes[name])

        def run(now: float) -> Rollout:
            rollout = self._state.rollout(rollout_id)
            self._state.update_rollout(rollout, changes, now)
            return self._out(rollout)

        return self._section(run)

    def update_attempt(self, rollout_id: str, attempt_id: str, status: Any = NOT_GIVEN,
                       worker_id: Any = NOT_GIVEN, last_heartbeat_time: Any = NOT_GIVEN,
                       metadata: Any = NOT_GIVEN) -> Attempt:
        """Replace the given fields of an attempt (``"latest"`` allowed). Setting a status on
        the latest attempt re-derives the rollout with P (E6), except a cancelled one (D2);
        an update without status never does (D3)."""
        v.identifier(rollout_id, "rollout_id")
        v.identifier(attempt_id, "attempt_id")
        changes = v.attempt_changes(status, worker_id, last_heartbeat_time, metadata)
        if "metadata" in changes:
            changes["metadata"] = self._inp(changes["metadata"])

        def run(now: float) -> Attempt:
            attempt = self._state.attempt(rollout_id, attempt_id)
            self._state.update_attempt(attempt, changes, now)
            return self._out(attempt)

        return self._section(run)

    # ----------------------------------------------------------------- spans
    def get_next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        """The next number of the rollout's span counter (shared by its attempts; REF §3.5)."""
        checked = v.pairs([(rollout_id, attempt_id)])
        return self._section(lambda now: self._state.next_sequence_id(checked[0][0]),
                             watchdog=False)

    def get_many_span_sequence_ids(self, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """One sequence id per (rollout_id, attempt_id), allocated in order."""
        checked = v.pairs(pairs)
        return self._section(
            lambda now: [self._state.next_sequence_id(rid) for rid, _ in checked],
            watchdog=False,
        )

    def add_span(self, span: Span) -> Span:
        """Store a span and count it as its attempt's heartbeat (E7, D4). Idempotent (D7): a
        span already stored under the same (rollout, attempt, span_id) is returned unchanged
        and nothing else happens. Raises RolloutNotFound / AttemptNotFound."""
        checked = v.span(span)
        kept = self._inp(checked)

        def run(now: float) -> Span:
            state = self._state
            duplicate = state.add_span(kept, state.check_span(kept), now)
            return checked if duplicate is None else self._out(duplicate)

        # The hottest call, so not add_many_spans([span]): no lists built and taken apart.
        return self._section(run, watchdog=False)

    def add_many_spans(self, spans: Sequence[Span]) -> list[Span]:
        """``add_span`` for each, atomically: every span is checked before any is stored."""
        if isinstance(spans, (str, bytes, dict)) or not isinstance(spans, Sequence):
            raise InvalidArgument("add_many_spans takes a list of spans")
        given = [v.span(s) for s in spans]
        stored = [self._inp(s) for s in given]

        def run(now: float) -> list[Span]:
            state = self._state
            attempts = [state.check_span(s) for s in stored]
            out = []
            for span, kept, attempt in zip(given, stored, attempts, strict=False):
                duplicate = state.add_span(kept, attempt, now)
                out.append(span if duplicate is None else self._out(duplicate))
            return out

        return self._section(run, watchdog=False)

    def query_spans(
        self, rollout_id: str, attempt_id: str | None = None, *, trace_id: str | None = None,
        trace_id_contains: str | None = None, span_id: str | None = None,
        span_id_contains: str | None = None, parent_id: str | None = None,
        parent_id_contains: str | None = None, name: str | None = None,
        name_contains: str | None = None, filter_logic: str = "and", limit: int = -1,
        offset: int = 0, sort_by: str | None = "sequence_id", sort_order: str = "asc",
    ) -> Page:
        """A page of the rollout's spans, by sequence_id unless sorted otherwise (D6);
        ``attempt_id="latest"`` means the latest attempt. The exact and ``_contains`` filters
        are combined by ``filter_logic`` (the rollout and attempt always with AND). Empty for
        an unknown rollout; SpansEvicted once its spans were evicted (D8)."""
        v.identifier(rollout_id, "rollout_id")
        v.optional_str(attempt_id, "attempt_id")
        predicate, paging = q.span_filters(
            trace_id, trace_id_contains, span_id, span_id_contains, parent_id,
            parent_id_contains, name, name_contains, filter_logic, limit, offset, sort_by,
            sort_order)

        def run(now: float) -> Page:
            spans = self._state.query_spans(rollout_id, attempt_id)
            return q.page(spans, paging, predicate, None if predicate else len(spans))

        found = self._section(run, write=False)
        # Stored spans are never mutated, so outside the lock is safe; the server returns
        # them as they are (pickling copies them).
        if self._copy:
            found[:] = [s.clone() for s in found]
        return found

    # ----------------------------------------------------------------- resources
    def add_resources(self, resources: dict[str, Any]) -> ResourcesUpdate:
        """Store resources under a new ``rs-`` id; they become the latest."""
        checked = self._inp(v.resources(resources))
        return self._section(lambda now: self._out(self._state.put_resources(None, checked, now)))

    def update_resources(self, resources_id: str, resources: dict[str, Any]) -> ResourcesUpdate:
        """Upsert resources under ``resources_id`` (version + 1); they become the latest."""
        v.identifier(resources_id, "resources_id")
        checked = self._inp(v.resources(resources))
        return self._section(
            lambda now: self._out(self._state.put_resources(resources_id, checked, now))
        )

    def get_resources_by_id(self, resources_id: str) -> ResourcesUpdate | None:
        v.identifier(resources_id, "resources_id")
        return self._section(lambda now: self._maybe(self._state.resources.get(resources_id)),
                             write=False)

    def get_latest_resources(self) -> ResourcesUpdate | None:
        def latest(now: float) -> ResourcesUpdate | None:
            state = self._state
            return self._maybe(state.resources.get(state.latest_resources_id or ""))

        return self._section(latest, write=False)

    # ----------------------------------------------------------------- ops
    def ping(self) -> dict[str, Any]:
        """Who answers: name, version, pid, the store clock's time, uptime, and whether
        it takes writes (False while a durable store refuses them after a failed write)."""
        return {
            "name": "mpstore",
            "version": __version__,
            "pid": os.getpid(),
            "time": self._clock(),
            "uptime": time.monotonic() - self._started,
            "writable": self._journal is None or self._journal.writable(),
        }

    def statistics(self) -> dict[str, Any]:
        """Counts: totals, queue length, span bytes, rollouts per status, counters since
        start, uptime and the store clock's time; agent-lightning 0.3.0's keys (``name``,
        ``total_span_bytes``, ``total_workers`` ...); the runners in flight (the only part not
        O(1): O(rollouts in flight), see :mod:`mpstore.runners`). For a durable store also
        ``storage``, the data directory's state (``writable``, ``last_error``,
        ``consecutive_failures``, ``retry_in_seconds``, ``path``), and ``commits`` (their
        latency histogram and failures)."""

        def read(now: float) -> dict[str, Any]:
            stats = self._state.statistics()
            stats.update(runners(self._state), time=now)
            return stats

        stats = self._section(read, write=False)
        stats["name"] = type(self).__name__
        stats["uptime"] = time.monotonic() - self._started
        journal = self._journal
        if journal is not None:
            stats["storage"] = journal.status()
            stats["commits"] = journal.commit_stats()
        return stats

    def run_watchdog(self) -> int:
        """One watchdog pass now (for a server's ticker); returns how many rollouts were due.
        Skipped (0) while a durable store refuses writes: its verdicts could not be kept."""
        if self._journal is not None and not self._journal.writable():
            return 0
        return self._section(lambda now: self._state.watchdog(now), watchdog=False)
