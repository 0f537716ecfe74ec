"""Shaping store records into what the templates show: text, times, trees, scales.

Nothing here returns markup: the templates escape every value (Jinja2 autoescape), so a
value from the store is always shown as text, whatever it contains.
"""

from __future__ import annotations

import datetime
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from ..types import Span

__all__ = ["SECRET_KEYS", "Bar", "as_json", "duration", "href", "masked", "span_urls",
           "timestamp", "waterfall"]

#: Keys whose values the resources page hides (an LLM's api_key and the like).
SECRET_KEYS = frozenset({"api_key", "apikey", "authorization", "password", "secret",
                         "access_token", "secret_key"})

#: Width of the waterfall's drawing, in SVG user units.
SCALE = 1000.0


def href(path: str, **params: Any) -> str:
    """``path?k=v...`` with the parameters URL-encoded (None and "" left out)."""
    kept = [(k, v) for k, v in params.items() if v is not None and v != ""]
    return f"{path}?{urlencode(kept, doseq=True)}" if kept else path


def span_urls(spans: list[Span]) -> list[str]:
    """Each span's page (``/span?rollout=...&attempt=...&span=...``), the common part encoded
    once: a trace page lists up to thousands of them."""
    common: dict[tuple[str, str], str] = {}
    out = []
    for span in spans:
        key = (span.rollout_id, span.attempt_id)
        if key not in common:
            common[key] = href("/span", rollout=key[0], attempt=key[1]) + "&span="
        out.append(common[key] + quote(span.span_id, safe=""))
    return out


def _plain(value: Any) -> Any:
    """A JSON-able form of a record field (dataclasses and enums included)."""
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value.value if hasattr(value, "value") else value
    return repr(value)


def as_json(value: Any) -> str:
    """Pretty JSON text of any stored value (a repr for what JSON cannot hold)."""
    return json.dumps(_plain(value), indent=2, sort_keys=True, ensure_ascii=False)


def masked(value: Any) -> Any:
    """``value`` with the values of secret-looking keys (SECRET_KEYS) replaced."""
    value = _plain(value)
    if isinstance(value, dict):
        return {k: ("(hidden)" if k.lower() in SECRET_KEYS and v else masked(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def timestamp(seconds: float | None) -> str:
    """UTC wall-clock time to the millisecond, or an en dash for none."""
    if seconds is None:
        return "\u2013"
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def duration(start: float | None, end: float | None) -> str:
    """``end - start`` as ms or s; an en dash if either is missing."""
    if start is None or end is None:
        return "\u2013"
    seconds = end - start
    return f"{seconds * 1000:.1f} ms" if abs(seconds) < 10 else f"{seconds:.2f} s"


@dataclass
class Bar:
    """One span in the waterfall: its depth in the tree and its bar on the time scale."""

    span: Span
    depth: int
    x: float  # start, in SCALE units from the trace's first start
    width: float  # duration in SCALE units (at least a hairline)
    orphan: bool  # its parent_id names no span of this attempt


def _order(spans: list[Span]) -> list[tuple[Span, int, bool]]:
    """Depth-first by parent_id, children by start time then sequence; spans whose parent is
    not among them (or that sit in a parent cycle) become roots. Iterative: a chain of
    1,000 spans must not hit the recursion limit."""
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[Span]] = defaultdict(list)
    roots: list[Span] = []
    for span in spans:
        parent = span.parent_id
        if parent is not None and parent in by_id and parent != span.span_id:
            children[parent].append(span)
        else:
            roots.append(span)

    def key(s: Span) -> tuple[float, int]:
        return (s.start_time if s.start_time is not None else float("inf"), s.sequence_id)

    out: list[tuple[Span, int, bool]] = []
    seen: set[int] = set()
    pending = sorted(spans, key=key)  # for spans left over from cycles
    for root in sorted(roots, key=key) + pending:
        if id(root) in seen:
            continue
        stack = [(root, 0)]
        while stack:
            span, depth = stack.pop()
            if id(span) in seen:
                continue
            seen.add(id(span))
            orphan = depth == 0 and span.parent_id is not None
            out.append((span, depth, orphan))
            for child in sorted(children.get(span.span_id, ()), key=key, reverse=True):
                stack.append((child, depth + 1))
    return out


def waterfall(spans: list[Span]) -> tuple[list[Bar], float]:
    """The spans as a tree in waterfall order with bars to scale, and the total seconds the
    scale spans (first start to last end)."""
    starts = [s.start_time for s in spans if s.start_time is not None]
    ends = [s.end_time for s in spans if s.end_time is not None] + starts
    first = min(starts, default=0.0)
    total = max(max(ends, default=first) - first, 0.0)
    unit = SCALE / total if total > 0 else 0.0
    bars = []
    for span, depth, orphan in _order(spans):
        if span.start_time is None:
            x, width = 0.0, 0.0
        else:
            x = (span.start_time - first) * unit
            end = span.end_time if span.end_time is not None else span.start_time
            width = max((end - span.start_time) * unit, 0.0)
        bars.append(Bar(span, depth, round(x, 2), round(max(width, 1.0), 2), orphan))
    return bars, total
