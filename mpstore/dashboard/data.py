"""Everything the dashboard reads from the store, in one place.

Pages never call the store directly: they ask a :class:`Source`, which owns the client,
turns every way of not reaching the store into :class:`StoreDown` (with a reason a person can
act on), and shapes the answers into what a page shows. All of it is reads: the dashboard
never changes the store.

Which store calls a page costs (what the store does for one page):

* overview: ``statistics()`` (O(1) counts); the chart's history comes from the
  :class:`~mpstore.dashboard.history.History` sampler, one ``statistics()`` every 2 s;
* a rollout: ``get_rollout_by_id`` + ``query_attempts`` (that rollout's attempts);
* a trace: ``query_spans(rollout_id, attempt_id)`` (that attempt's spans only); a span's
  attributes, opened on demand: the same;
* resources: ``get_latest_resources`` + ``get_resources_by_id`` per id listed;
* rollouts and runners: see :meth:`Source.rollouts` and :meth:`Source.runners`: until the
  store has paged queries and workers, they read every rollout of the statuses asked for.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import AuthenticationFailed, InvalidArgument, MpstoreError, StoreUnavailable
from ..manager.client import StoreClient, connect, parse_address
from ..types import Attempt, ResourcesUpdate, Rollout, RolloutStatus, Span

__all__ = ["ROLLOUT_STATUSES", "Page", "Runner", "Source", "StoreDown"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Every rollout status, in the order pages list them.
ROLLOUT_STATUSES: tuple[str, ...] = tuple(s.value for s in RolloutStatus)

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
    status: str  # "busy" (holds a live attempt) or "idle" (seen before, holds none now)
    last_heard: float | None
    rollout_id: str | None = None
    attempt_id: str | None = None
    attempt_status: str | None = None


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
        except InvalidArgument:
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
        """One page of rollouts, by start time, filtered by status (any of) and id substring.

        Temporary cost, until the store has paged queries (issue 11): this reads every
        rollout of the chosen statuses (all of them without a status filter) and keeps one
        page, so it costs the store a copy of those rollouts, O(stored rollouts)."""
        status = list(statuses) or None
        everything = self.call(lambda c: c.query_rollouts(status=status))
        if contains:
            everything = [r for r in everything if contains in r.rollout_id]
        everything.sort(key=lambda r: r.start_time, reverse=newest_first)
        return Page(everything[offset:offset + limit], len(everything), offset, limit)

    def rollout(self, rollout_id: str) -> tuple[Rollout | None, list[Attempt]]:
        """The rollout (None if unknown) and its attempts by sequence."""
        def read(c: StoreClient) -> tuple[Rollout | None, list[Attempt]]:
            rollout = c.get_rollout_by_id(rollout_id)
            return rollout, (c.query_attempts(rollout_id) if rollout is not None else [])
        return self.call(read)

    def spans(self, rollout_id: str, attempt_id: str) -> list[Span]:
        """The attempt's spans by sequence_id (``attempt_id="latest"`` allowed)."""
        return self.call(lambda c: c.query_spans(rollout_id, attempt_id))

    def span(self, rollout_id: str, attempt_id: str, span_id: str) -> Span | None:
        """One span of the attempt by span_id, None if it has none such.

        Temporary cost, until query_spans filters by span_id (issue 11): the attempt's spans
        are read and one is kept (bounded by that attempt, not by the store)."""
        return next((s for s in self.spans(rollout_id, attempt_id) if s.span_id == span_id),
                    None)

    def resources(self, extra_ids: Sequence[str] = ()) -> tuple[str | None,
                                                                  list[ResourcesUpdate]]:
        """The latest resources' id and the resources to list: the latest and ``extra_ids``.

        Until the store can list resources (``query_resources``, issue 11) the dashboard can
        show only the ones it knows the ids of: the latest, and those the caller names."""
        def read(c: StoreClient) -> tuple[str | None, list[ResourcesUpdate]]:
            latest = c.get_latest_resources()
            found = [latest] if latest is not None else []
            for rid in dict.fromkeys(extra_ids):
                if latest is not None and rid == latest.resources_id:
                    continue
                update = c.get_resources_by_id(rid)
                if update is not None:
                    found.append(update)
            return (latest.resources_id if latest is not None else None), found
        return self.call(read)

    def runners(self, active_limit: int = 500) -> list[Runner]:
        """The workers seen so far, busy ones first.

        Derived until the store has workers (``query_workers``, issue 11): the latest attempt
        of every preparing or running rollout (at most ``active_limit`` of them, newest first)
        names a busy worker; a worker the dashboard saw before and that holds no live attempt
        now is listed as idle, last heard from at its last heartbeat. A dashboard started
        later does not know the workers that went idle before it started."""
        def read(c: StoreClient) -> list[tuple[Rollout, Attempt | None]]:
            active = c.query_rollouts(status=list(_ACTIVE))[-active_limit:]
            return [(r, c.get_latest_attempt(r.rollout_id)) for r in active]
        pairs = self.call(read)
        current: dict[str, tuple[float, Rollout, Attempt]] = {}
        for rollout, attempt in pairs:
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
            return sorted(self._runners.values(),
                          key=lambda r: (r.status != "busy", -(r.last_heard or 0), r.worker_id))
