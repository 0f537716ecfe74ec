"""The feed of finished rollouts: every finish gets the next number, and a reader pages
through them with a cursor (``finished_rollouts(after=...)``).

A rollout that finishes again (reopened, then finished) gets a new number: its old entry goes
stale and the reader meets it again at the new place, so nothing is missed, whatever order
rollouts finish in. Stale entries are skipped while paging and dropped in bulk once they
outnumber the live ones, so a page costs O(its size + stale entries in its range), never
O(rollouts stored). Numbers are never reused, across restarts too (they are stored with the
rollout), so a reader's cursor stays valid.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

__all__ = ["FinishLog"]

#: Stale entries are compacted away once there are more of them than this and than live ones.
_COMPACT_AT = 1024


class FinishLog:
    """Finish numbers in increasing order, with the rollout each belongs to. Not thread-safe
    (the store's lock protects it)."""

    def __init__(self) -> None:
        self._numbers: list[int] = []
        self._ids: list[str] = []
        self.number: dict[str, int] = {}  # rollout id -> its latest finish number
        self._next = 1
        self._stale = 0

    def add(self, rollout_id: str) -> int:
        """Record a finish of ``rollout_id``; returns its number."""
        if rollout_id in self.number:
            self._stale += 1
        number = self._next
        self._next += 1
        self.number[rollout_id] = number
        self._numbers.append(number)
        self._ids.append(rollout_id)
        self._maybe_compact()
        return number

    def discard(self, rollout_id: str) -> None:
        """Forget a rollout (deleted): its entry goes stale."""
        if self.number.pop(rollout_id, None) is not None:
            self._stale += 1
            self._maybe_compact()

    def page(self, after: int, limit: int, live: Callable[[str], bool]) -> tuple[list[str], int]:
        """Up to ``limit`` rollout ids finished after number ``after`` whose entry is their
        latest and for which ``live(id)`` holds, in finish order; and the cursor for the next
        page (the last number looked at, so stale entries are not looked at again)."""
        found: list[str] = []
        cursor = after
        index = bisect.bisect_right(self._numbers, after)
        numbers, ids, current = self._numbers, self._ids, self.number
        while index < len(numbers) and len(found) < limit:
            number, rid = numbers[index], ids[index]
            index += 1
            cursor = number
            if current.get(rid) == number and live(rid):
                found.append(rid)
        return found, cursor

    def restore(self, numbers: Iterable[tuple[int, str]]) -> None:
        """Rebuild from stored (number, rollout id) pairs, in any order."""
        for number, rid in sorted(numbers):
            self.number[rid] = number
            self._numbers.append(number)
            self._ids.append(rid)
        self._next = max(self._numbers, default=0) + 1

    def _maybe_compact(self) -> None:
        if self._stale <= _COMPACT_AT or self._stale <= len(self.number):
            return
        pairs = sorted((n, rid) for rid, n in self.number.items())
        self._numbers = [n for n, _ in pairs]
        self._ids = [rid for _, rid in pairs]
        self._stale = 0
