"""Who is working on what, derived from the attempts (for ``statistics()`` and ``agl top``).

A runner is known by the ``worker_id`` it passes to ``dequeue_rollout`` / ``start_attempt``;
the store keeps no registry of runners, so the ones shown are those whose latest attempt of a
rollout is in flight (preparing or running), each with when it was last heard from: its
latest span (the heartbeat) or, before any, the attempt's start. A runner idle between
rollouts is not shown. Cost: O(rollouts in flight), which is about the number of runners.
"""

from __future__ import annotations

from typing import Any

from .state import StoreState
from .types import RolloutStatus

__all__ = ["RUNNERS_LISTED", "runners"]

#: Runners listed at most (the most recently heard from first); the counts cover all.
RUNNERS_LISTED = 100
_IN_FLIGHT = (RolloutStatus.PREPARING, RolloutStatus.RUNNING)


def runners(state: StoreState, limit: int = RUNNERS_LISTED) -> dict[str, Any]:
    """``{"attempts_in_flight": n, "runners_in_flight": distinct worker ids, "runners":
    [{worker_id (or None), rollout_id, attempt_id, attempt (its number), status,
    last_heard}, ...]}``, times on the store's clock. Call with the store's lock held."""
    rows = []
    for status in _IN_FLIGHT:
        for rid in state.by_status[status]:
            attempt = state.latest_attempt(rid)
            if attempt is None:
                continue
            heard = attempt.last_heartbeat_time
            rows.append({
                "worker_id": attempt.worker_id, "rollout_id": rid,
                "attempt_id": attempt.attempt_id, "attempt": attempt.sequence_id,
                "status": attempt.status.value,
                "last_heard": attempt.start_time if heard is None else heard,
            })
    # Most recently heard first; ties in creation order (not by_status' order, which a
    # restart rebuilds differently).
    rows.sort(key=lambda row: (-row["last_heard"], state.created[row["rollout_id"]]))
    return {"attempts_in_flight": len(rows),
            "runners_in_flight": len({row["worker_id"] for row in rows} - {None}),
            "runners": rows[:limit]}
