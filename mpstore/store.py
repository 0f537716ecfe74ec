"""``InMemoryStore``: the public, thread-safe store API.

This layer adds exactly three things to :class:`~mpstore.state.StoreState`:

* **one lock** around every operation, with the watchdog run inside the same critical section
  as the operation on entry of REF's method set (D12), so a read after a deadline already sees
  its effect;
* **waiting** (``wait_for_rollouts``, ``dequeue_rollout(wait=...)``) on two conditions of that
  lock, woken by the writes that matter, never by polling; a waiter also wakes every
  ``watchdog_interval`` to run the watchdog, so timeouts fire while everyone waits;
* **copies** (D10): in process (``copy_records=True``) caller-given payloads are copied on the
  way in and records on the way out, so no caller aliases the store's state; a server that
  pickles every reply passes ``copy_records=False`` and gets shallow snapshots taken under the
  lock instead (pickling outside the lock is the copy).

Atomicity: every method is one critical section; batch methods validate the whole batch first,
so they apply entirely or not at all. Errors are the ``StoreError`` subclasses of
:mod:`mpstore.errors`; a raised error means nothing changed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from . import transitions as tr
from . import validate as v
from ._version import __version__
from .durable import Journal
from .errors import InvalidArgument, StorageError
from .eviction import resolve_thresholds
from .state import StoreState
from .types import (
    UNSET,
    Attempt,
    AttemptedRollout,
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


class InMemoryStore:
    """The rollout queue, attempts, spans and resources of one process, safe across threads.

    ``clock`` gives the store's notion of now (tests inject a fake one); ``eviction_threshold``
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
        eviction_threshold: float | int | None = None,
        safe_threshold: float | int | None = None,
        watchdog_interval: float = 1.0,
        copy_records: bool = True,
        data_dir: str | os.PathLike[str] | None = None,
        synchronous: str = "normal",
    ) -> None:
        if not watchdog_interval > 0:
            raise InvalidArgument(f"watchdog_interval must be > 0, not {watchdog_interval!r}")
        self._state = StoreState(resolve_thresholds(eviction_threshold, safe_threshold))
        self._journal: Journal | None = None
        self._deferral = threading.local()  # see deferred_commits
        if data_dir is not None:
            self._journal = Journal(data_dir, synchronous)
            try:
                self._state.restore(self._journal.load(), clock())
            except BaseException:
                self._journal.close()
                raise
            self._state.track_changes()
        self._clock = clock
        self._interval = float(watchdog_interval)
        self._lock = threading.Lock()
        # Waiters of wait_for_rollouts, by the rollout ids they wait for: a finished rollout
        # wakes its own waiters only (with 1,000 waiters, waking all on every finish cost
        # the server 96 % of its throughput).
        self._watchers: dict[str, set[threading.Condition]] = {}
        self._waiting = 0  # threads in _wait; the ticker runs while there are any
        self._ticking = False
        self._queued = threading.Condition(self._lock)  # rollout appended to the queue
        self._started = time.monotonic()
        self._copy = copy_records
        self._out: Callable[[Any], Any] = (
            (lambda r: r.clone()) if copy_records else (lambda r: r.snapshot())
        )
        self._inp: Callable[[Any], Any] = private_copy if copy_records else (lambda x: x)

    @property
    def durable(self) -> bool:
        """True if changes are committed to a data directory (``data_dir`` was given)."""
        return self._journal is not None

    # ----------------------------------------------------------------- helpers
    def _step(self, fn: Callable[[float], T], watchdog: bool, write: bool) -> tuple[T, int]:
        """The one path of every call, lock held: refuse a write the journal cannot take,
        run the watchdog (REF's method set, D12), ``fn(now)``, wake whoever the writes concern,
        and stage the changes for the journal. Returns the result and the journal ticket to
        wait for: the call's own, or for a call that changed nothing the last one staged, so
        that no reply shows what is not on disk yet (0: nothing to wait for).

        Raises StorageError, with the state as it is on disk, if the journal refuses writes
        or cannot stage them."""
        journal, state = self._journal, self._state
        appended = state.queue_appends
        now = self._clock()
        writable = journal is None or journal.writable()
        if write and not writable:
            assert journal is not None
            raise StorageError(journal.refusal())
        try:
            if watchdog and writable:
                state.watchdog(now)
            result = fn(now)
        finally:
            if state.finished:
                self._wake_watchers(state.finished)
            if state.queue_appends != appended:
                self._queued.notify(state.queue_appends - appended)
            ticket = self._stage() if journal is not None else 0
        return result, ticket

    def _stage(self) -> int:
        """Stage what the state changed (lock held); see :meth:`_step`."""
        assert self._journal is not None
        changes = self._state.take_changes()
        if changes is None:
            return self._journal.last_staged
        try:
            return self._journal.stage(changes)
        except StorageError:
            self._recover()  # the changes are in memory only: back to what is on disk
            raise

    def _recover(self) -> None:
        """Rebuild the state from the data directory after a failed write (lock held), and
        wake every waiter to look again."""
        assert self._journal is not None
        if not self._journal.broken:
            return
        state = StoreState(self._state.thresholds)
        state.restore(self._journal.recover(), self._clock())
        state.track_changes()
        self._state = state
        self._queued.notify_all()
        for conditions in self._watchers.values():
            for condition in conditions:
                condition.notify()

    def _persisted(self, ticket: int) -> None:
        """Return only once the change is on disk (lock released: others go on meanwhile),
        or, inside :meth:`deferred_commits`, leave that to its end. Raises StorageError if
        the commit failed, once the state is back to what is on disk."""
        if ticket:
            assert self._journal is not None
            if getattr(self._deferral, "active", False):
                self._deferral.ticket = max(self._deferral.ticket, ticket)
                return
            self._committed(ticket)

    def _committed(self, ticket: int) -> None:
        assert self._journal is not None
        try:
            self._journal.wait(ticket)
        except StorageError:
            with self._lock:
                self._recover()
            raise

    @contextlib.contextmanager
    def deferred_commits(self) -> Iterator[None]:
        """Within this block (on this thread), calls of a durable store return before their
        change is committed; all of them are committed together when the block ends, which
        raises StorageError if that failed (then none of the block's results may be
        reported: the state is back to what is on disk). For a server that answers several
        requests at once: it must send none of their replies before the block has ended.
        Not served remotely."""
        self._deferral.active, self._deferral.ticket = True, 0
        try:
            yield
        finally:
            self._deferral.active = False
            if self._deferral.ticket and self._journal is not None:
                self._committed(self._deferral.ticket)

    def _section(self, fn: Callable[[float], T], *, watchdog: bool = True,
                 write: bool = True) -> T:
        """Run ``fn(now)`` as one critical section; see :meth:`_step`. ``write=False``
        declares a read: it is served while writes are refused, and if a commit it waited
        for fails, it is answered again from what is on disk."""
        with self._lock:
            result, ticket = self._step(fn, watchdog, write)
        try:
            self._persisted(ticket)
        except StorageError:
            if write:
                raise
            return self._section(fn, watchdog=False, write=False)
        return result

    def _maybe(self, record: Any) -> Any:
        return None if record is None else self._out(record)

    def _attempted(self, pair: tuple[Rollout, Attempt]) -> AttemptedRollout:
        return AttemptedRollout.of(self._out(pair[0]), self._out(pair[1]))

    def _wake_watchers(self, finished: list[str]) -> None:
        watchers = self._watchers
        for rid in finished:
            for condition in watchers.get(rid, ()):
                condition.notify()
        finished.clear()

    def _wait(self, condition: threading.Condition, deadline: float | None) -> bool:
        """Sleep on ``condition`` (lock held) until notified or the deadline (monotonic);
        False once the deadline has passed. While anyone waits, a ticker thread runs the
        watchdog every ``watchdog_interval`` (D12), so timeouts fire and wake waiters even
        when nobody calls; one ticker for all waiters, not a wake-up each."""
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return False
        if not self._ticking:
            self._ticking = True
            threading.Thread(target=self._tick, name="mpstore-store-watchdog",
                             daemon=True).start()
        self._waiting += 1
        try:
            condition.wait(timeout)
        finally:
            self._waiting -= 1
        return True

    def _tick(self) -> None:
        while True:
            time.sleep(self._interval)
            with self._lock:
                if not self._waiting:
                    self._ticking = False
                    return
            self.run_watchdog()

    # ----------------------------------------------------------------- create
    def _fields(self, input: Any, mode: Any, resources_id: Any, config: Any, metadata: Any
                ) -> dict[str, Any]:
        return {
            "input": self._inp(input),
            "mode": v.mode(mode),
            "resources_id": v.optional_str(resources_id, "resources_id"),
            "config": v.config(config),
            "metadata": self._inp(v.metadata(metadata)),
        }

    def start_rollout(self, input: Any, mode: str | None = None, resources_id: str | None = None,
                      config: Any = None, metadata: dict[str, Any] | None = None,
                      worker_id: str | None = None) -> AttemptedRollout:
        """Create a rollout already claimed: status preparing, attempt 1; not queued (E2)."""
        fields = self._fields(input, mode, resources_id, config, metadata)
        worker = v.optional_str(worker_id, "worker_id")

        def run(now: float) -> AttemptedRollout:
            rollout = self._state.create(fields, _PREPARING, now, worker)
            attempt = self._state.latest_attempt(rollout.rollout_id)
            assert attempt is not None
            return self._attempted((rollout, attempt))

        return self._section(run)

    def enqueue_rollout(self, input: Any, mode: str | None = None, resources_id: str | None = None,
                        config: Any = None, metadata: dict[str, Any] | None = None) -> Rollout:
        """Create a rollout at the queue's tail, status queuing, no attempt (E1)."""
        fields = self._fields(input, mode, resources_id, config, metadata)
        return self._section(lambda now: self._out(self._state.create(fields, _QUEUING, now)))

    def enqueue_many_rollouts(self, requests: Sequence[dict[str, Any]]) -> list[Rollout]:
        """Enqueue several rollouts in order, atomically; each item is a dict of
        ``enqueue_rollout``'s arguments (``input`` required)."""
        if isinstance(requests, (str, bytes, dict)) or not isinstance(requests, Sequence):
            raise InvalidArgument("enqueue_many_rollouts takes a list of dicts")
        items = [v.enqueue_request(r, i) for i, r in enumerate(requests)]
        for item in items:
            item["input"], item["metadata"] = self._inp(item["input"]), self._inp(item["metadata"])
        return self._section(
            lambda now: [self._out(self._state.create(it, _QUEUING, now)) for it in items]
        )

    # ----------------------------------------------------------------- claim
    def dequeue_rollout(self, worker_id: str | None = None, *, wait: float = 0.0
                        ) -> AttemptedRollout | None:
        """Claim the rollout at the head of the queue (E3), or None when the queue stays
        empty for ``wait`` seconds (D13: a long poll; 0 returns at once)."""
        claimed = self.dequeue_many_rollouts(1, worker_id, wait=wait)
        return claimed[0] if claimed else None

    def dequeue_many_rollouts(self, limit: int, worker_id: str | None = None, *,
                              wait: float = 0.0) -> list[AttemptedRollout]:
        """Claim up to ``limit`` rollouts from the head, in queue order; with ``wait`` > 0,
        block until at least one is available or the time is up."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidArgument(f"limit must be an int >= 0, not {limit!r}")
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
            return claimed

        with self._lock:
            while True:
                claimed, ticket = self._step(claim, True, True)
                if claimed or limit == 0 or not self._wait(self._queued, deadline):
                    break
        self._persisted(ticket)
        return claimed

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
    def query_rollouts(self, *, status: Sequence[str] | None = None,
                       rollout_ids: Sequence[str] | None = None) -> list[Rollout]:
        """Rollouts in creation order, filtered by status and ids (AND); an empty list
        matches nothing (D9)."""
        statuses = None if status is None else [
            v.rollout_status(s) for s in v.sequence(status, "status")
        ]
        ids = None if rollout_ids is None else v.string_list(rollout_ids, "rollout_ids")
        return self._section(
            lambda now: [self._out(r) for r in self._state.query_rollouts(statuses, ids)],
            write=False,
        )

    def get_rollout_by_id(self, rollout_id: str) -> Rollout | None:
        v.identifier(rollout_id, "rollout_id")
        return self._section(lambda now: self._maybe(self._state.rollouts.get(rollout_id)),
                             write=False)

    def query_attempts(self, rollout_id: str) -> list[Attempt]:
        """The rollout's attempts by sequence_id; [] for an unknown rollout (REF Q11)."""
        v.identifier(rollout_id, "rollout_id")
        return self._section(
            lambda now: [self._out(a) for a in self._state.attempts.get(rollout_id, ())],
            write=False,
        )

    def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        v.identifier(rollout_id, "rollout_id")
        return self._section(lambda now: self._maybe(self._state.latest_attempt(rollout_id)),
                             write=False)

    # ----------------------------------------------------------------- wait
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

    def _unwatch(self, ids: list[str], condition: threading.Condition) -> None:
        for rid in ids:
            conditions = self._watchers.get(rid)
            if conditions is not None:
                conditions.discard(condition)
                if not conditions:
                    del self._watchers[rid]

    # ----------------------------------------------------------------- update
    def update_rollout(self, rollout_id: str, input: Any = NOT_GIVEN, mode: Any = NOT_GIVEN,
                       resources_id: Any = NOT_GIVEN, status: Any = NOT_GIVEN,
                       config: Any = NOT_GIVEN, metadata: Any = NOT_GIVEN) -> Rollout:
        """Replace the given fields (UNSET: keep). A status is written as given, with its side
        effects (E5): queue membership, end_time for terminal statuses, waiters woken."""
        v.identifier(rollout_id, "rollout_id")
        changes: dict[str, Any] = {}
        for name, value, check in (
            ("input", input, self._inp),
            ("mode", mode, v.mode),
            ("resources_id", resources_id, lambda x: v.optional_str(x, "resources_id")),
            ("status", status, v.rollout_status),
            ("config", config, v.config),
            ("metadata", metadata, lambda x: self._inp(v.metadata(x))),
        ):
            if v.is_set(value):
                changes[name] = check(value)

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
        changes: dict[str, Any] = {}
        for name, value, check in (
            ("status", status, v.attempt_status),
            ("worker_id", worker_id, lambda x: v.optional_str(x, "worker_id")),
            ("last_heartbeat_time", last_heartbeat_time,
             lambda x: v.optional_float(x, "last_heartbeat_time")),
            ("metadata", metadata, lambda x: self._inp(v.metadata(x))),
        ):
            if v.is_set(value):
                changes[name] = check(value)

        def run(now: float) -> Attempt:
            attempt = self._state.attempt(rollout_id, attempt_id)
            self._state.update_attempt(attempt, changes, now)
            return self._out(attempt)

        return self._section(run)

    # ----------------------------------------------------------------- spans
    def get_next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        """The next number of the rollout's span counter (shared by its attempts; REF §3.5)."""
        return self.get_many_span_sequence_ids([(rollout_id, attempt_id)])[0]

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

    def query_spans(self, rollout_id: str, attempt_id: str | None = None) -> list[Span]:
        """Spans by sequence_id (D6); ``attempt_id="latest"`` means the latest attempt.
        [] for an unknown rollout; SpansEvicted once its spans were evicted (D8)."""
        v.identifier(rollout_id, "rollout_id")
        v.optional_str(attempt_id, "attempt_id")
        spans = self._section(lambda now: self._state.query_spans(rollout_id, attempt_id),
                              write=False)
        # Stored spans are never mutated, so outside the lock is safe; the server returns
        # them as they are (pickling copies them).
        return [s.clone() for s in spans] if self._copy else spans

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
        """Counts in O(1): totals, queue length, span bytes, rollouts per status, uptime; for
        a durable store also ``storage``, the data directory's state (``writable``,
        ``last_error``, ``consecutive_failures``, ``retry_in_seconds``, ``path``)."""
        stats = self._section(lambda now: self._state.statistics(), write=False)
        stats["uptime"] = time.monotonic() - self._started
        if self._journal is not None:
            stats["storage"] = self._journal.status()
        return stats

    def run_watchdog(self) -> int:
        """One watchdog pass now (for a server's ticker); returns how many rollouts were due.
        Skipped (0) while a durable store refuses writes: its verdicts could not be kept."""
        if self._journal is not None and not self._journal.writable():
            return 0
        return self._section(lambda now: self._state.watchdog(now), watchdog=False)

    def close(self) -> None:
        """Commit what is pending and release the data directory (durable stores; a no-op
        otherwise). Not part of the remote API: the server closes its store on shutdown."""
        if self._journal is not None:
            with self._lock:
                journal, self._journal = self._journal, None
            journal.close()
