"""OpenTelemetry spans as mpstore :class:`~mpstore.types.Span` records.

:func:`to_span` reads an ``opentelemetry.sdk.trace.ReadableSpan`` (or anything shaped like
one) into a Span with plain values only: ids as lower-case hex (32 digits for a trace, 16 for
a span, as OpenTelemetry formats them), times in seconds, status/context/parent/resource as
dicts, events and links as lists of dicts, the same shapes agent-lightning's
``Span.from_opentelemetry`` produces. It imports nothing from OpenTelemetry: only callers
that hold a ReadableSpan need ``opentelemetry-sdk`` (``pip install 'mpstore[otel]'``).

The client converts before sending (``StoreClient.add_otel_span``), so no OpenTelemetry
object ever crosses the wire; the server receives a Span.
"""

from __future__ import annotations

from typing import Any

from . import validate as v
from .errors import InvalidArgument
from .types import Span

__all__ = ["checked_span", "to_span"]


def _seconds(nanoseconds: int | None) -> float | None:
    # int / int is rounded once (int / 1e9 converts to float first, then divides)
    return None if nanoseconds is None else nanoseconds / 1_000_000_000


def _context(context: Any) -> dict[str, Any]:
    state = context.trace_state
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "is_remote": bool(context.is_remote),
        "trace_state": dict(state.items()) if state else {},
    }


def _attributes(attributes: Any) -> dict[str, Any]:
    return dict(attributes) if attributes else {}


def to_span(readable_span: Any, rollout_id: str, attempt_id: str, sequence_id: int) -> Span:
    """The Span of ``readable_span`` for this attempt. Raises InvalidArgument when it is not
    shaped like an OpenTelemetry ReadableSpan."""
    try:
        context = readable_span.get_span_context()
        parent = readable_span.parent
        status = readable_span.status
        resource = readable_span.resource
        return Span(
            rollout_id, attempt_id, sequence_id, readable_span.name,
            trace_id=format(context.trace_id if context else 0, "032x"),
            span_id=format(context.span_id if context else 0, "016x"),
            parent_id=format(parent.span_id, "016x") if parent else None,
            status={"status_code": status.status_code.name, "description": status.description},
            attributes=_attributes(readable_span.attributes),
            events=[{"name": e.name, "attributes": _attributes(e.attributes),
                     "timestamp": _seconds(e.timestamp)} for e in readable_span.events or ()],
            links=[{"context": _context(link.context),
                    "attributes": dict(link.attributes) if link.attributes else None}
                   for link in readable_span.links or ()],
            start_time=_seconds(readable_span.start_time),
            end_time=_seconds(readable_span.end_time),
            context=_context(context) if context else None,
            parent=_context(parent) if parent else None,
            resource={"attributes": _attributes(getattr(resource, "attributes", None)),
                      "schema_url": getattr(resource, "schema_url", None) or ""},
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"readable_span must be an OpenTelemetry ReadableSpan or an mpstore Span, not "
            f"{type(readable_span).__name__} ({exc})") from None


def checked_span(rollout_id: Any, attempt_id: Any, readable_span: Any,
                 sequence_id: Any) -> Span:
    """``add_otel_span``'s arguments checked (every backend's): the span to store, converted
    from a ``ReadableSpan`` unless it is a Span already, numbered ``sequence_id`` (0 until the
    store numbers it). Raises InvalidArgument."""
    v.identifier(rollout_id, "rollout_id")
    v.identifier(attempt_id, "attempt_id")
    if sequence_id is not None and (isinstance(sequence_id, bool) or not isinstance(
            sequence_id, int) or sequence_id < 0):
        raise InvalidArgument(f"sequence_id must be an int >= 0 or None, not {sequence_id!r}")
    given = (readable_span if isinstance(readable_span, Span)
             else to_span(readable_span, rollout_id, attempt_id, sequence_id or 0))
    if (given.rollout_id, given.attempt_id) != (rollout_id, attempt_id):
        raise InvalidArgument("add_otel_span: the span's rollout_id and attempt_id must be "
                              "the ones given")
    return v.span(given)
