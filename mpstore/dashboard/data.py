"""Everything the dashboard reads from the store, in one place.

Pages never call the store directly: they ask a :class:`Source`, which owns the client,
turns every way of not reaching the store into :class:`StoreDown` (with a reason a person can
act on), and shapes the answers into what a page shows. All of it is reads: the dashboard
never changes the store.

Which store calls a page costs (what the store does for one page):

* overview: ``statistics()`` (O(1) counts); the chart's history comes from the
  :class:`~mpstore.dashboard.history.History` sampler, one ``statistics()`` every 2 s;
* a rollout: ``get_rollout_by_id`` + ``query_attempts`` (that rollout's attempts);
* a trace: ``query_spans(rollout_id, attempt_id)``, that attempt's spans only (at most
  MAX_SPANS); a span's attributes, opened on demand: that one span;
* rollouts: one page of ``query_rollouts`` (about a page of work in the store, whatever
  it holds), plus one count for a newest-first page;
* resources: a page of ``query_resources`` + ``get_latest_resources``;
* runners: a page of ``query_workers``.

A store without paged queries and workers (mpstore before they were added; they need the same
version on both sides anyway) is still shown: then the rollouts page reads every rollout of
the chosen statuses and keeps one page, and runners are derived from the attempts of the
preparing and running rollouts (see :meth:`Source.runners`).
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import (
    AuthenticationFailed,
    InvalidArgument,
    MpstoreError,
    StoreError,
    StoreUnavailable,
)
from ..manager.client import StoreClient, connect, parse_address
from ..types import Attempt, ResourcesUpdate, Rollout, RolloutStatus, Span

__all__ = ["MAX_SPANS", "ROLLOUT_STATUSES", "Page", "Runner", "Source", "StoreDown"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Every rollout status, in the order pages list them.
ROLLOUT_STATUSES: tuple[str, ...] = tuple(s.value for s in RolloutStatus)

#: The most spans one trace page shows (the first, by sequence_id).
MAX_SPANS = 5000

#: What a host name or IP address may be made of.
_HOST = re.compile(r"[A-Za-z0-9._:%-]+")

#: Rollout statuses in which a rollout has a live attempt (its runner is busy with it).
_ACTIVE = ("preparing", "running")


class StoreDown(Exception):
    """The store cannot be read now; ``str()`` says why (no answer, wrong key, ...)."""


@dataclass
class Page:
    """One page of rollouts: the rows, how many match in all, where the page starts."""

    items: list[Rollout]
    total: int
    offset: int
    limit: int


@dataclass
class Runner:
    """A worker as the dashboard knows it: derived from the attempts it has seen."""

    worker_id: str
    status: str  # busy (holds a live attempt), idle, or unknown (its attempt timed out ...)
    last_heard: float | None
    rollout_id: str | None = None
    attempt_id: str | None = None
    attempt_status: str | None = None
    heartbeat_stats: dict[str, Any] | None = None


def _takes(client: Any, method: str, parameter: str) -> bool:
    """Whether this mpstore's ``client.method`` has ``parameter`` (client and server run the
    same version, so the client's signature is the server's)."""
    try:
        return parameter in inspect.signature(getattr(client, method)).parameters
    except (AttributeError, TypeError, ValueError):
        return False


class Source:
    """The dashboard's view of one store, reached with ``connect()`` like any client.

    Thread-safe: pages are served from a thread pool and the client opens one connection per
    thread. The connection is opened on first use and dropped on any failure, so a store
    that comes back (or a key file that appears) is picked up by the next read."""

    def __init__(self, address: str, authkey: bytes | str | None = None,
                 authkey_file: str | None = None, timeout: float = 5.0) -> None:
        """Raises InvalidArgument for a malformed ``address`` (a usage error)."""
        host, port = parse_address(address)
        if not _HOST.fullmatch(host):
            raise InvalidArgument(f"{address!r} is not HOST:PORT (e.g. 127.0.0.1:4747)")
        self.address = f"{host}:{port}"
        self._authkey, self._authkey_file, self._timeout = authkey, authkey_file, timeout
        self._client: StoreClient | None = None
        self._lock = threading.Lock()
        self._runners: dict[str, Runner] = {}
        #: Why the last read failed; None while the store answers.
        self.error: str | None = None

    # ------------------------------------------------------------ connection
    def _connected(self) -> StoreClient:
        with self._lock:
            if self._client is None:
                self._client = connect(self.address, self._authkey, timeout=self._timeout,
                                       retry_for=0, authkey_file=self._authkey_file)
            return self._client

    def _drop(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def call(self, read: Callable[[StoreClient], T]) -> T:
        """``read(client)``; any failure to reach or authenticate becomes StoreDown. The log
        says when the store goes away (and why) and when it answers again, once each."""
        try:
            result = read(self._connected())
        except AuthenticationFailed as exc:
            raise self._down(f"the store at {self.address} refused the key: {exc}") from exc
        except (StoreUnavailable, OSError, EOFError) as exc:
            raise self._down(f"no answer from the store at {self.address}: {exc}") from exc
        except StoreError:  # the store answered: bad id, spans evicted, disk full ...
            raise
        except MpstoreError as exc:
            raise self._down(f"the store at {self.address} failed: {exc}") from exc
        if self.error is not None:
            self.error = None
            logger.info("Store at %s answers again", self.address)
        return result

    def _down(self, reason: str) -> StoreDown:
        self._drop()
        if reason != self.error:
            logger.warning("Store unavailable: %s", reason)
        self.error = reason
        return StoreDown(reason)

    def close(self) -> None:
        self._drop()

    # ------------------------------------------------------------ reads
    def statistics(self) -> dict[str, Any]:
        return self.call(lambda c: dict(c.statistics()))

    def rollouts(self, *, statuses: Sequence[str] = (), contains: str = "",
                 newest_first: bool = True, limit: int = 50, offset: int = 0) -> Page:
        """One page of rollouts in creation (start time) order, newest or oldest first,
        filtered by status (any of) and id substring."""
        status, part = list(statuses) or None, contains or None

        def paged(c: StoreClient) -> Page:
            if not newest_first:
                found = c.query_rollouts(status_in=status, rollout_id_contains=part,
                                         limit=limit, offset=offset)
                return Page(list(found), found.total, offset, limit)
            # Newest first is the oldest-first page seen from the other end: the store reads
            # about a page either way, where sort_order="desc" reverses every match first.
            total = c.query_rollouts(status_in=status, rollout_id_contains=part,
                                     limit=0).total
            end = max(total - offset, 0)
            start = max(end - limit, 0)
            found = c.query_rollouts(status_in=status, rollout_id_contains=part,
                                     limit=end - start, offset=start)
            return Page(list(reversed(found)), found.total, offset, limit)

        def unpaged(c: StoreClient) -> Page:
            # mpstore without paged queries: every rollout of those statuses, O(stored).
            everything = c.query_rollouts(status=status)
            if contains:
                everything = [r for r in everything if contains in r.rollout_id]
            everything.sort(key=lambda r: r.start_time, reverse=newest_first)
            return Page(everything[offset:offset + limit], len(everything), offset, limit)

        return self.call(lambda c: (paged if _takes(c, "query_rollouts", "limit")
                                    else unpaged)(c))

    def rollout(self, rollout_id: str) -> tuple[Rollout | None, list[Attempt]]:
        """The rollout (None if unknown) and its attempts by sequence."""
        def read(c: StoreClient) -> tuple[Rollout | None, list[Attempt]]:
            rollout = c.get_rollout_by_id(rollout_id)
            return rollout, (c.query_attempts(rollout_id) if rollout is not None else [])
        return self.call(read)

    def spans(self, rollout_id: str, attempt_id: str) -> tuple[list[Span], int]:
        """The attempt's first MAX_SPANS spans by sequence_id and how many it has in all
        (``attempt_id="latest"`` allowed)."""
        def read(c: StoreClient) -> tuple[list[Span], int]:
            if _takes(c, "query_spans", "limit"):
                found = c.query_spans(rollout_id, attempt_id, limit=MAX_SPANS)
                return list(found), found.total
            found = c.query_spans(rollout_id, attempt_id)
            return list(found[:MAX_SPANS]), len(found)
        return self.call(read)

    def span(self, rollout_id: str, attempt_id: str, span_id: str) -> Span | None:
        """One span of the attempt by span_id, None if it has none such (without span_id
        filters in the store: the attempt's spans are read and one is kept)."""
        def read(c: StoreClient) -> Span | None:
            if _takes(c, "query_spans", "span_id"):
                found = c.query_spans(rollout_id, attempt_id, span_id=span_id, limit=1)
            else:
                found = [s for s in c.query_spans(rollout_id, attempt_id)
                         if s.span_id == span_id]
            return found[0] if found else None
        return self.call(read)

    def resources(self, extra_ids: Sequence[str] = (), limit: int = 50
                  ) -> tuple[str | None, list[ResourcesUpdate], int]:
        """The latest resources' id, the resources to list (the latest first, then the most
        recently updated up to ``limit``, and ``extra_ids``), and how many are stored. Without
        ``query_resources`` in the store only the latest and ``extra_ids`` are known."""
        def read(c: StoreClient) -> tuple[str | None, list[ResourcesUpdate], int]:
            latest = c.get_latest_resources()
            found = {latest.resources_id: latest} if latest is not None else {}
            total = len(found)
            if hasattr(c, "query_resources"):
                recent = c.query_resources(sort_by="update_time", sort_order="desc",
                                           limit=limit)
                found.update((r.resources_id, r) for r in recent if r.resources_id not in found)
                total = recent.total
            for rid in dict.fromkeys(extra_ids):
                if rid not in found and (update := c.get_resources_by_id(rid)) is not None:
                    found[rid] = update
            return (latest.resources_id if latest is not None else None), list(found.values()), \
                total
        return self.call(read)

    def runners(self, limit: int = 500) -> tuple[list[Runner], int]:
        """Up to ``limit`` workers, busy ones first, then by when they were last heard from;
        and how many the store knows."""
        def read(c: StoreClient) -> tuple[list[Runner], int]:
            if not hasattr(c, "query_workers"):
                runners = self._derived_runners(c, limit)
                return runners, len(runners)
            found = c.query_workers(sort_by="last_heartbeat_time", sort_order="desc",
                                    limit=limit)
            return [_runner(w) for w in found], found.total
        runners, total = self.call(read)
        runners.sort(key=lambda r: (r.status != "busy", -(r.last_heard or 0), r.worker_id))
        return runners, total

    def _derived_runners(self, c: StoreClient, active_limit: int) -> list[Runner]:
        """For a store without workers: the latest attempt of every preparing or running
        rollout (at most ``active_limit``, newest first) names a busy worker; a worker this
        dashboard saw before and that holds no live attempt now is idle, last heard from at
        its last heartbeat. Workers that went idle before the dashboard started are unknown."""
        active = c.query_rollouts(status=list(_ACTIVE))[-active_limit:]
        current: dict[str, tuple[float, Rollout, Attempt]] = {}
        for rollout in active:
            attempt = c.get_latest_attempt(rollout.rollout_id)
            if attempt is None or attempt.worker_id is None:
                continue
            heard = attempt.last_heartbeat_time or attempt.start_time
            if attempt.worker_id not in current or heard >= current[attempt.worker_id][0]:
                current[attempt.worker_id] = (heard, rollout, attempt)
        with self._lock:
            for runner in self._runners.values():
                runner.status, runner.rollout_id, runner.attempt_id = "idle", None, None
                runner.attempt_status = None
            for worker_id, (heard, rollout, attempt) in current.items():
                runner = self._runners.setdefault(worker_id, Runner(worker_id, "idle", None))
                runner.status, runner.last_heard = "busy", heard
                runner.rollout_id, runner.attempt_id = rollout.rollout_id, attempt.attempt_id
                runner.attempt_status = str(attempt.status)
            return list(self._runners.values())


def _runner(worker: Any) -> Runner:
    """A store's Worker as a Runner: last heard from at its latest time of any kind."""
    times = [t for t in (worker.last_heartbeat_time, worker.last_dequeue_time,
                         worker.last_busy_time, worker.last_idle_time) if t is not None]
    return Runner(worker.worker_id, str(worker.status), max(times, default=None),
                  worker.current_rollout_id, worker.current_attempt_id, None,
                  worker.heartbeat_stats)
