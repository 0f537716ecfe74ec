"""Records, statuses, UNSET, ids and the exception tree: what must survive a process boundary."""

from __future__ import annotations

import copy
import enum
import json
import multiprocessing
import pickle
import pickletools
import re
from typing import Any

import pytest

import mpstore.errors as errors_module
from mpstore import (
    LLM,
    UNSET,
    Attempt,
    AttemptedRollout,
    AttemptNotFound,
    AttemptStatus,
    AuthenticationFailed,
    InvalidArgument,
    MpstoreError,
    NoAttempts,
    PromptTemplate,
    ProxyLLM,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutNotFound,
    RolloutStatus,
    ServerStartError,
    Span,
    SpansEvicted,
    StorageError,
    StoreError,
    StoreUnavailable,
    Unset,
    VersionMismatch,
)
from mpstore.types import _rebuild, new_attempt_id, new_resources_id, new_rollout_id

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


# =========================================================================== errors
#: One instance of every exception class, built the way the store builds it.
SAMPLES: dict[str, BaseException] = {
    "MpstoreError": MpstoreError("something went wrong"),
    "StoreError": StoreError("refused"),
    "RolloutNotFound": RolloutNotFound("ro-0123456789ab"),
    "AttemptNotFound": AttemptNotFound("ro-0123456789ab", "at-01234567"),
    "NoAttempts": NoAttempts("ro-0123456789ab"),
    "InvalidArgument": InvalidArgument("Invalid rollout status: 'bogus'"),
    "SpansEvicted": SpansEvicted("ro-0123456789ab"),
    "StoreUnavailable": StoreUnavailable("server 127.0.0.1:4747 unreachable for 5.0 s"),
    "AuthenticationFailed": AuthenticationFailed("digest received was wrong"),
    "VersionMismatch": VersionMismatch("the client runs mpstore 0.3.0 (wire version 3) ..."),
    "StorageError": StorageError("database in /data has schema version 9, expected 1"),
    "ServerStartError": ServerStartError(
        "mpstore server failed to start on 127.0.0.1:4747. Another process may already be "
        "using this port. (held by PID 1234: agl store)"
    ),
}


def sample(name: str) -> BaseException:
    # A class added without a sample fails here on purpose: give it a realistic instance.
    assert name in SAMPLES, f"add a sample of {name} to SAMPLES"
    return SAMPLES[name]


@pytest.mark.parametrize("name", errors_module.__all__)
@pytest.mark.parametrize("protocol", [0, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_every_exception_round_trips(name: str, protocol: int) -> None:
    exc = sample(name)
    assert type(exc) is getattr(errors_module, name)
    back = pickle.loads(pickle.dumps(exc, protocol))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.args == exc.args
    assert vars(back) == vars(exc)  # same attributes (rollout_id, attempt_id ...)


def test_every_class_has_a_sample() -> None:
    # So a new exception gets a realistic round-trip test, not just the generic one.
    classes = {n for n, o in vars(errors_module).items()
               if isinstance(o, type) and issubclass(o, BaseException)
               and o.__module__ == errors_module.__name__}
    assert classes == set(errors_module.__all__)
    assert set(SAMPLES) == set(errors_module.__all__)


def test_raised_exception_round_trips_with_cause() -> None:
    try:
        try:
            raise KeyError("ro-x")
        except KeyError:
            raise RolloutNotFound("ro-x") from None
    except RolloutNotFound as exc:
        back = pickle.loads(pickle.dumps(exc))
    assert type(back) is RolloutNotFound and str(back) == "Rollout ro-x not found"
    assert back.rollout_id == "ro-x"


@pytest.mark.parametrize(("exc", "message"), [
    (RolloutNotFound("ro-x"), "Rollout ro-x not found"),
    (AttemptNotFound("ro-x", "at-y"), "Attempt at-y not found for rollout ro-x"),
    (NoAttempts("ro-x"), "No attempts found for rollout ro-x"),
    (SpansEvicted("ro-x"), "Spans for rollout ro-x have been evicted"),
])
def test_ref_wording(exc: BaseException, message: str) -> None:  # D14
    assert str(exc) == message


def test_attributes() -> None:
    e = AttemptNotFound("ro-x", "at-y")
    assert (e.rollout_id, e.attempt_id) == ("ro-x", "at-y")
    assert RolloutNotFound("ro-x").rollout_id == "ro-x"
    assert NoAttempts("ro-x").rollout_id == "ro-x"
    assert SpansEvicted("ro-x").rollout_id == "ro-x"


@pytest.mark.parametrize(("cls", "bases"), [
    (StoreError, (MpstoreError,)),
    (RolloutNotFound, (StoreError, ValueError)),
    (AttemptNotFound, (StoreError, ValueError)),
    (NoAttempts, (StoreError, ValueError)),
    (InvalidArgument, (StoreError, ValueError)),
    (SpansEvicted, (StoreError, RuntimeError)),
    (StorageError, (StoreError, RuntimeError)),
    (StoreUnavailable, (MpstoreError, ConnectionError)),
    (AuthenticationFailed, (MpstoreError, multiprocessing.AuthenticationError)),
    (ServerStartError, (MpstoreError, RuntimeError)),
])
def test_tree(cls: type, bases: tuple[type, ...]) -> None:  # SPEC §4
    for base in bases:
        assert issubclass(cls, base)
    assert issubclass(cls, Exception)


def test_not_store_errors() -> None:
    # The client never retries a StoreError; transport failures must not look like one.
    for cls in (StoreUnavailable, AuthenticationFailed, ServerStartError):
        assert not issubclass(cls, StoreError)
    for cls in (StoreUnavailable, AuthenticationFailed, ServerStartError, StoreError):
        assert not issubclass(cls, ValueError)


# =========================================================================== UNSET
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unset_is_a_singleton_through_pickle(protocol: int) -> None:
    assert pickle.loads(pickle.dumps(UNSET, protocol)) is UNSET
    nested = pickle.loads(pickle.dumps({"status": UNSET, "list": [UNSET]}, protocol))
    assert nested["status"] is UNSET and nested["list"][0] is UNSET


def test_unset_behaviour() -> None:
    assert Unset() is UNSET
    assert isinstance(UNSET, Unset)
    assert copy.copy(UNSET) is UNSET and copy.deepcopy(UNSET) is UNSET
    assert repr(UNSET) == "UNSET"
    assert not UNSET
    assert UNSET is not None and UNSET != None  # noqa: E711


# =========================================================================== statuses
@pytest.mark.parametrize(("cls", "values"), [
    (RolloutStatus, ["queuing", "preparing", "running", "failed", "succeeded", "cancelled",
                     "requeuing"]),
    (AttemptStatus, ["preparing", "running", "failed", "succeeded", "unresponsive", "timeout"]),
    (RolloutMode, ["train", "val", "test"]),
])
def test_str_enums(cls: Any, values: list[str]) -> None:
    assert [m.value for m in cls] == values
    for value in values:
        member = cls(value)
        assert isinstance(member, str)
        assert member == value and value == member
        assert hash(member) == hash(value)
        assert {value: 1}[member] == 1
        assert str(member) == value and f"{member}" == value
        assert json.dumps(member) == json.dumps(value)
        for protocol in PROTOCOLS:
            assert pickle.loads(pickle.dumps(member, protocol)) is member
    with pytest.raises(ValueError):
        cls("bogus")


def test_rollout_status_predicates() -> None:
    R = RolloutStatus
    assert {s for s in R if s.is_queuing} == {R.QUEUING, R.REQUEUING}
    assert {s for s in R if s.is_running} == {R.PREPARING, R.RUNNING}
    assert {s for s in R if s.is_finished} == {R.FAILED, R.SUCCEEDED, R.CANCELLED}


# =========================================================================== records
def rollout() -> Rollout:
    return Rollout("ro-0123456789ab", {"q": [1, 2]}, 10.0, 12.0, RolloutMode.TRAIN, "rs-1",
                   RolloutStatus.SUCCEEDED, RolloutConfig(5.0, 2.0, 3, [AttemptStatus.FAILED]),
                   {"k": {"nested": True}})


def attempt() -> Attempt:
    return Attempt("ro-0123456789ab", "at-01234567", 2, 11.0, 12.0, AttemptStatus.SUCCEEDED,
                   "worker-1", 11.5, {"m": 1})


def records() -> list[Any]:
    return [
        rollout(),
        Rollout("ro-x", None, 0.0),
        attempt(),
        Attempt("ro-x", "at-y", 1, 0.0),
        AttemptedRollout.of(rollout(), attempt()),
        RolloutConfig(),
        RolloutConfig(None, 1.5, 2, [AttemptStatus.TIMEOUT, AttemptStatus.UNRESPONSIVE]),
        Span("ro-x", "at-y", 3, "llm", attributes={"tokens": 5, "tags": ["a"]},
             events=[{"name": "e", "attributes": {}, "timestamp": 1.0}], start_time=1.0,
             end_time=2.0, parent_id="ab" * 8, context={"trace_id": "1" * 32},
             resource={"attributes": {}, "schema_url": ""}),
        Span("ro-x", "at-y", 0, "bare"),
        ResourcesUpdate("rs-0123456789ab", {"llm": LLM("http://e/v1", "m"),
                                            "p": PromptTemplate("hi {x}")}, 1.0, 2.0, 3),
        LLM("http://e/v1", "m", "key", {"temperature": 0.5}),
        ProxyLLM("http://p/v1", "m"),
        PromptTemplate("{a}", engine="jinja"),
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("index", range(len(records())))
def test_records_round_trip_equal(index: int, protocol: int) -> None:
    record = records()[index]
    back = pickle.loads(pickle.dumps(record, protocol))
    assert type(back) is type(record)
    assert back == record
    assert back is not record


def _enum_fields(record: Any) -> list[Any]:
    """The enum members a record holds, nested records' included."""
    found = []
    for name in type(record)._fields:
        value = getattr(record, name)
        values = value if isinstance(value, list) else [value]
        found += [v for v in values if isinstance(v, enum.Enum)]
        if hasattr(value, "_fields"):
            found += _enum_fields(value)
    return found


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_record_enums_come_back_as_the_members(protocol: int) -> None:
    # Equality alone would not tell: RolloutStatus.RUNNING == "running".
    for record in records():
        back = pickle.loads(pickle.dumps(record, protocol))
        assert [id(m) for m in _enum_fields(back)] == [id(m) for m in _enum_fields(record)]


def test_a_record_pickles_as_one_reference_and_plain_values() -> None:
    # The wire form (types._record): each class or enum member pickled by reference costs
    # ~1 µs each way, so a rollout refers to its loader only, its enums and config inline.
    data = pickle.dumps(AttemptedRollout.of(rollout(), attempt()), pickle.HIGHEST_PROTOCOL)
    references = [arg for op, arg, _ in pickletools.genops(data)
                  if op.name in ("SHORT_BINUNICODE", "BINUNICODE") and "." in str(arg)]
    assert references == ["mpstore.types", "AttemptedRollout._unwire"]
    assert b"RolloutConfig" not in data and b"Status" not in data and b"Mode" not in data


def test_unexpected_field_values_cross_the_wire_as_they_are() -> None:
    odd = Rollout("ro-x", None, 0.0, status="running", mode="bogus",  # type: ignore[arg-type]
                  config=None)  # type: ignore[arg-type]
    back = pickle.loads(pickle.dumps(odd))
    assert back.status is RolloutStatus.RUNNING  # a valid value is read as the member
    assert back.mode == "bogus" and back.config is None
    config = RolloutConfig(retry_condition=("failed",))  # type: ignore[arg-type]
    assert pickle.loads(pickle.dumps(config)).retry_condition == ("failed",)


class _Pickled010:
    """Pickles as mpstore 0.1.0 pickled a record: (_rebuild, (class, field values))."""

    def __init__(self, record: Any) -> None:
        self.record = record

    def __reduce__(self) -> tuple[Any, ...]:
        values = tuple(getattr(self.record, n) for n in type(self.record)._fields)
        return _rebuild, (type(self.record), values)


def test_records_pickled_by_0_1_0_still_load() -> None:
    # Data directories written by 0.1.0 hold records in that form.
    for record in records():
        assert pickle.loads(pickle.dumps(_Pickled010(record))) == record


def test_records_in_containers_round_trip() -> None:
    value = {"records": records(), "unset": UNSET}
    back = pickle.loads(pickle.dumps(value))
    assert back["records"] == value["records"]
    assert back["unset"] is UNSET


def test_record_equality_is_by_value_and_type() -> None:
    assert rollout() == rollout()
    changed = rollout()
    changed.metadata = {"other": 1}
    assert changed != rollout()
    attempted = AttemptedRollout.of(rollout(), attempt())
    assert attempted != rollout()  # a different type
    assert attempted.attempt == attempt()
    assert all(getattr(attempted, f) == getattr(rollout(), f) for f in Rollout._fields)


def test_clone_shares_no_containers() -> None:
    original = AttemptedRollout.of(rollout(), attempt())
    clone = original.clone()
    assert clone == original
    clone.input["q"].append(3)
    clone.metadata["k"]["nested"] = False
    clone.config.retry_condition.append(AttemptStatus.TIMEOUT)
    clone.attempt.metadata["m"] = 2
    assert original == AttemptedRollout.of(rollout(), attempt())
    span = records()[7]
    before = copy.deepcopy(span)
    copy_ = span.clone()
    copy_.attributes["tags"].append("b")
    copy_.events[0]["name"] = "changed"
    copy_.context["trace_id"] = "2" * 32
    assert span == before


def test_config_defaults_are_fresh() -> None:
    a, b = RolloutConfig(), RolloutConfig()
    a.retry_condition.append(AttemptStatus.FAILED)
    assert b.retry_condition == []
    assert (b.timeout_seconds, b.unresponsive_seconds, b.max_attempts) == (None, None, 1)


def test_rollout_defaults() -> None:
    r = Rollout("ro-x", "in", 1.0)
    assert (r.end_time, r.mode, r.resources_id, r.metadata) == (None, None, None, None)
    assert r.status == "queuing" and r.config == RolloutConfig()
    a = Attempt("ro-x", "at-y", 1, 1.0)
    assert a.status == "preparing"
    assert (a.end_time, a.worker_id, a.last_heartbeat_time, a.metadata) == (None,) * 4


def test_attempted_rollout_needs_attempt() -> None:
    with pytest.raises(TypeError):
        AttemptedRollout("ro-x", "in", 1.0)  # type: ignore[call-arg]
    ar = AttemptedRollout("ro-x", "in", 1.0, attempt=Attempt("ro-x", "at-y", 1, 1.0))
    assert ar.attempt.attempt_id == "at-y"


def test_resources_helpers() -> None:
    assert LLM("e", "m").resource_type == "llm"
    proxy = ProxyLLM("http://h:8/v1", "m")
    assert proxy.resource_type == "proxy_llm"
    assert proxy.with_rollout("ro-1", "at-2") == "http://h:8/rollout/ro-1/attempt/at-2/v1"
    assert ProxyLLM("http://h:8", "m").with_rollout("r", "a") == "http://h:8/rollout/r/attempt/a"
    assert PromptTemplate("Hi {name}").format(name="Ann") == "Hi Ann"
    assert PromptTemplate("x").resource_type == "prompt_template"
    with pytest.raises(NotImplementedError):
        PromptTemplate("{{ x }}", engine="jinja").format(x=1)


# =========================================================================== ids
HEX = re.compile(r"^[0-9a-f]+$")


@pytest.mark.parametrize(("make", "prefix", "digits"), [
    (new_rollout_id, "ro-", 12), (new_attempt_id, "at-", 8), (new_resources_id, "rs-", 12),
])
def test_id_formats(make: Any, prefix: str, digits: int) -> None:
    ids = [make() for _ in range(2000)]
    for value in ids:
        assert value.startswith(prefix)
        assert len(value) == len(prefix) + digits
        assert HEX.match(value[len(prefix):])
    assert len(set(ids)) == len(ids)


def test_span_default_ids_are_random_hex() -> None:
    spans = [Span("ro-x", "at-y", i, "s") for i in range(500)]
    for s in spans:
        assert len(s.trace_id) == 32 and HEX.match(s.trace_id)
        assert len(s.span_id) == 16 and HEX.match(s.span_id)
    assert len({s.trace_id for s in spans}) == 500
    assert len({s.span_id for s in spans}) == 500
    given = Span("ro-x", "at-y", 1, "s", trace_id="t", span_id="u")
    assert (given.trace_id, given.span_id) == ("t", "u")


def test_span_defaults() -> None:
    s = Span("ro-x", "at-y", 7, "name")
    assert (s.rollout_id, s.attempt_id, s.sequence_id, s.name) == ("ro-x", "at-y", 7, "name")
    assert s.parent_id is None and s.start_time is None and s.end_time is None
    assert s.context is None and s.parent is None
    assert s.attributes == {} and s.events == [] and s.links == [] and s.resource == {}
    assert s.status == {"status_code": "UNSET"}
    other = Span("ro-x", "at-y", 7, "name")
    other.attributes["x"] = 1
    other.status["status_code"] = "OK"
    assert s.attributes == {} and s.status == {"status_code": "UNSET"}  # fresh containers
