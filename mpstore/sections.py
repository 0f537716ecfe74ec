"""The one path every store call takes: the lock, the watchdog on entry, waits, and a
durable store's staging, commit and recovery. :class:`~mpstore.store.InMemoryStore` builds its
public methods on it; this module knows the state and the journal, not the API.

A call is ``_section(fn, write=...)`` (or, for the blocking calls, ``_step`` in a wait loop):

1. refuse a write the journal cannot take (after a failed commit, see :mod:`mpstore.durable`);
2. run the watchdog (REF's method set, D12) and ``fn(now)``, which validates, then mutates;
3. wake the waiters the writes concern;
4. stage the state's changes (``StoreState.take_changes`` -> ``Journal.stage``);
5. release the lock and wait for the ticket (group commit); on a failed commit, rebuild the
   state from the database and raise StorageError.

Time. ``clock`` gives wall-clock timestamps (what users see: start, end, heartbeat times);
``monotonic`` measures elapsed time for every deadline, so a step of the system clock
(NTP, a resumed VM) times nothing out and delays nothing. The state is told the difference
between the two at every call (``StoreState.skew``) and keeps its watchdog in monotonic time.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .durable import Journal
from .errors import InvalidArgument, StorageError, StoreUnavailable
from .eviction import RELEASE_AFTER, release_free_memory, resolve_thresholds
from .state import StoreState

__all__ = ["Sections"]

T = TypeVar("T")


class Sections:
    """The lock, waits and persistence under every call of a store; see the module
    docstring. ``monotonic=None`` means ``time.monotonic`` with the default wall clock, and
    the given ``clock`` itself otherwise (a test's fake clock drives both)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
        eviction_threshold: float | int | None = None,
        safe_threshold: float | int | None = None,
        watchdog_interval: float = 1.0,
        data_dir: str | os.PathLike[str] | None = None,
        synchronous: str = "normal",
    ) -> None:
        if not watchdog_interval > 0:
            raise InvalidArgument(f"watchdog_interval must be > 0, not {watchdog_interval!r}")
        if monotonic is None:
            monotonic = time.monotonic if clock is time.time else clock
        self._clock, self._monotonic = clock, monotonic
        self._state = StoreState(resolve_thresholds(eviction_threshold, safe_threshold))
        self._state.skew = clock() - monotonic()
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
        self._interval = float(watchdog_interval)
        self._lock = threading.Lock()
        # Waiters of wait_for_rollouts, by the rollout ids they wait for: a finished rollout
        # wakes its own waiters only (with 1,000 waiters, waking all on every finish cost
        # the server 96 % of its throughput).
        self._watchers: dict[str, set[threading.Condition]] = {}
        self._waiting = 0  # threads in _wait; the ticker runs while there are any
        self._ticking = False
        self._queued = threading.Condition(self._lock)  # rollout appended to the queue
        self._finishes = threading.Condition(self._lock)  # a rollout finished (the feed)
        # Requests being answered (see once); a resend waits for its original on _answered.
        self._answering: set[tuple[str, int]] = set()
        self._answered = threading.Condition(self._lock)
        self._request = threading.local()  # the request id of this thread's call
        self._started = time.monotonic()

    @property
    def durable(self) -> bool:
        """True if changes are committed to a data directory (``data_dir`` was given)."""
        return self._journal is not None

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
        state.skew = now - self._monotonic()
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
            if state.freed_bytes > RELEASE_AFTER:
                state.freed_bytes = 0
                release_free_memory()
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
        now = self._clock()
        state.skew = now - self._monotonic()  # before restore: it keeps monotonic times
        state.restore(self._journal.recover(), now)
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

    def once(self, request: Any, method: Callable[..., T]) -> Callable[..., T]:
        """``method`` (a store method) as a call that runs at most once per request id
        ``(client id, sequence number)``: a call with an id already answered returns that
        answer without running again (mpstore.replies), one whose original is still running
        (a blocking call) waits for it first. Raises StoreUnavailable if the answer was
        forgotten (it may have been applied), InvalidArgument for a malformed id. For a
        server: the request id travels with the request (``api.REQUEST_KEY``)."""
        if not (isinstance(request, tuple) and len(request) == 2 and isinstance(request[0], str)
                and type(request[1]) is int):
            raise InvalidArgument(f"a request id is (client id, int), not {request!r}")
        key: tuple[str, int] = request

        def call(*args: Any, **kwargs: Any) -> T:
            with self._lock:
                while key in self._answering:
                    self._answered.wait()
                try:
                    found, result = self._state.replies.lookup(*key)
                except LookupError:
                    raise StoreUnavailable(
                        f"request {key[1]} of client {key[0]} was sent again after its reply was "
                        "forgotten (see mpstore.replies); it may have been applied") from None
                if found:
                    return result  # type: ignore[no-any-return]
                self._answering.add(key)
            self._request.id = key
            try:
                return method(*args, **kwargs)
            finally:
                self._request.id = None
                with self._lock:
                    self._answering.discard(key)
                    self._answered.notify_all()

        return call

    def _remembering(self, fn: Callable[[float], T]) -> Callable[[float], T]:
        def remembered(now: float) -> T:
            result = fn(now)
            self._remember(result, now)
            return result

        return remembered

    def _remember(self, result: Any, now: float) -> None:
        """Keep ``result`` as the answer to this thread's request, if it has an id (see
        :meth:`once`); call with the lock held, inside the section that made the change (a
        durable store commits the reply with it)."""
        request = getattr(self._request, "id", None)
        if request is not None:
            self._state.remember(request, result, now - self._state.skew)

    def _section(self, fn: Callable[[float], T], *, watchdog: bool = True,
                 write: bool = True) -> T:
        """Run ``fn(now)`` as one critical section; see :meth:`_step`. ``write=False``
        declares a read: it is served while writes are refused, and if a commit it waited
        for fails, it is answered again from what is on disk."""
        if write and getattr(self._request, "id", None) is not None:
            fn = self._remembering(fn)
        with self._lock:
            result, ticket = self._step(fn, watchdog, write)
        try:
            self._persisted(ticket)
        except StorageError:
            if write:
                raise
            return self._section(fn, watchdog=False, write=False)
        return result

    def _wake_watchers(self, finished: list[str]) -> None:
        self._finishes.notify_all()  # readers of the feed
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

    def _unwatch(self, ids: list[str], condition: threading.Condition) -> None:
        for rid in ids:
            conditions = self._watchers.get(rid)
            if conditions is not None:
                conditions.discard(condition)
                if not conditions:
                    del self._watchers[rid]

    def close(self) -> None:
        """Commit what is pending and release the data directory (durable stores; a no-op
        otherwise). Not part of the remote API: the server closes its store on shutdown."""
        if self._journal is not None:
            with self._lock:
                journal, self._journal = self._journal, None
            journal.close()
