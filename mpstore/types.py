"""Records, status enums, the UNSET sentinel and id generators.

The records keep agent-lightning's field names so its users recognise them. They are plain
``@dataclass(slots=True)`` objects; each pickles as "its loader + a tuple of plain values"
(enums as their values, nested records as their own tuples: see ``_record``), which pickles
three to four times faster than the default slots protocol (records cross the wire on every
call).

Two kinds of copy exist, because the store hands records out in two situations:

* ``snapshot()``: a new record object sharing its field values. The store never mutates a
  container in place (it replaces ``metadata``, ``config`` ...), so a snapshot taken under the
  lock stays consistent while the server pickles it outside the lock.
* ``clone()``: a snapshot whose mutable containers are copied too, for in-process callers who
  could otherwise mutate the store's state through a returned object (REF Q10).
"""

from __future__ import annotations

import copy
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "LLM",
    "UNSET",
    "Attempt",
    "AttemptStatus",
    "AttemptedRollout",
    "FinishedRollouts",
    "Page",
    "PromptTemplate",
    "ProxyLLM",
    "ResourcesUpdate",
    "Rollout",
    "RolloutConfig",
    "RolloutMode",
    "RolloutStatus",
    "Span",
    "Unset",
    "Worker",
    "WorkerStatus",
    "new_attempt_id",
    "new_resources_id",
    "new_rollout_id",
    "private_copy",
]


class Unset:
    """Type of :data:`UNSET`: "argument not given", as opposed to an explicit ``None``."""

    _instance: Unset | None = None

    def __new__(cls) -> Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        # Pickled by reference to the module-level name, so it stays a singleton anywhere.
        return "UNSET"


UNSET = Unset()


def _by_name(self: enum.Enum, protocol: int) -> str:
    # Pickled by reference to the member ("RolloutStatus.RUNNING"): one lookup to write and
    # one to read, where Enum's default calls the class with the value (about twice the cost).
    return f"{type(self).__name__}.{self._name_}"


class RolloutStatus(str, enum.Enum):
    QUEUING = "queuing"
    PREPARING = "preparing"
    RUNNING = "running"
    FAILED = "failed"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    REQUEUING = "requeuing"

    __reduce_ex__ = _by_name

    def __str__(self) -> str:
        return self.value

    @property
    def is_queuing(self) -> bool:
        return self in _QUEUED

    @property
    def is_running(self) -> bool:
        return self in _RUNNING

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED



class AttemptStatus(str, enum.Enum):
    PREPARING = "preparing"
    RUNNING = "running"
    FAILED = "failed"
    SUCCEEDED = "succeeded"
    UNRESPONSIVE = "unresponsive"
    TIMEOUT = "timeout"

    __reduce_ex__ = _by_name

    def __str__(self) -> str:
        return self.value



class RolloutMode(str, enum.Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"

    __reduce_ex__ = _by_name

    def __str__(self) -> str:
        return self.value



class WorkerStatus(str, enum.Enum):
    """What a runner is doing, as derived from its dequeues and attempt updates (agent-lightning
    0.3.0's rules): idle after its attempt ended or its dequeue found nothing, busy while it holds
    an attempt, unknown after its attempt timed out or went unresponsive (or before anything)."""

    IDLE = "idle"
    BUSY = "busy"
    UNKNOWN = "unknown"

    __reduce_ex__ = _by_name

    def __str__(self) -> str:
        return self.value


_QUEUED = frozenset({RolloutStatus.QUEUING, RolloutStatus.REQUEUING})
_RUNNING = frozenset({RolloutStatus.PREPARING, RolloutStatus.RUNNING})
_FINISHED = frozenset({RolloutStatus.FAILED, RolloutStatus.SUCCEEDED, RolloutStatus.CANCELLED})


def _rebuild(cls: type, values: tuple[Any, ...]) -> Any:
    """Unpickle a record pickled by mpstore 0.1.0 (its data directories hold them)."""
    return cls._from_values(values)  # type: ignore[attr-defined]


def _wire_codes(name: str, kind: Any) -> tuple[str, str]:
    """How field ``name`` of kind ``kind`` is written into and read back from a record's
    pickled tuple, as (expression to write, statements to read back): an enum as its value, a
    list of enums as a list of values, a nested record as its own tuple. A field holding
    something unexpected (a dict as ``config``, a value no member has) crosses as it is."""
    field_ = f"self.{name}"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return (f"getattr({field_}, '_value_', {field_})",
                f"    if type(new.{name}) is str:\n"
                f"        new.{name} = _{name}_values.get(new.{name}, new.{name})\n")
    if isinstance(kind, list):  # [EnumClass]
        return (f"[getattr(v, '_value_', v) for v in {field_}] if type({field_}) is list "
                f"else {field_}",
                f"    if type(new.{name}) is list:\n"
                f"        new.{name} = [_{name}_values.get(v, v) if type(v) is str else v "
                f"for v in new.{name}]\n")
    return (f"{field_}._wire() if type({field_}) is _{name}_kind else {field_}",
            f"    if type(new.{name}) is tuple:\n"
            f"        new.{name} = _{name}_kind._unwire(new.{name})\n")


def _record(**wire: Any) -> Callable[[type], type]:
    """Give a slots dataclass a fast pickle (``__reduce__``) and a shallow ``snapshot()``.

    Both are generated per class, as ``dataclasses`` generates ``__init__``: straight-line
    attribute copies run several times faster than a loop of getattr/setattr, and records are
    copied and pickled on every store call. This stays generated code because a benchmark
    says it matters (benchmarks/README.md, "records pickle as one loader reference": a
    rollout's pickle round trip 12.1 -> 6.4 us, ``get_rollout_by_id`` p50 70 -> 63 us); to
    step through it, print ``source`` below. It is the wire format only: what is written to
    disk is laid out by mpstore.schema, by field name, and does not depend on it. A record
    pickles as one reference to its ``_unwire`` and a tuple of plain values: ``wire`` names
    the fields that are not plain (``status=RolloutStatus``, ``config=RolloutConfig``,
    ``retry_condition=[AttemptStatus]``), inherited by subclasses. Each class or enum member
    pickled by reference costs about 1 µs to write and 1 µs to read, a plain value next to
    nothing: a rollout's round trip through pickle went from 12 µs to 6.
    """

    def decorate(cls: type) -> type:
        codecs = {**getattr(cls, "_wire_kinds", {}), **wire}
        names = tuple(f.name for f in fields(cls))  # own and inherited, in __init__ order
        codes = {name: _wire_codes(name, kind) for name, kind in codecs.items()}
        targets = ", ".join(f"new.{n}" for n in names)
        written = ", ".join(codes[n][0] if n in codes else f"self.{n}" for n in names)
        source = (
            "def snapshot(self):\n"
            f"    new = _new(_cls)\n    {targets} = {', '.join(f'self.{n}' for n in names)}\n"
            "    return new\n"
            "def from_values(values):\n"
            f"    new = _new(_cls)\n    {targets}, = values\n    return new\n"
            f"def wire(self):\n    return ({written},)\n"
            f"def unwire(values):\n    new = _new(_cls)\n    {targets}, = values\n"
            + "".join(code[1] for code in codes.values()) + "    return new\n"
            "def reduce(self):\n    return _unwire, (wire(self),)\n"
        )
        scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
        for name, kind in codecs.items():
            scope[f"_{name}_kind"] = kind
            members = kind[0] if isinstance(kind, list) else kind
            if isinstance(members, type) and issubclass(members, enum.Enum):
                scope[f"_{name}_values"] = {m.value: m for m in members}
        exec(source, scope)
        unwire = scope["unwire"]
        # Pickled by reference as ``mpstore.types.<Class>._unwire``.
        unwire.__module__, unwire.__qualname__ = cls.__module__, f"{cls.__name__}._unwire"
        scope["_unwire"] = unwire
        cls._fields = names  # type: ignore[attr-defined]
        cls._wire_kinds = codecs  # type: ignore[attr-defined]
        cls.snapshot = scope["snapshot"]  # type: ignore[attr-defined]
        cls._from_values = staticmethod(scope["from_values"])  # type: ignore[attr-defined]
        cls._wire = scope["wire"]  # type: ignore[attr-defined]
        cls._unwire = staticmethod(unwire)  # type: ignore[attr-defined]
        cls.__reduce__ = scope["reduce"]  # type: ignore[attr-defined]
        return cls

    return decorate


@_record(retry_condition=[AttemptStatus])
@dataclass(slots=True)
class RolloutConfig:
    """Retry and timeout policy of a rollout (REF §1.2). Validated by ``mpstore.validate``."""

    timeout_seconds: float | None = None
    unresponsive_seconds: float | None = None
    max_attempts: int = 1
    retry_condition: list[AttemptStatus] = field(default_factory=list)

    def clone(self) -> RolloutConfig:
        return RolloutConfig(
            self.timeout_seconds,
            self.unresponsive_seconds,
            self.max_attempts,
            list(self.retry_condition),
        )


def _deep(value: Any) -> Any:
    # Fast path for the payloads stores mostly hold: None, scalars, and flat str-keyed dicts.
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return copy.deepcopy(value)


@_record(status=RolloutStatus, mode=RolloutMode, config=RolloutConfig)
@dataclass(slots=True)
class Rollout:
    rollout_id: str
    input: Any
    start_time: float
    end_time: float | None = None
    mode: str | None = None
    resources_id: str | None = None
    status: RolloutStatus = RolloutStatus.QUEUING
    config: RolloutConfig = field(default_factory=RolloutConfig)
    metadata: dict[str, Any] | None = None

    def clone(self) -> Rollout:
        new: Rollout = self.snapshot()  # type: ignore[attr-defined]
        new.input = _deep(self.input)
        new.config = self.config.clone()
        new.metadata = _deep(self.metadata)
        return new


@_record(status=AttemptStatus)
@dataclass(slots=True)
class Attempt:
    rollout_id: str
    attempt_id: str
    sequence_id: int
    start_time: float
    end_time: float | None = None
    status: AttemptStatus = AttemptStatus.PREPARING
    worker_id: str | None = None
    last_heartbeat_time: float | None = None
    metadata: dict[str, Any] | None = None

    def clone(self) -> Attempt:
        new: Attempt = self.snapshot()  # type: ignore[attr-defined]
        new.metadata = _deep(self.metadata)
        return new


@_record(attempt=Attempt)
@dataclass(slots=True)
class AttemptedRollout(Rollout):
    """A rollout paired with one of its attempts (the one just created, for claims)."""

    attempt: Attempt = field(kw_only=True)

    @classmethod
    def of(cls, rollout: Rollout, attempt: Attempt) -> AttemptedRollout:
        values = [getattr(rollout, name) for name in Rollout._fields]  # type: ignore[attr-defined]
        new: AttemptedRollout = cls._from_values((*values, attempt))  # type: ignore[attr-defined]
        return new

    def clone(self) -> AttemptedRollout:
        return AttemptedRollout.of(Rollout.clone(self), self.attempt.clone())


def _random_hex(digits: int) -> str:
    return os.urandom(digits // 2).hex()  # what secrets.token_hex does, minus two calls


@_record()
@dataclass(slots=True)
class Span:
    """A trace record (REF §1.6). ``status``, ``context``, ``parent`` and ``resource`` are
    plain dicts (OTel's shapes: ``{"status_code": "OK", "description": None}`` ...), which
    pickle faster than nested records. Ids default to fresh random hex so that two spans built
    without ids are never taken for duplicates (D7)."""

    rollout_id: str
    attempt_id: str
    sequence_id: int
    name: str
    trace_id: str = field(default_factory=lambda: _random_hex(32))
    span_id: str = field(default_factory=lambda: _random_hex(16))
    parent_id: str | None = None
    status: dict[str, Any] = field(default_factory=lambda: {"status_code": "UNSET"})
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)
    links: list[Any] = field(default_factory=list)
    start_time: float | None = None
    end_time: float | None = None
    context: dict[str, Any] | None = None
    parent: dict[str, Any] | None = None
    resource: dict[str, Any] = field(default_factory=dict)

    def clone(self) -> Span:
        new: Span = self.snapshot()  # type: ignore[attr-defined]
        for name in ("status", "attributes", "events", "links", "context", "parent", "resource"):
            setattr(new, name, _deep(getattr(self, name)))
        return new


@_record()
@dataclass(slots=True)
class LLM:
    endpoint: str
    model: str
    api_key: str | None = None
    sampling_parameters: dict[str, Any] = field(default_factory=dict)
    resource_type: str = "llm"


@_record()
@dataclass(slots=True)
class ProxyLLM(LLM):
    resource_type: str = "proxy_llm"

    def with_rollout(self, rollout_id: str, attempt_id: str) -> str:
        """The endpoint with ``/rollout/{rid}/attempt/{aid}`` spliced in before a ``/v1``."""
        base = self.endpoint.rstrip("/")
        suffix = f"/rollout/{rollout_id}/attempt/{attempt_id}"
        if base.endswith("/v1"):
            return base[: -len("/v1")] + suffix + "/v1"
        return base + suffix


@_record()
@dataclass(slots=True)
class PromptTemplate:
    template: str
    engine: str = "f-string"
    resource_type: str = "prompt_template"

    def format(self, **kwargs: Any) -> str:
        if self.engine != "f-string":
            raise NotImplementedError(f"Only the f-string engine formats, not {self.engine}")
        return self.template.format(**kwargs)


#: Resource classes by their ``resource_type``, for building resources from plain dicts.
RESOURCE_TYPES: dict[str, type] = {
    "llm": LLM, "proxy_llm": ProxyLLM, "prompt_template": PromptTemplate
}


@_record()
@dataclass(slots=True)
class ResourcesUpdate:
    resources_id: str
    resources: dict[str, Any]
    create_time: float
    update_time: float
    version: int = 1

    def clone(self) -> ResourcesUpdate:
        new: ResourcesUpdate = self.snapshot()  # type: ignore[attr-defined]
        new.resources = copy.deepcopy(self.resources)
        return new


@_record()
@dataclass(slots=True)
class FinishedRollouts:
    """A page of the feed of finished rollouts (``finished_rollouts``): the rollouts in the
    order they finished, the cursor to pass as ``after`` next time, and how many rollouts are
    finished in all now."""

    rollouts: list[Rollout]
    next_after: int
    total: int

    def clone(self) -> FinishedRollouts:
        return FinishedRollouts([r.clone() for r in self.rollouts], self.next_after, self.total)


@_record(status=WorkerStatus)
@dataclass(slots=True)
class Worker:
    """A runner as the store sees it (agent-lightning 0.3.0's ``Worker``): created by its first
    dequeue, claim or ``update_worker`` heartbeat; ``status`` and the times are derived by the
    store (see :mod:`mpstore.workers`), ``heartbeat_stats`` is what the runner last reported."""

    worker_id: str
    status: WorkerStatus = WorkerStatus.UNKNOWN
    heartbeat_stats: dict[str, Any] | None = None
    last_heartbeat_time: float | None = None
    last_dequeue_time: float | None = None
    last_busy_time: float | None = None
    last_idle_time: float | None = None
    current_rollout_id: str | None = None
    current_attempt_id: str | None = None

    def clone(self) -> Worker:
        new: Worker = self.snapshot()  # type: ignore[attr-defined]
        new.heartbeat_stats = _deep(self.heartbeat_stats)
        return new


def _load_page(items: list[Any], total: int, limit: int, offset: int) -> Page:
    return Page(items, total, limit, offset)


# Pickled by reference as ``mpstore.types.Page._unwire``, the name the decoders' allow-list
# gives every record's loader (mpstore.manager.safe_pickle).
_load_page.__qualname__ = "Page._unwire"


class Page(list):  # type: ignore[type-arg]
    """One page of a query's results: a ``list`` of the records (so code that treats the
    result as a list keeps working, ``==`` a list included) plus what a pager needs:
    ``total`` (how many matched before ``limit``/``offset``), ``limit`` (-1: no limit) and
    ``offset``. Pickles as one reference to its loader and plain values, like the records."""

    __slots__ = ("limit", "offset", "total")

    def __init__(self, items: Any = (), total: int | None = None, limit: int = -1,
                 offset: int = 0) -> None:
        super().__init__(items)
        self.total = len(self) if total is None else total
        self.limit = limit
        self.offset = offset

    _unwire = staticmethod(_load_page)

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_page, (list(self), self.total, self.limit, self.offset)

    def __repr__(self) -> str:
        return (f"Page({list.__repr__(self)}, total={self.total}, limit={self.limit}, "
                f"offset={self.offset})")

    def clone(self) -> Page:
        return Page([private_copy(r) for r in self], self.total, self.limit, self.offset)


def private_copy(value: Any) -> Any:
    """A copy the caller cannot reach into: records clone their containers, the rest is
    deep-copied (scalars and None as they are)."""
    clone = getattr(value, "clone", None)
    return clone() if clone is not None else _deep(value)


# Ids carry 48 (rollouts, resources) or 32 (attempts) random bits, in REF's formats; REF
# derived them from sha1(uuid4), which costs more and adds no randomness.
def new_rollout_id() -> str:
    return "ro-" + os.urandom(6).hex()


def new_attempt_id() -> str:
    return "at-" + os.urandom(4).hex()


def new_resources_id() -> str:
    return "rs-" + os.urandom(6).hex()

