"""Filtering, sorting and paging over the state's records, without locks or copies.

The store's queries (``query_rollouts``, ``query_attempts``, ``query_spans``,
``query_resources``, ``query_workers``) take agent-lightning 0.3.0's arguments: exact and
``_contains`` filters combined by ``filter_logic`` (``"and"``/``"or"``), ``sort_by`` a field of
the record, ``sort_order``, ``limit`` (-1: no limit) and ``offset``. This module checks those
arguments (:func:`check_paging`, :func:`check_filter_logic`) and turns matching records into a
:class:`~mpstore.types.Page` that costs about a page:

* records come from an iterator in the store's own order (creation order for rollouts), so an
  unsorted page stops reading at ``offset + limit`` and never copies what it skips;
* a sorted page keeps only ``offset + limit`` records while reading the matches
  (``heapq.nsmallest``: O(matches * log(page)), no sorted copy of all of them);
* ``total`` is given by the caller when an index knows it (``len`` of a dict), else counted.

Sort keys: ``None`` sorts after every value in ascending order (agent-lightning pushes missing
``*_time`` values to the end too); ties keep the store's order. A filter that is given as an
empty list matches nothing (D9); no filter at all matches everything, whatever the logic.
"""

from __future__ import annotations

import heapq
import itertools
import operator
from collections.abc import Callable, Iterable, Reversible, Sequence
from typing import Any, TypeVar

from . import validate as v
from .errors import InvalidArgument
from .types import Page, RolloutStatus

__all__ = [
    "ATTEMPT_SORT_FIELDS",
    "RESOURCES_SORT_FIELDS",
    "ROLLOUT_SORT_FIELDS",
    "SPAN_SORT_FIELDS",
    "WORKER_SORT_FIELDS",
    "Paging",
    "RolloutFilters",
    "check_contains",
    "check_filter_logic",
    "check_paging",
    "combine",
    "field_predicates",
    "page",
    "rollout_filters",
    "rollout_page",
    "span_filters",
    "worker_filters",
]

T = TypeVar("T")
Predicate = Callable[[Any], bool]

#: Fields each query may sort by: numbers and strings (agent-lightning's rule), not dicts.
ROLLOUT_SORT_FIELDS = frozenset({"rollout_id", "start_time", "end_time", "mode",
                                 "resources_id", "status"})
ATTEMPT_SORT_FIELDS = frozenset({"rollout_id", "attempt_id", "sequence_id", "start_time",
                                 "end_time", "status", "worker_id", "last_heartbeat_time"})
SPAN_SORT_FIELDS = frozenset({"rollout_id", "attempt_id", "sequence_id", "trace_id", "span_id",
                              "parent_id", "name", "start_time", "end_time"})
RESOURCES_SORT_FIELDS = frozenset({"resources_id", "create_time", "update_time", "version"})
WORKER_SORT_FIELDS = frozenset({"worker_id", "status", "last_heartbeat_time",
                                "last_dequeue_time", "last_busy_time", "last_idle_time",
                                "current_rollout_id", "current_attempt_id"})


class Paging:
    """Checked ``sort_by``/``sort_order``/``limit``/``offset`` of one query."""

    __slots__ = ("descending", "limit", "offset", "sort_by")

    def __init__(self, sort_by: str | None, descending: bool, limit: int, offset: int) -> None:
        self.sort_by, self.descending, self.limit, self.offset = sort_by, descending, limit, offset

    @property
    def end(self) -> int | None:
        """One past the last index of the page among the matches (None: to the end)."""
        return None if self.limit < 0 else self.offset + self.limit


def _count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"{what} must be an int >= {minimum}, not {value!r}")
    return value


def check_paging(sort_by: Any, sort_order: Any, limit: Any, offset: Any,
                 fields: frozenset[str]) -> Paging:
    """Raise InvalidArgument unless these are a valid sort field of ``fields``, ``"asc"`` or
    ``"desc"``, an int limit >= -1 and an int offset >= 0."""
    if sort_by is not None and (not isinstance(sort_by, str) or sort_by not in fields):
        raise InvalidArgument(f"sort_by must be one of {sorted(fields)} or None, not {sort_by!r}")
    if sort_order not in ("asc", "desc"):
        raise InvalidArgument(f"sort_order must be 'asc' or 'desc', not {sort_order!r}")
    return Paging(sort_by, sort_order == "desc", _count(limit, "limit", -1),
                  _count(offset, "offset", 0))


def check_filter_logic(value: Any) -> str:
    if value not in ("and", "or"):
        raise InvalidArgument(f"filter_logic must be 'and' or 'or', not {value!r}")
    return str(value)


def check_contains(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a str or None, not {type(value).__name__}")
    return value


def field_predicates(field: str, exact: Any, contains: Any) -> list[Predicate]:
    """The predicates of an exact and a ``_contains`` filter on a str field (None: not
    given). A record whose field is None matches neither (agent-lightning's rule)."""
    predicates: list[Predicate] = []
    if exact is not None:
        if not isinstance(exact, str):
            raise InvalidArgument(f"{field} must be a str or None, not {type(exact).__name__}")
        predicates.append(lambda r: getattr(r, field) == exact)
    if check_contains(contains, f"{field}_contains") is not None:
        predicates.append(lambda r: (value := getattr(r, field)) is not None and contains in value)
    return predicates


def combine(predicates: Sequence[Predicate], logic: str) -> Predicate | None:
    """One predicate for ``predicates`` joined by ``logic``; None when there is none (all
    records match)."""
    if not predicates:
        return None
    if len(predicates) == 1:
        return predicates[0]
    if logic == "and":
        return lambda record: all(p(record) for p in predicates)
    return lambda record: any(p(record) for p in predicates)


#: Sort fields no record leaves None: sorted by the bare value (a third of the time).
_NEVER_NONE = frozenset({"rollout_id", "attempt_id", "sequence_id", "start_time", "status",
                         "trace_id", "span_id", "name", "resources_id", "create_time",
                         "update_time", "version", "worker_id"})


def _key(field: str) -> Callable[[Any], Any]:
    if field in _NEVER_NONE:
        return operator.attrgetter(field)

    def key(record: Any) -> tuple[bool, Any]:
        value = getattr(record, field)
        return (value is None, 0 if value is None else value)

    return key


def page(records: Iterable[T], paging: Paging, predicate: Predicate | None = None,
         total: int | None = None) -> Page:
    """The page of ``records`` (in the store's order) that match ``predicate``.

    ``total``: the number of matches when the caller knows it without counting (then an
    unsorted page stops reading at its end); otherwise they are counted while reading."""
    matches: Iterable[T] = records if predicate is None else filter(predicate, records)
    end = paging.end
    if paging.sort_by is None and not paging.descending:
        if total is not None:
            return _known_total_page(matches, paging, total)
        counter = itertools.count()
        counted = (r for r, _ in zip(matches, counter, strict=False))
        items = list(itertools.islice(counted, paging.offset, end))
        for _ in counted:  # count the rest without keeping it
            pass
        return Page(items, next(counter), paging.limit, paging.offset)
    if paging.sort_by is None:  # the store's order, reversed
        kept = list(matches)
        kept.reverse()
        return Page(kept[paging.offset:end], len(kept), paging.limit, paging.offset)
    return _sorted_page(matches, paging)


def _known_total_page(matches: Iterable[T], paging: Paging, total: int) -> Page:
    """An unsorted page when the matches are all the records and their number is known: read
    from the nearer end, so even the last page of 100,000 reads about a page."""
    end = total if paging.end is None else min(paging.end, total)
    if paging.offset > total - end and isinstance(matches, Reversible):
        items = list(itertools.islice(reversed(matches), total - end,
                                      max(total - paging.offset, 0)))
        items.reverse()
    else:
        items = list(itertools.islice(matches, paging.offset, end))
    return Page(items, total, paging.limit, paging.offset)


def _sorted_page(matches: Iterable[T], paging: Paging) -> Page:
    assert paging.sort_by is not None
    key = _key(paging.sort_by)
    end = paging.end
    counter = itertools.count()
    counted = (r for r, _ in zip(matches, counter, strict=False))
    if end is None:
        ordered = sorted(counted, key=key, reverse=paging.descending)
    elif paging.descending:
        ordered = heapq.nlargest(end, counted, key=key)
    else:
        ordered = heapq.nsmallest(end, counted, key=key)
    return Page(ordered[paging.offset:end], next(counter), paging.limit, paging.offset)


def _in_creation_order(ids: Iterable[str], created: dict[str, int], end: int | None
                       ) -> list[str]:
    """``ids`` sorted by creation, only the first ``end`` of them when ``end`` is given."""
    if end is None:
        return sorted(ids, key=created.__getitem__)
    return heapq.nsmallest(end, ids, key=created.__getitem__)


def rollout_page(state: Any, statuses: list[Any] | None, ids: list[str] | None,
                 contains: str | None, logic: str, paging: Paging) -> Page:
    """The page of ``state.rollouts`` matching the filters (see ``query_rollouts``), in
    creation order unless sorted. Uses the status index where it is cheaper than a scan: a
    page of 100 of 100,000 rollouts reads about 100 of them, filtered by status or not."""
    rollouts, created = state.rollouts, state.created
    predicates: list[Predicate] = []
    wanted = None if statuses is None else set(statuses)
    if wanted is not None:
        predicates.append(lambda r: r.status in wanted)
    if ids is not None:
        id_set = set(ids)
        predicates.append(lambda r: r.rollout_id in id_set)
    if contains is not None:
        predicates.append(lambda r: contains in r.rollout_id)
    if not predicates:
        return page(rollouts.values(), paging, None, len(rollouts))
    if logic == "or" and len(predicates) > 1:
        return page(rollouts.values(), paging, combine(predicates, "or"))
    # "and": start from the narrowest index, filter by the rest.
    end = paging.end if paging.sort_by is None and not paging.descending else None
    if ids is not None:  # the given ids, then the other filters
        found = _in_creation_order({i for i in id_set if i in rollouts}, created, None)
        others = [p for p in predicates if p is not predicates[1 if wanted is not None else 0]]
        return page((rollouts[i] for i in found), paging, combine(others, "and"))
    if wanted is None:  # rollout_id_contains alone
        return page(rollouts.values(), paging, predicates[0])
    matched = sum(len(state.by_status[s]) for s in wanted)
    scan_cost = len(rollouts) if end is None else min(len(rollouts),
                                                      end * len(rollouts) // max(matched, 1))
    if contains is not None or scan_cost <= matched * max(matched.bit_length(), 1):
        total = matched if contains is None else None
        return page(rollouts.values(), paging, combine(predicates, "and"), total)
    indexed = itertools.chain.from_iterable(state.by_status[s] for s in wanted)
    ordered = _in_creation_order(indexed, created, end)
    return page((rollouts[i] for i in ordered), paging, None, matched)


# ------------------------------------------------ each query's arguments, for every backend
class RolloutFilters:
    """``query_rollouts``' checked arguments: ``statuses`` and ``ids`` (None: no such
    filter), ``contains``, ``logic``, ``paging``."""

    __slots__ = ("contains", "ids", "logic", "paging", "statuses")

    def __init__(self, statuses: list[RolloutStatus] | None, ids: list[str] | None,
                 contains: str | None, logic: str, paging: Paging) -> None:
        self.statuses, self.ids, self.contains = statuses, ids, contains
        self.logic, self.paging = logic, paging


def rollout_filters(status_in: Any, rollout_id_in: Any, rollout_id_contains: Any,
                    filter_logic: Any, sort_by: Any, sort_order: Any, limit: Any, offset: Any,
                    status: Any, rollout_ids: Any, with_latest_attempt: Any) -> RolloutFilters:
    """Check ``query_rollouts``' arguments (``status``/``rollout_ids`` are the older names of
    ``status_in``/``rollout_id_in``). Raises InvalidArgument."""
    chosen = status_in if status_in is not None else status
    statuses = None if chosen is None else [
        v.rollout_status(s) for s in v.sequence(chosen, "status_in")]
    chosen_ids = rollout_id_in if rollout_id_in is not None else rollout_ids
    ids = None if chosen_ids is None else v.string_list(chosen_ids, "rollout_id_in")
    contains = check_contains(rollout_id_contains, "rollout_id_contains")
    logic = check_filter_logic(filter_logic)
    paging = check_paging(sort_by, sort_order, limit, offset, ROLLOUT_SORT_FIELDS)
    if not isinstance(with_latest_attempt, bool):
        raise InvalidArgument(f"with_latest_attempt must be a bool, not {with_latest_attempt!r}")
    return RolloutFilters(statuses, ids, contains, logic, paging)


def span_filters(trace_id: Any, trace_id_contains: Any, span_id: Any, span_id_contains: Any,
                 parent_id: Any, parent_id_contains: Any, name: Any, name_contains: Any,
                 filter_logic: Any, limit: Any, offset: Any, sort_by: Any, sort_order: Any
                 ) -> tuple[Predicate | None, Paging]:
    """``query_spans``' filters as one predicate (None: none), and its paging (sort_by None
    for the spans' own order: by sequence_id, ties in arrival order). Raises
    InvalidArgument."""
    predicates: list[Predicate] = []
    for field, exact, contains in (("trace_id", trace_id, trace_id_contains),
                                   ("span_id", span_id, span_id_contains),
                                   ("parent_id", parent_id, parent_id_contains),
                                   ("name", name, name_contains)):
        predicates += field_predicates(field, exact, contains)
    predicate = combine(predicates, check_filter_logic(filter_logic))
    paging = check_paging(None if sort_by == "sequence_id" and sort_order == "asc"
                          else sort_by, sort_order, limit, offset, SPAN_SORT_FIELDS)
    return predicate, paging


def worker_filters(status_in: Any, worker_id_contains: Any, filter_logic: Any, sort_by: Any,
                   sort_order: Any, limit: Any, offset: Any) -> tuple[Predicate | None, Paging]:
    """``query_workers``' filters as one predicate (None: none), and its paging. Raises
    InvalidArgument."""
    predicates: list[Predicate] = []
    if status_in is not None:
        wanted = {v.worker_status(s) for s in v.sequence(status_in, "status_in")}
        predicates.append(lambda w: w.status in wanted)
    predicates += field_predicates("worker_id", None, worker_id_contains)
    predicate = combine(predicates, check_filter_logic(filter_logic))
    return predicate, check_paging(sort_by, sort_order, limit, offset, WORKER_SORT_FIELDS)
