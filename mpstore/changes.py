"""What a durable state hands its journal: the rows that changed (``ChangeSet``), pushed by
the state after each critical section, and what the journal hands back on open (``Saved``).
Plain containers; the state fills them, the journal reads them."""

from __future__ import annotations

from typing import Any, NamedTuple

from .types import Attempt, ResourcesUpdate, Rollout, Span

__all__ = ["ChangeSet", "Changes", "RolloutRow", "Saved"]


class Changes:
    """Which records a durable state changed since the journal last took them (the state's
    own bookkeeping; the journal only ever sees the :class:`ChangeSet` built from it).

    A rollout id in ``rollouts`` means "its record, attempts, queue position or span counter
    changed": its whole row is written again, which is simpler than tracking each field and
    costs little (a rollout has a handful of attempts).
    """

    __slots__ = ("deleted", "evicted", "forgotten", "replies", "resources", "rollouts", "spans")

    def __init__(self) -> None:
        self.replies: list[tuple[str, int, Any]] = []  # (client, seq, result)
        self.forgotten: list[tuple[str, int]] = []  # (client, replies up to this seq)
        self.rollouts: set[str] = set()
        self.spans: list[tuple[Span, float]] = []  # with their arrival time
        self.evicted: list[str] = []
        self.resources: set[str] = set()
        self.deleted: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.rollouts or self.spans or self.evicted or self.resources
                    or self.deleted or self.replies or self.forgotten)


class RolloutRow(NamedTuple):
    """Everything stored about one rollout: its record, attempts and indexes."""

    rollout: Rollout
    attempts: list[Attempt]
    created: int  # creation number, for ordering
    queue_position: int | None
    counter: int  # the span sequence counter
    finished: int | None  # its number in the feed of finished rollouts (mpstore.feed)


class ChangeSet:
    """What one critical section changed, as values a journal writes without knowing the
    state: whole rollout rows, deleted rollouts, counters of ids that are not rollouts (REF
    counts sequence ids for any id), new spans with their arrival times, evicted rollout ids,
    resources and the latest resources id (None: unchanged), and the replies remembered
    for resent requests (mpstore.replies) and forgotten."""

    __slots__ = ("counters", "deleted", "evicted", "forgotten", "latest_resources_id",
                 "replies", "resources", "rollouts", "spans")

    def __init__(self) -> None:
        self.replies: list[tuple[str, int, Any]] = []  # remembered (client, seq, result)
        self.forgotten: list[tuple[str, int]] = []  # (client, up to seq) no longer
        self.rollouts: list[RolloutRow] = []
        self.deleted: list[str] = []  # rollouts deleted with everything they had
        self.counters: list[tuple[str, int]] = []
        self.spans: list[tuple[Span, float]] = []
        self.evicted: list[str] = []
        self.resources: list[ResourcesUpdate] = []
        self.latest_resources_id: str | None = None


class Saved:
    """Everything a journal restores, in the order it must be applied."""

    __slots__ = ("counters", "evicted", "latest_resources_id", "replies", "resources",
                 "rollouts", "spans")

    def __init__(self) -> None:
        self.replies: list[tuple[str, int, Any]] = []  # (client, seq, result)
        #: (row, ticket) in creation order; the ticket orders the row against span rows
        self.rollouts: list[tuple[RolloutRow, int]] = []
        self.counters: dict[str, int] = {}  # span counters of ids that are not rollouts
        self.spans: list[tuple[int, float, Span]] = []  # (ticket, arrival, span), arrival order
        self.evicted: list[str] = []
        self.resources: list[ResourcesUpdate] = []
        self.latest_resources_id: str | None = None
