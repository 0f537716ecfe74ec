"""What the store remembers of the calls it answered, so that a request sent again (the
connection broke before its reply arrived) is answered with the first result instead of
being applied twice.

A request that changes the store carries a request id: the client's id (random, one per
client object and process) and a sequence number that only grows. The store keeps, per
client, the results of its latest requests:

================  ==========  ===================================================
bound             default     past it
================  ==========  ===================================================
per client        64 replies  the oldest are forgotten, 64 at a time
a client's age    600 s       a client not heard from for that long is forgotten
clients           100,000     the least recently heard from is forgotten
================  ==========  ===================================================

A client resends only within its ``retry_for`` (5 s by default), with at most one request
in flight per thread, so these bounds are far from what a resend needs. A resent request
whose reply was forgotten is refused with ``StoreUnavailable`` ("may have been applied"),
never applied again: the store knows it was forgotten because its number is at or below
the client's *floor*, the highest number forgotten. A client forgotten whole has no floor:
its resend of a request older than 600 s would be applied again (it cannot happen within
``retry_for``).

With ``--data-dir`` the replies are rows of the same transaction as the change they report
(see :mod:`mpstore.durable`), so a resend after a crash and restart is answered exactly
once too.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

__all__ = ["MAX_CLIENTS", "PER_CLIENT", "TTL", "ReplyMemory"]

PER_CLIENT = 64
TTL = 600.0
MAX_CLIENTS = 100_000


class _Client:
    __slots__ = ("floor", "replies", "seen")

    def __init__(self, seen: float) -> None:
        self.replies: dict[int, Any] = {}  # in increasing sequence order
        self.floor = 0  # the highest sequence number forgotten
        self.seen = seen


class ReplyMemory:
    """Replies by (client id, sequence number); ``now`` is monotonic seconds. Not
    thread-safe (the store's lock protects it)."""

    def __init__(self) -> None:
        self._clients: OrderedDict[str, _Client] = OrderedDict()  # least recently heard first
        self.count = 0

    def lookup(self, client: str, seq: int) -> tuple[bool, Any]:
        """(True, result) if remembered; (False, None) if this request was never answered.
        Raises LookupError if it was answered and forgotten."""
        entry = self._clients.get(client)
        if entry is None:
            return False, None
        if seq in entry.replies:
            return True, entry.replies[seq]
        if seq <= entry.floor:
            raise LookupError(f"the reply to request {seq} of client {client} was forgotten")
        return False, None

    def remember(self, client: str, seq: int, result: Any, now: float
                 ) -> list[tuple[str, int]]:
        """Keep a reply; returns what was forgotten to make room, as (client, up to seq)."""
        forgotten = self._expire(now)
        entry = self._clients.get(client)
        if entry is None:
            entry = self._clients[client] = _Client(now)
        else:
            self._clients.move_to_end(client)
            entry.seen = now
        if seq not in entry.replies:
            self.count += 1
        entry.replies[seq] = result
        if len(entry.replies) > 2 * PER_CLIENT:  # forget the oldest half in one go
            old = sorted(entry.replies)[:-PER_CLIENT]
            for number in old:
                del entry.replies[number]
            self.count -= len(old)
            entry.floor = max(entry.floor, old[-1])
            forgotten.append((client, entry.floor))
        return forgotten

    def _expire(self, now: float) -> list[tuple[str, int]]:
        forgotten = []
        clients = self._clients
        while clients:
            client, entry = next(iter(clients.items()))
            if now - entry.seen <= TTL and len(clients) < MAX_CLIENTS:
                break
            del clients[client]
            self.count -= len(entry.replies)
            forgotten.append((client, max(entry.replies, default=entry.floor)))
        return forgotten

    def restore(self, rows: list[tuple[str, int, Any]], now: float) -> None:
        """Rebuild from stored (client, seq, result) rows; a client's floor is just below
        its oldest stored reply (the rows below it were deleted when they were forgotten)."""
        for client, seq, result in sorted(rows, key=lambda row: (row[0], row[1])):
            entry = self._clients.get(client)
            if entry is None:
                entry = self._clients[client] = _Client(now)
                entry.floor = seq - 1
            entry.replies[seq] = result
            self.count += 1

    def forget(self, client: str) -> None:
        """Drop a client entirely (tests)."""
        entry = self._clients.pop(client, None)
        if entry is not None:
            self.count -= len(entry.replies)

    @property
    def clients(self) -> int:
        return len(self._clients)
