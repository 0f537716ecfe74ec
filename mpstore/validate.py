"""Input validation: turn what a caller sent into what the store keeps, or raise
:class:`~mpstore.errors.InvalidArgument` with a message that names the argument (D1).

Pure functions, no state: the store calls them *before* it mutates anything, so a bad argument
always leaves the store exactly as it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from .errors import InvalidArgument
from .types import (
    RESOURCE_TYPES,
    AttemptStatus,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    Unset,
    WorkerStatus,
)

__all__ = [
    "attempt_changes",
    "attempt_status",
    "config",
    "enqueue_request",
    "identifier",
    "is_set",
    "metadata",
    "mode",
    "optional_float",
    "optional_str",
    "pairs",
    "resources",
    "rollout_changes",
    "rollout_status",
    "sequence",
    "span",
    "string_list",
    "worker_status",
]

E = TypeVar("E", RolloutStatus, AttemptStatus, RolloutMode, WorkerStatus)

#: Keys a dict given for ``enqueue_many_rollouts`` may carry, and the config keys.
ENQUEUE_KEYS = ("input", "mode", "resources_id", "config", "metadata", "rollout_id")
#: The longest rollout id a caller may choose.
MAX_ID_LENGTH = 256
CONFIG_KEYS = ("timeout_seconds", "unresponsive_seconds", "max_attempts", "retry_condition")
#: Span fields that must be a dict, a list, or a float when present.
_SPAN_DICTS = ("status", "attributes", "resource")
_SPAN_OPTIONAL_DICTS = ("context", "parent")
_SPAN_LISTS = ("events", "links")
_SPAN_TIMES = ("start_time", "end_time")


def _enum(cls: type[E], value: Any, what: str) -> E:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except (ValueError, TypeError):
        allowed = ", ".join(m.value for m in cls)
        raise InvalidArgument(f"Invalid {what}: {value!r} (expected one of: {allowed})") from None


def rollout_status(value: Any) -> RolloutStatus:
    return _enum(RolloutStatus, value, "rollout status")


def attempt_status(value: Any) -> AttemptStatus:
    return _enum(AttemptStatus, value, "attempt status")


def worker_status(value: Any) -> WorkerStatus:
    return _enum(WorkerStatus, value, "worker status")


def mode(value: Any) -> RolloutMode | None:
    return None if value is None else _enum(RolloutMode, value, "mode")


def identifier(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a str, not {type(value).__name__}")
    return value


def count(value: Any, what: str) -> int:
    """An int >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{what} must be an int >= 0, not {value!r}")
    return value


def chosen_id(value: Any, what: str = "rollout_id") -> str | None:
    """A caller-chosen id (None: the store chooses): a non-empty str of at most
    MAX_ID_LENGTH printable characters, no whitespace."""
    if value is None:
        return None
    identifier(value, what)
    if not value or len(value) > MAX_ID_LENGTH or not value.isprintable() or any(
            c.isspace() for c in value):
        raise InvalidArgument(
            f"{what} must be 1-{MAX_ID_LENGTH} printable characters without spaces, "
            f"not {value[:40]!r}")
    return value


def optional_str(value: Any, what: str) -> str | None:
    return None if value is None else identifier(value, what)


def optional_float(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidArgument(f"{what} must be a number or None, not {value!r}")
    return float(value)


def metadata(value: Any, what: str = "metadata") -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be a dict or None, not {type(value).__name__}")
    return dict(value)


def sequence(value: Any, what: str) -> list[Any]:
    """A list from a list/tuple (a bare str is refused: it is almost always a mistake)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, set, frozenset)):
        raise InvalidArgument(f"{what} must be a list, not {type(value).__name__}")
    return list(value)


def string_list(value: Any, what: str) -> list[str]:
    items = sequence(value, what)
    for item in items:
        identifier(item, f"every item of {what}")
    return items


def pairs(value: Any) -> list[tuple[str, str]]:
    """(rollout_id, attempt_id) pairs for ``get_many_span_sequence_ids``."""
    out = []
    for item in sequence(value, "pairs"):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise InvalidArgument(f"every pair must be (rollout_id, attempt_id), not {item!r}")
        out.append((identifier(item[0], "rollout_id"), identifier(item[1], "attempt_id")))
    return out


def config(value: Any) -> RolloutConfig:
    """A fresh, validated RolloutConfig from a RolloutConfig, a dict of its fields, or None."""
    if value is None:
        return RolloutConfig()
    if isinstance(value, RolloutConfig):
        fields = {k: getattr(value, k) for k in CONFIG_KEYS}
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(CONFIG_KEYS))
        if unknown:
            raise InvalidArgument(f"Unknown config keys: {unknown} (allowed: {list(CONFIG_KEYS)})")
        fields = dict(value)
    else:
        raise InvalidArgument(f"config must be a RolloutConfig, a dict or None, not {value!r}")
    max_attempts = fields.get("max_attempts", 1)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise InvalidArgument(f"config.max_attempts must be an int >= 1, not {max_attempts!r}")
    retry = fields.get("retry_condition")
    retry = [] if retry is None else retry  # "", 0, {}: wrong, not "no retries"
    if isinstance(retry, (str, bytes)) or not isinstance(retry, Sequence):
        raise InvalidArgument(f"config.retry_condition must be a list of statuses: {retry!r}")
    return RolloutConfig(
        optional_float(fields.get("timeout_seconds"), "config.timeout_seconds"),
        optional_float(fields.get("unresponsive_seconds"), "config.unresponsive_seconds"),
        max_attempts,
        [attempt_status(s) for s in retry],
    )


def enqueue_request(value: Any, index: int) -> dict[str, Any]:
    """One item of ``enqueue_many_rollouts``: a dict with ``input`` and the optional fields."""
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"Item {index} must be a dict of {list(ENQUEUE_KEYS)}")
    unknown = sorted(set(value) - set(ENQUEUE_KEYS))
    if unknown:
        raise InvalidArgument(f"Item {index} has unknown keys {unknown}")
    if "input" not in value:
        raise InvalidArgument(f"Item {index} has no 'input'")
    return {
        "input": value["input"],
        "mode": mode(value.get("mode")),
        "resources_id": optional_str(value.get("resources_id"), "resources_id"),
        "config": config(value.get("config")),
        "metadata": metadata(value.get("metadata")),
        "rollout_id": chosen_id(value.get("rollout_id")),
    }


def _plain_span(value: Any) -> bool:
    """The common case in one expression: a Span whose fields have exactly the usual types.
    add_span is the hottest call, so the field-by-field check below runs only for the rest."""
    return (
        type(value) is Span
        and type(value.rollout_id) is str
        and type(value.attempt_id) is str
        and type(value.name) is str
        and type(value.trace_id) is str
        and type(value.span_id) is str
        and (value.parent_id is None or type(value.parent_id) is str)
        and type(value.sequence_id) is int
        and value.sequence_id >= 0
        and type(value.attributes) is dict
        and type(value.status) is dict
        and type(value.resource) is dict
        and type(value.events) is list
        and type(value.links) is list
        and value.context is None
        and value.parent is None
        and (value.start_time is None
             or (type(value.start_time) is float and value.start_time == value.start_time))
        and (value.end_time is None
             or (type(value.end_time) is float and value.end_time == value.end_time))
    )


def span(value: Any) -> Span:
    """A Span, or a dict of Span fields, checked field by field."""
    if _plain_span(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, Mapping):
        try:
            value = Span(**value)
        except TypeError as exc:
            raise InvalidArgument(f"Invalid span fields: {exc}") from None
    if not isinstance(value, Span):
        raise InvalidArgument(f"span must be a Span or a dict, not {type(value).__name__}")
    for what in ("rollout_id", "attempt_id", "name", "trace_id", "span_id"):
        identifier(getattr(value, what), f"span.{what}")
    optional_str(value.parent_id, "span.parent_id")
    seq = value.sequence_id
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise InvalidArgument(f"span.sequence_id must be an int >= 0, not {seq!r}")
    for what in _SPAN_DICTS:
        if not isinstance(getattr(value, what), Mapping):
            raise InvalidArgument(f"span.{what} must be a dict")
    for what in _SPAN_OPTIONAL_DICTS:
        if getattr(value, what) is not None and not isinstance(getattr(value, what), Mapping):
            raise InvalidArgument(f"span.{what} must be a dict or None")
    for what in _SPAN_LISTS:
        if not isinstance(getattr(value, what), list):
            raise InvalidArgument(f"span.{what} must be a list")
    for what in _SPAN_TIMES:
        optional_float(getattr(value, what), f"span.{what}")
    return value


def resources(value: Any) -> dict[str, Any]:
    """Named resources: a dict of name -> LLM / ProxyLLM / PromptTemplate (or their dicts)."""
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"resources must be a dict of name -> resource, not {value!r}")
    known = tuple(RESOURCE_TYPES.values())
    out: dict[str, Any] = {}
    for name, item in value.items():
        identifier(name, "every resource name")
        if isinstance(item, Mapping):
            cls = RESOURCE_TYPES.get(item.get("resource_type", ""))
            if cls is None:
                raise InvalidArgument(
                    f"Resource {name!r} has unknown resource_type {item.get('resource_type')!r} "
                    f"(expected one of: {sorted(RESOURCE_TYPES)})"
                )
            try:
                item = cls(**item)
            except TypeError as exc:
                raise InvalidArgument(f"Resource {name!r}: {exc}") from None
        elif not isinstance(item, known):
            raise InvalidArgument(
                f"Resource {name!r} must be an LLM, ProxyLLM or PromptTemplate, "
                f"not {type(item).__name__}"
            )
        out[name] = item
    return out


def is_set(value: Any) -> bool:
    return not isinstance(value, Unset)



#: ``update_rollout``'s fields, in its order, and how each is checked (an input is anything).
_ROLLOUT_FIELDS: tuple[tuple[str, Any], ...] = (
    ("input", lambda x: x),
    ("mode", mode),
    ("resources_id", lambda x: optional_str(x, "resources_id")),
    ("status", rollout_status),
    ("config", config),
    ("metadata", metadata),
)
#: ``update_attempt``'s fields, in its order, and how each is checked.
_ATTEMPT_FIELDS: tuple[tuple[str, Any], ...] = (
    ("status", attempt_status),
    ("worker_id", lambda x: optional_str(x, "worker_id")),
    ("last_heartbeat_time", lambda x: optional_float(x, "last_heartbeat_time")),
    ("metadata", metadata),
)


def rollout_changes(input: Any, mode: Any, resources_id: Any, status: Any, config: Any,
                    metadata: Any) -> dict[str, Any]:
    """``update_rollout``'s given fields (those not NOT_GIVEN), checked. Raises
    InvalidArgument."""
    given = (input, mode, resources_id, status, config, metadata)
    return {name: check(value) for (name, check), value in zip(_ROLLOUT_FIELDS, given, strict=True)
            if is_set(value)}


def attempt_changes(status: Any, worker_id: Any, last_heartbeat_time: Any,
                    metadata: Any) -> dict[str, Any]:
    """``update_attempt``'s given fields (those not NOT_GIVEN), checked. Raises
    InvalidArgument."""
    given = (status, worker_id, last_heartbeat_time, metadata)
    return {name: check(value) for (name, check), value in zip(_ATTEMPT_FIELDS, given, strict=True)
            if is_set(value)}
