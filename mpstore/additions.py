"""The store methods agent-lightning 0.3.0 added (issue 11), as a base of ``InMemoryStore``:
OpenTelemetry spans, ``query_resources`` and the workers. Each is one critical section
(``_section``) like every store method; the filtering and paging are in :mod:`mpstore.query`,
the worker rules in :mod:`mpstore.workers`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from . import otel
from . import query as q
from . import validate as v
from . import workers as wk
from .types import UNSET, Page, Span, Worker

if TYPE_CHECKING:
    from .state import StoreState

__all__ = ["Additions"]

T = TypeVar("T")
NOT_GIVEN: Any = UNSET


class Additions:
    """Methods of :class:`~mpstore.store.InMemoryStore` (which provides the attributes
    declared here)."""

    if TYPE_CHECKING:
        _state: StoreState
        _out: Callable[[Any], Any]
        _inp: Callable[[Any], Any]

        def _section(self, fn: Callable[[float], T], *, watchdog: bool = True,
                     write: bool = True) -> T: ...

        def _maybe(self, record: Any) -> Any: ...

    # ----------------------------------------------------------------- spans
    def add_otel_span(self, rollout_id: str, attempt_id: str, readable_span: Any,
                      sequence_id: int | None = None) -> Span | None:
        """Store an OpenTelemetry ``ReadableSpan`` (converted by :func:`mpstore.otel.to_span`;
        the client converts before sending) as ``add_span`` does. Without ``sequence_id`` it
        takes the next number of the rollout's counter, in the same critical section.
        Returns the stored span, or None when a span with the same span_id was already stored
        for the attempt (agent-lightning's shape; nothing happens then, D7)."""
        kept = self._inp(otel.checked_span(rollout_id, attempt_id, readable_span, sequence_id))
        state = self._state

        def run(now: float) -> Span | None:
            attempt = state.check_span(kept)
            index = state.span_index.get(rollout_id)
            if index is not None and (attempt_id, kept.span_id) in index:
                return None
            if sequence_id is None:
                kept.sequence_id = state.next_sequence_id(rollout_id)
            state.add_span(kept, attempt, now)
            return self._out(kept)

        return self._section(run, watchdog=False)

    # ----------------------------------------------------------------- resources
    def query_resources(self, *, resources_id: str | None = None,
                        resources_id_contains: str | None = None, sort_by: str | None = None,
                        sort_order: str = "asc", limit: int = -1, offset: int = 0) -> Page:
        """A page of the stored resources, in the order they were first added unless
        sorted; ``resources_id`` and ``resources_id_contains`` combine with AND."""
        predicates = q.field_predicates("resources_id", v.optional_str(
            resources_id, "resources_id"), resources_id_contains)
        paging = q.check_paging(sort_by, sort_order, limit, offset, q.RESOURCES_SORT_FIELDS)
        predicate = q.combine(predicates, "and")
        state = self._state

        def run(now: float) -> Page:
            found = q.page(state.resources.values(), paging, predicate,
                           None if predicate else len(state.resources))
            found[:] = [self._out(r) for r in found]
            return found

        return self._section(run, write=False)

    # ----------------------------------------------------------------- workers
    def query_workers(self, *, status_in: Sequence[str] | None = None,
                      worker_id_contains: str | None = None, filter_logic: str = "and",
                      sort_by: str | None = None, sort_order: str = "asc", limit: int = -1,
                      offset: int = 0) -> Page:
        """A page of the workers (see :mod:`mpstore.workers`), in the order they first
        appeared unless sorted."""
        predicate, paging = q.worker_filters(status_in, worker_id_contains, filter_logic,
                                             sort_by, sort_order, limit, offset)
        workers = self._state.workers

        def run(now: float) -> Page:
            found = q.page(workers.values(), paging, predicate,
                           None if predicate else len(workers))
            found[:] = [self._out(w) for w in found]
            return found

        return self._section(run, write=False)

    def get_worker_by_id(self, worker_id: str) -> Worker | None:
        v.identifier(worker_id, "worker_id")
        return self._section(lambda now: self._maybe(self._state.workers.get(worker_id)),
                             write=False)

    def update_worker(self, worker_id: str, heartbeat_stats: Any = NOT_GIVEN) -> Worker:
        """A worker's heartbeat: stamps ``last_heartbeat_time`` and, when given, replaces its
        ``heartbeat_stats`` (a dict); creates the worker if it is new. Its status is derived
        from its claims and attempts, never set here."""
        v.identifier(worker_id, "worker_id")
        given = v.is_set(heartbeat_stats)
        stats = self._inp(v.metadata(heartbeat_stats, "heartbeat_stats")) if given else None
        return self._section(lambda now: self._out(
            wk.heartbeat(self._state.workers, worker_id, stats, given, now)))

