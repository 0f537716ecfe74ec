"""``MpstoreLightningStore``: agent-lightning's ``LightningStore`` API on an mpstore store.

Every method is a coroutine that runs the matching synchronous mpstore call in the running
loop's default executor (a thread), so it is safe from any thread and any event loop
(agent-lightning's span processor calls the store from a private loop in its own thread) and
never blocks a loop, not even ``wait_for_rollouts``. mpstore's stores are thread-safe: the
client opens one connection per thread.

It takes and returns agent-lightning's pydantic types with agent-lightning's defaults and the
result shapes of the installed release: on 0.3.0 ``PaginatedResult`` from the queries,
``AttemptedRollout`` from ``query_rollouts``/``get_rollout_by_id`` for rollouts that have an
attempt, ``None`` from ``add_span``/``add_otel_span`` for a duplicate span; on 0.2.2 plain
lists, ``Rollout`` and the stored span. Semantics are mpstore's (SPEC D1-D14), see README
"Using mpstore from agent-lightning".
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from agentlightning.store.base import UNSET, LightningStore

from ..errors import InvalidArgument
from ..manager.client import StoreClient
from ..types import Span as MpSpan
from . import convert as c

__all__ = ["MpstoreLightningStore"]

T = TypeVar("T")


class MpstoreLightningStore(LightningStore):  # type: ignore[misc]
    """agent-lightning's store, backed by ``store``: the client ``mpstore.connect()``
    returns (an ``agl store`` server; picklable, so runner processes reconnect by themselves)
    or an ``InMemoryStore`` (this process only)."""

    def __init__(self, store: Any) -> None:
        if not all(hasattr(store, name) for name in ("enqueue_rollout", "query_workers")):
            raise InvalidArgument(f"MpstoreLightningStore needs an mpstore store (connect() or "
                                  f"InMemoryStore()), not {type(store).__name__}")
        self.store = store

    def __reduce__(self) -> tuple[Any, ...]:
        # A child process (agent-lightning's runners) gets the address and key and opens its
        # own connections; an in-process store cannot be shared that way.
        if not isinstance(self.store, StoreClient):
            raise TypeError("an MpstoreLightningStore around an InMemoryStore lives in one "
                            "process; build it from mpstore.connect(...) to pass it to others")
        return (MpstoreLightningStore, (self.store,))

    def __repr__(self) -> str:
        return f"<MpstoreLightningStore on {self.store!r}>"

    @property
    def capabilities(self) -> Any:
        """Thread- and async-safe; ``zero_copy`` (picklable to other processes, which reach
        the same data) when built from ``connect()``; no OTLP/HTTP endpoint."""
        return {"thread_safe": True, "async_safe": True,
                "zero_copy": isinstance(self.store, StoreClient), "otlp_traces": False}

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    # ----------------------------------------------------------------- ops
    async def statistics(self) -> Any:
        stats = await self._run(self.store.statistics)
        stats["name"] = type(self).__name__
        return stats

    # ----------------------------------------------------------------- create and claim
    async def start_rollout(self, input: Any, mode: Any = None, resources_id: str | None = None,
                            config: Any = None, metadata: dict[str, Any] | None = None,
                            worker_id: str | None = None) -> Any:
        return c.rollout_out(await self._run(self.store.start_rollout, input, mode, resources_id,
                                             c.config_in(config), metadata, worker_id))

    async def enqueue_rollout(self, input: Any, mode: Any = None,
                              resources_id: str | None = None, config: Any = None,
                              metadata: dict[str, Any] | None = None) -> Any:
        return c.rollout_out(await self._run(self.store.enqueue_rollout, input, mode,
                                             resources_id, c.config_in(config), metadata))

    async def enqueue_many_rollouts(self, rollouts: Sequence[Any]) -> Any:
        requests = [c.enqueue_request_in(r) for r in rollouts]
        return [c.rollout_out(r) for r in
                await self._run(self.store.enqueue_many_rollouts, requests)]

    async def dequeue_rollout(self, worker_id: str | None = None) -> Any:
        return c.rollout_out(await self._run(self.store.dequeue_rollout, worker_id))

    async def dequeue_many_rollouts(self, *, limit: int = 1, worker_id: str | None = None
                                    ) -> Any:
        if isinstance(limit, int) and not isinstance(limit, bool) and limit < 0:
            limit = 0  # agent-lightning: non-positive limits return an empty list
        return [c.rollout_out(r) for r in
                await self._run(self.store.dequeue_many_rollouts, limit, worker_id)]

    async def start_attempt(self, rollout_id: str, worker_id: str | None = None) -> Any:
        return c.rollout_out(await self._run(self.store.start_attempt, rollout_id, worker_id))

    # ----------------------------------------------------------------- read
    async def query_rollouts(self, *, status_in: Any = None, rollout_id_in: Any = None,
                             rollout_id_contains: str | None = None, filter_logic: str = "and",
                             sort_by: str | None = None, sort_order: str = "asc",
                             limit: int = -1, offset: int = 0, status: Any = None,
                             rollout_ids: Any = None) -> Any:
        page = await self._run(
            self.store.query_rollouts, status_in=status_in, rollout_id_in=rollout_id_in,
            rollout_id_contains=rollout_id_contains, filter_logic=filter_logic,
            sort_by=sort_by, sort_order=sort_order, limit=limit, offset=offset, status=status,
            rollout_ids=rollout_ids, with_latest_attempt=c.PAGES)
        return c.page_out(page, c.rollout_out)

    async def get_rollout_by_id(self, rollout_id: str) -> Any:
        if not c.PAGES:
            return c.rollout_out(await self._run(self.store.get_rollout_by_id, rollout_id))
        found = await self._run(self.store.query_rollouts, rollout_id_in=[rollout_id],
                                with_latest_attempt=True)
        return c.rollout_out(found[0]) if found else None

    async def query_attempts(self, rollout_id: str, *, sort_by: str | None = "sequence_id",
                             sort_order: str = "asc", limit: int = -1, offset: int = 0) -> Any:
        page = await self._run(self.store.query_attempts, rollout_id, sort_by=sort_by,
                               sort_order=sort_order, limit=limit, offset=offset)
        return c.page_out(page, c.attempt_out)

    async def get_latest_attempt(self, rollout_id: str) -> Any:
        return c.attempt_out(await self._run(self.store.get_latest_attempt, rollout_id))

    async def wait_for_rollouts(self, *, rollout_ids: list[str], timeout: float | None = None
                                ) -> list[Any]:
        done = await self._run(self.store.wait_for_rollouts, rollout_ids=list(rollout_ids),
                               timeout=timeout)
        return [c.rollout_out(r) for r in done]

    # ----------------------------------------------------------------- update
    async def update_rollout(self, rollout_id: str, input: Any = UNSET, mode: Any = UNSET,
                             resources_id: Any = UNSET, status: Any = UNSET, config: Any = UNSET,
                             metadata: Any = UNSET) -> Any:
        u = c.unset_in
        return c.rollout_out(await self._run(
            self.store.update_rollout, rollout_id, u(input), u(mode), u(resources_id),
            u(status), c.config_in(u(config)), u(metadata)))

    async def update_attempt(self, rollout_id: str, attempt_id: str, status: Any = UNSET,
                             worker_id: Any = UNSET, last_heartbeat_time: Any = UNSET,
                             metadata: Any = UNSET) -> Any:
        u = c.unset_in
        return c.attempt_out(await self._run(
            self.store.update_attempt, rollout_id, attempt_id, u(status), u(worker_id),
            u(last_heartbeat_time), u(metadata)))

    # ----------------------------------------------------------------- spans
    async def get_next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        return await self._run(self.store.get_next_span_sequence_id, rollout_id, attempt_id)

    async def get_many_span_sequence_ids(self, rollout_attempt_ids: Sequence[tuple[str, str]]
                                         ) -> Any:
        return await self._run(self.store.get_many_span_sequence_ids,
                               [tuple(pair) for pair in rollout_attempt_ids])

    async def add_span(self, span: Any) -> Any:
        given = c.span_in(span)
        stored = await self._run(self.store.add_span, given)
        if c.PAGES and stored is not given:
            return None  # 0.3.0: None for a duplicate (mpstore hands back the stored one)
        return span if stored is given and not isinstance(span, MpSpan) else c.span_out(stored)

    async def add_many_spans(self, spans: Sequence[Any]) -> Any:
        given = [c.span_in(s) for s in spans]
        stored = await self._run(self.store.add_many_spans, given)
        # 0.3.0 returns the spans that were added (duplicates left out).
        return [span if kept is new and not isinstance(span, MpSpan) else c.span_out(kept)
                for span, new, kept in zip(spans, given, stored, strict=True)
                if kept is new or not c.PAGES]

    async def add_otel_span(self, rollout_id: str, attempt_id: str, readable_span: Any,
                            sequence_id: int | None = None) -> Any:
        stored = await self._run(self.store.add_otel_span, rollout_id, attempt_id,
                                 readable_span, sequence_id)
        if stored is None and not c.PAGES:  # 0.2.2 returns the span: the one already stored
            found = await self._run(self.store.query_spans, rollout_id, attempt_id)
            span_id = format(readable_span.get_span_context().span_id, "016x")
            stored = next((s for s in found if s.span_id == span_id), None)
        return c.span_out(stored)

    async def query_spans(self, rollout_id: str, attempt_id: str | None = None, *,
                          trace_id: str | None = None, trace_id_contains: str | None = None,
                          span_id: str | None = None, span_id_contains: str | None = None,
                          parent_id: str | None = None, parent_id_contains: str | None = None,
                          name: str | None = None, name_contains: str | None = None,
                          filter_logic: str = "and", limit: int = -1, offset: int = 0,
                          sort_by: str | None = "sequence_id", sort_order: str = "asc") -> Any:
        page = await self._run(
            self.store.query_spans, rollout_id, attempt_id, trace_id=trace_id,
            trace_id_contains=trace_id_contains, span_id=span_id,
            span_id_contains=span_id_contains, parent_id=parent_id,
            parent_id_contains=parent_id_contains, name=name, name_contains=name_contains,
            filter_logic=filter_logic, limit=limit, offset=offset, sort_by=sort_by,
            sort_order=sort_order)
        return c.page_out(page, c.span_out)

    # ----------------------------------------------------------------- resources
    async def add_resources(self, resources: Any) -> Any:
        return c.resources_out(await self._run(self.store.add_resources,
                                               c.resources_in(resources)))

    async def update_resources(self, resources_id: str, resources: Any) -> Any:
        return c.resources_out(await self._run(self.store.update_resources, resources_id,
                                               c.resources_in(resources)))

    async def get_resources_by_id(self, resources_id: str) -> Any:
        return c.resources_out(await self._run(self.store.get_resources_by_id, resources_id))

    async def get_latest_resources(self) -> Any:
        return c.resources_out(await self._run(self.store.get_latest_resources))

    async def query_resources(self, *, resources_id: str | None = None,
                              resources_id_contains: str | None = None,
                              sort_by: str | None = None, sort_order: str = "asc",
                              limit: int = -1, offset: int = 0) -> Any:
        page = await self._run(self.store.query_resources, resources_id=resources_id,
                               resources_id_contains=resources_id_contains, sort_by=sort_by,
                               sort_order=sort_order, limit=limit, offset=offset)
        return c.page_out(page, c.resources_out)

    # ----------------------------------------------------------------- workers
    async def query_workers(self, *, status_in: Any = None,
                            worker_id_contains: str | None = None, filter_logic: str = "and",
                            sort_by: str | None = None, sort_order: str = "asc",
                            limit: int = -1, offset: int = 0) -> Any:
        page = await self._run(self.store.query_workers, status_in=status_in,
                               worker_id_contains=worker_id_contains, filter_logic=filter_logic,
                               sort_by=sort_by, sort_order=sort_order, limit=limit,
                               offset=offset)
        return c.page_out(page, c.worker_out)

    async def get_worker_by_id(self, worker_id: str) -> Any:
        return c.worker_out(await self._run(self.store.get_worker_by_id, worker_id))

    async def update_worker(self, worker_id: str, heartbeat_stats: Any = UNSET) -> Any:
        return c.worker_out(await self._run(self.store.update_worker, worker_id,
                                            c.unset_in(heartbeat_stats)))
