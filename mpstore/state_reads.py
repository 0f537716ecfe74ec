"""The store state's reads: rollout queries, a rollout's spans, the feed's pages and the
statistics. A mixin of :class:`~mpstore.state.StoreState`, which holds the records and
indexes these methods read; nothing here writes, and each read costs what its answer holds
(the indexes are the state's: ``by_status``, ``created``, the feed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import transitions as tr
from .errors import SpansEvicted
from .types import Attempt, AttemptStatus, Rollout, RolloutStatus, Span

if TYPE_CHECKING:
    from collections import OrderedDict

    from .eviction import Thresholds
    from .feed import FinishLog
    from .replies import ReplyMemory
    from .types import ResourcesUpdate, Worker

__all__ = ["StateReads"]


class StateReads:
    """The read methods of :class:`~mpstore.state.StoreState` (see the module docstring)."""

    if TYPE_CHECKING:  # what StoreState holds
        thresholds: Thresholds
        rollouts: dict[str, Rollout]
        created: dict[str, int]
        by_status: dict[RolloutStatus, dict[str, None]]
        queue: OrderedDict[str, int]
        spans: dict[str, list[Span]]
        evicted: set[str]
        resources: dict[str, ResourcesUpdate]
        workers: dict[str, Worker]
        finishes: FinishLog
        replies: ReplyMemory
        total_attempts: int
        total_spans: int
        total_span_bytes: int
        terminal_writes: int
        retried_attempts: int
        spans_evicted: int
        attempts_became: dict[AttemptStatus, int]

        def latest_attempt(self, rollout_id: str) -> Attempt | None: ...

    def query_spans(self, rollout_id: str, attempt_id: str | None) -> list[Span]:
        if rollout_id in self.evicted:
            raise SpansEvicted(rollout_id)
        spans = self.spans.get(rollout_id, [])
        if attempt_id is None:
            return list(spans)
        if attempt_id == "latest":
            latest = self.latest_attempt(rollout_id)
            if latest is None:
                return []
            attempt_id = latest.attempt_id
        return [s for s in spans if s.attempt_id == attempt_id]

    def finished_page(self, after: int, limit: int) -> tuple[list[Rollout], int]:
        """Rollouts finished after feed number ``after`` (and still finished), in the order
        they finished, at most ``limit``; and the cursor for the next page."""
        rollouts = self.rollouts
        ids, cursor = self.finishes.page(
            after, limit, lambda rid: rollouts[rid].status in tr.TERMINAL)
        return [rollouts[rid] for rid in ids], cursor

    def finished_total(self) -> int:
        return sum(len(self.by_status[s]) for s in tr.TERMINAL)

    def query_rollouts(
        self, statuses: list[RolloutStatus] | None, rollout_ids: list[str] | None
    ) -> list[Rollout]:
        if statuses is None and rollout_ids is None:
            return list(self.rollouts.values())
        if rollout_ids is not None:
            wanted = set(statuses) if statuses is not None else None
            found = {rid for rid in rollout_ids if rid in self.rollouts}
            ids = [r for r in found if wanted is None or self.rollouts[r].status in wanted]
        else:
            ids = [rid for s in set(statuses or ()) for rid in self.by_status[s]]
        ids.sort(key=self.created.__getitem__)
        return [self.rollouts[rid] for rid in ids]

    def statistics(self) -> dict[str, Any]:
        return {
            "total_rollouts": len(self.rollouts),
            "total_attempts": self.total_attempts,
            "total_spans": self.total_spans,
            "total_resources": len(self.resources),
            "queue_length": len(self.queue),
            "span_bytes": self.total_span_bytes,
            "total_span_bytes": self.total_span_bytes,
            "total_workers": len(self.workers),
            "rollouts_by_status": {s.value: len(ids) for s, ids in self.by_status.items()},
            "evicted_rollouts": len(self.evicted),
            # Counted since this process started (the rest: what the store holds).
            "since_start": {
                "rollouts_finished": self.terminal_writes,
                "attempts_retried": self.retried_attempts,
                "attempts_timed_out": self.attempts_became[AttemptStatus.TIMEOUT],
                "attempts_unresponsive": self.attempts_became[AttemptStatus.UNRESPONSIVE],
                "spans_evicted": self.spans_evicted,
            },
            "eviction_threshold_bytes": self.thresholds.eviction,
            "safe_threshold_bytes": self.thresholds.safe,
            "memory_capacity_bytes": self.thresholds.capacity,
            "remembered_replies": self.replies.count,
            "reply_clients": self.replies.clients,
        }

