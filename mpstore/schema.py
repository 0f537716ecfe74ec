"""How records are written to disk (schema version 2): explicit, named, versioned.

A stored record is a tuple of plain values: str, numbers, None, lists and dicts, plus the
user's own payloads (``input``, ``metadata``, span attributes ...) as they were given. Enums
are stored as their values and nested records as their own tuples. No class reference is
stored, so a row does not depend on how this version of mpstore pickles its classes.

The order of each kind's values is its *layout*: the field names below. A database records
the layouts it was written with (its ``meta`` table), and rows are read back by field name,
so a field this version does not know is an error and a field the database lacks takes the
record's default. Adding a field to a record means adding it to its layout here: an older
database is then rewritten once, on open, in one transaction (see ``tables.migrate``).

Resources hold records of their own (``LLM``, ``PromptTemplate`` ...); those are stored as
``(RESOURCE_TAG, resource_type, {field: value})`` so that they come back as the same class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .types import (
    RESOURCE_TYPES,
    Attempt,
    AttemptStatus,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
)

__all__ = ["LAYOUTS", "SCHEMA_VERSION", "Decoder", "encode_resources", "encode_rollout",
           "encode_span"]

#: Bump when the tables change shape or a layout changes meaning (a new field does not).
#: 2: records as plain values in named layouts; 3: the rollouts table has ``finished`` (the
#: feed number), the replies table remembers answered requests, and the file is
#: incrementally vacuumed (deleted rollouts give space back); 4: the latest commits may be in
#: a log file beside the database (mpstore.changelog), which an older mpstore would not read;
#: 5: spans are stored in chunks, one row for a rollout's spans of one compaction.
SCHEMA_VERSION = 5

#: The field order of each stored kind, as written by this version.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "rollout": ("rollout_id", "input", "start_time", "end_time", "mode", "resources_id",
                "status", "config", "metadata"),
    "config": ("timeout_seconds", "unresponsive_seconds", "max_attempts", "retry_condition"),
    "attempt": ("rollout_id", "attempt_id", "sequence_id", "start_time", "end_time", "status",
                "worker_id", "last_heartbeat_time", "metadata"),
    "span": ("rollout_id", "attempt_id", "sequence_id", "name", "trace_id", "span_id",
             "parent_id", "status", "attributes", "events", "links", "start_time", "end_time",
             "context", "parent", "resource"),
    "resources": ("resources_id", "resources", "create_time", "update_time", "version"),
}

#: Which class each layout builds, to check the layouts against the records (a test does).
CLASSES: dict[str, type] = {
    "rollout": Rollout, "config": RolloutConfig, "attempt": Attempt, "span": Span,
    "resources": ResourcesUpdate,
}

RESOURCE_TAG = "mpstore.resource"


def _value(member: Any) -> Any:
    """An enum as its value; anything else (None, a plain str) as it is."""
    return getattr(member, "_value_", member)


def _config(config: RolloutConfig) -> tuple[Any, ...]:
    return (config.timeout_seconds, config.unresponsive_seconds, config.max_attempts,
            [_value(s) for s in config.retry_condition])


def _attempt(a: Attempt) -> tuple[Any, ...]:
    return (a.rollout_id, a.attempt_id, a.sequence_id, a.start_time, a.end_time,
            _value(a.status), a.worker_id, a.last_heartbeat_time, a.metadata)


def encode_rollout(rollout: Rollout, attempts: list[Attempt]) -> tuple[Any, ...]:
    """A rollout row's record: the rollout and its attempts, in the layouts above."""
    r = rollout
    values = (r.rollout_id, r.input, r.start_time, r.end_time, _value(r.mode), r.resources_id,
              _value(r.status), _config(r.config), r.metadata)
    return values, [_attempt(a) for a in attempts]


def encode_span(s: Span) -> tuple[Any, ...]:
    # The hottest durable write: a flat tuple, no per-field work (no field is an enum).
    return (s.rollout_id, s.attempt_id, s.sequence_id, s.name, s.trace_id, s.span_id,
            s.parent_id, s.status, s.attributes, s.events, s.links, s.start_time, s.end_time,
            s.context, s.parent, s.resource)


def _resource(value: Any) -> Any:
    if type(value) in RESOURCE_TYPES.values():
        names = type(value)._fields  # type: ignore[attr-defined]
        return (RESOURCE_TAG, value.resource_type, {n: getattr(value, n) for n in names})
    return value


def encode_resources(update: ResourcesUpdate) -> tuple[Any, ...]:
    resources = {name: _resource(value) for name, value in update.resources.items()}
    return (update.resources_id, resources, update.create_time, update.update_time,
            update.version)


class Decoder:
    """Reads rows written with ``layouts`` (a database's recorded layouts) back into records.

    Raises ValueError for a row that does not fit its layout or names a field, status or
    resource type this version does not know.
    """

    def __init__(self, layouts: dict[str, tuple[str, ...]]) -> None:
        unknown = {kind: sorted(set(names) - set(LAYOUTS.get(kind, ())))
                   for kind, names in layouts.items()}
        unknown = {kind: names for kind, names in unknown.items() if names}
        if unknown:
            raise ValueError(f"fields unknown to this mpstore: {unknown}")
        self._layouts = layouts

    def _fields(self, kind: str, values: Any) -> dict[str, Any]:
        layout = self._layouts[kind]
        if not isinstance(values, (tuple, list)) or len(values) != len(layout):
            raise ValueError(f"a {kind} row does not fit its layout {layout}")
        return dict(zip(layout, values, strict=True))

    def _build(self, kind: str, values: Any, enums: dict[str, Callable[[Any], Any]]) -> Any:
        fields = self._fields(kind, values)
        for name, convert in enums.items():
            if name in fields:
                fields[name] = convert(fields[name])
        return CLASSES[kind](**fields)

    def config(self, values: Any) -> RolloutConfig:
        return self._build("config", values, {
            "retry_condition": lambda statuses: [AttemptStatus(s) for s in statuses]})

    def rollout(self, record: Any) -> tuple[Rollout, list[Attempt]]:
        rollout_values, attempt_values = record
        rollout = self._build("rollout", rollout_values, {
            "status": RolloutStatus, "config": self.config,
            "mode": lambda m: None if m is None else RolloutMode(m)})
        attempts = [self._build("attempt", a, {"status": AttemptStatus})
                    for a in attempt_values]
        return rollout, attempts

    def span(self, values: Any) -> Span:
        return Span(**self._fields("span", values))

    def resources(self, values: Any) -> ResourcesUpdate:
        update: ResourcesUpdate = self._build("resources", values, {})
        update.resources = {name: _unresource(v) for name, v in update.resources.items()}
        return update


def _unresource(value: Any) -> Any:
    if type(value) is tuple and len(value) == 3 and value[0] == RESOURCE_TAG:
        _, kind, fields = value
        if kind not in RESOURCE_TYPES:
            raise ValueError(f"unknown resource type {kind!r}")
        return RESOURCE_TYPES[kind](**fields)
    return value
