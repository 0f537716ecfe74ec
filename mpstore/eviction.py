"""Span byte accounting and memory-threshold eviction policy (REF §4.2, SPEC D8).

This module decides *how much* and *which*; the store does the dropping under its lock.

Sizes are estimates, not ``sys.getsizeof`` walks: REF's recursive walk cost more than the rest
of ``add_span`` together. The estimate walks attribute values (strings by length; containers to
a bounded depth and sample, see ``_payload``) and was calibrated against the server's RSS
growth per span (see benchmarks/), so thresholds given in bytes mean roughly what they say.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .errors import InvalidArgument
from .types import Span

__all__ = ["RELEASE_AFTER", "Thresholds", "release_free_memory", "resolve_thresholds",
           "span_size"]

logger = logging.getLogger(__name__)

#: Fixed cost of a Span object with its dicts, ids and floats. Calibrated against the server's
#: RSS: the benchmark's scale scenario measured 1,627 B per stored span of 10 attributes
#: (its share of rollouts and attempts included), which this base makes the estimate match.
_SPAN_BASE = 400
#: Cost of one dict entry / list item beyond its own payload.
_ENTRY = 100
#: Payload assumed for values that are neither str nor bytes.
_SCALAR = 32
#: Default eviction threshold as a ratio of total memory, and safe as a ratio of eviction.
DEFAULT_EVICTION_RATIO = 0.7
DEFAULT_SAFE_OF_EVICTION = 0.8
#: Total memory assumed when psutil cannot tell (REF's fallback).
FALLBACK_CAPACITY = 8 * 1024**3


#: Types counted as ``_SCALAR`` without a call.
_SCALARS = frozenset({int, float, bool, type(None)})
#: Items of a list or dict walked; a longer container is extrapolated from them.
_SAMPLE = 64
#: Nesting walked; deeper values count as scalars (bounds the cost and the recursion).
_DEPTH = 8


def _payload(value: Any, depth: int = 0) -> int:
    """Bytes of a value: strings by length, containers by their items, walked to ``_DEPTH``
    and ``_SAMPLE`` items per level (more items: the sample's average times their number), so
    that text nested in messages, events or dicts counts as much as a top-level prompt."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if depth >= _DEPTH or not isinstance(value, (list, tuple, dict)):
        return _SCALAR
    n = len(value)
    if not n:
        return 0
    items = value.values() if isinstance(value, dict) else value
    entry = 2 * _ENTRY if isinstance(value, dict) else _ENTRY
    walked = total = 0
    for item in items:
        if walked == _SAMPLE:
            break
        total += entry + _payload(item, depth + 1)
        walked += 1
    return total if walked == n else total * n // walked


def span_size(span: Span) -> int:
    """Estimated bytes a stored span occupies: one pass over its attribute values (and events
    and links, when any), so that long strings (prompts, completions) count wherever they are
    nested; keys are short and counted as overhead."""
    attributes = span.attributes
    size = _SPAN_BASE + len(span.name) + len(attributes) * _ENTRY
    for value in attributes.values():
        kind = type(value)
        if kind is str:
            size += len(value)
        elif kind in _SCALARS:  # numbers and flags, inline: add_span is the hottest call
            size += _SCALAR
        else:
            size += _payload(value)
    if span.events or span.links:  # usually empty; exception events carry stack traces
        size += _payload(span.events) + _payload(span.links)
    return size


class Thresholds:
    """Resolved thresholds in bytes: evict above ``eviction``, down to ``safe``."""

    __slots__ = ("capacity", "eviction", "safe")

    def __init__(self, eviction: int, safe: int, capacity: int) -> None:
        self.eviction = eviction
        self.safe = safe
        self.capacity = capacity


def memory_capacity() -> int:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency; REF's fallback anyway
        logger.error("psutil is not installed. Falling back to 8GB of memory in total.")
        return FALLBACK_CAPACITY
    return int(psutil.virtual_memory().total)


def _to_bytes(value: float | int, capacity: int, name: str, *, ratio_low: float) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} must be a float ratio or an int byte count, not {value!r}")
    if isinstance(value, float):
        if ratio_low == 0 and not 0 <= value <= 1:
            raise InvalidArgument(f"{name} ratio must be between 0 and 1 inclusive")
        if ratio_low > 0 and not 0 < value <= 1:
            raise InvalidArgument(f"{name} ratio must be greater than 0 and at most 1")
        return int(capacity * value)
    if value < 0:
        raise InvalidArgument(f"{name} must be non-negative")
    return value


def resolve_thresholds(
    eviction: float | int | None, safe: float | int | None, capacity: int | None = None
) -> Thresholds:
    """Bytes for both thresholds: a float is a ratio of total RAM, an int a byte count.

    Raises InvalidArgument (a ValueError) with REF's wording for out-of-range values.
    """
    capacity = memory_capacity() if capacity is None else capacity
    if capacity <= 0:
        raise InvalidArgument("Memory capacity must be positive")
    if eviction is None:
        eviction_bytes = int(capacity * DEFAULT_EVICTION_RATIO)
    else:
        eviction_bytes = _to_bytes(eviction, capacity, "eviction_threshold", ratio_low=1e-300)
    if eviction_bytes < 1:
        raise InvalidArgument("eviction_threshold must be at least 1 bytes")
    if safe is None:
        safe_bytes = int(eviction_bytes * DEFAULT_SAFE_OF_EVICTION)
    else:
        safe_bytes = _to_bytes(safe, capacity, "safe_threshold", ratio_low=0)
    if not 0 <= safe_bytes < eviction_bytes:
        raise InvalidArgument("safe_threshold must be smaller than eviction_threshold")
    return Thresholds(eviction_bytes, safe_bytes, capacity)


def choose_victims(
    total: int,
    safe: int,
    finished_first: Iterable[tuple[str, int]],
    unfinished: Iterable[tuple[str, int]],
) -> list[str]:
    """Rollout ids whose spans to drop, in order, until ``total <= safe`` (D8).

    Both iterables yield ``(rollout_id, bytes)`` oldest first; finished rollouts go first and
    unfinished ones only when that was not enough. Rollouts holding no bytes are skipped.
    """
    victims: list[str] = []
    for group in (finished_first, unfinished):
        for rollout_id, size in group:
            if total <= safe:
                return victims
            if size > 0:
                victims.append(rollout_id)
                total -= size
    return victims


#: Span bytes freed (evicted or deleted) after which the process gives free memory back.
RELEASE_AFTER = 16 * 1024 * 1024


def release_free_memory() -> None:
    """Give the C allocator's free memory back to the operating system (glibc's
    ``malloc_trim``; nothing elsewhere). Freed spans are mostly strings of a few KB, which
    glibc keeps in its heap after they are freed: without this, RSS stays at its peak after
    eviction or ``delete_rollouts`` (measured: 136 MiB before and after deleting 200 MiB of
    spans). Costs a few milliseconds per 100 MiB of heap, so it runs only after
    RELEASE_AFTER bytes were freed."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
