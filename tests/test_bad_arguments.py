"""Bad arguments through the wire (issue 5): for every method of the client, Hypothesis makes
one or more arguments wrong (a wrong type, a value out of range, an unknown id for a write, a
batch with one bad item, something that cannot be pickled) and keeps the others valid.

Each call must raise a ``StoreError`` subclass whose message names what was wrong, and leave
the store exactly as it was (D1): statistics (minus uptime), every rollout and every attempt.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpstore import InvalidArgument, Span, StoreClient, StoreError
from mpstore.api import SERVED as REMOTE_METHODS
from tests.remote import running_server

# Per method (~20 methods): a few seconds in all; MPSTORE_STRESS=1 tries ten times as many.
EXAMPLES = 500 if os.environ.get("MPSTORE_STRESS") == "1" else 50

# ----------------------------------------------------------------------------- junk
_small_text = st.text(max_size=6)
UNPICKLABLE = st.sampled_from([threading.Lock(), lambda: None, (i for i in range(1))])
NOT_STR = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.binary(max_size=6),
    st.lists(st.integers(), max_size=2), st.dictionaries(_small_text, st.integers(), max_size=2),
    st.tuples(_small_text), st.frozensets(st.integers(), max_size=2), UNPICKLABLE,
)
NOT_LIST = st.one_of(_small_text, st.integers(), st.floats(), st.just(3j),
                     st.dictionaries(_small_text, _small_text, max_size=2), UNPICKLABLE)
NOT_NUMBER = st.one_of(_small_text, st.just(math.nan), st.booleans(), st.just(1j),
                       st.lists(st.integers(), max_size=2), st.binary(max_size=4), UNPICKLABLE)
NOT_DICT = st.one_of(_small_text.filter(bool), st.integers(), st.floats(),
                     st.lists(st.integers(), min_size=1, max_size=2), UNPICKLABLE)


def not_enum(values: set[str]) -> st.SearchStrategy[Any]:
    return st.one_of(_small_text.filter(lambda s: s not in values),
                     NOT_STR.filter(lambda x: not isinstance(x, str)))


ROLLOUT_STATUSES = {"queuing", "preparing", "running", "failed", "succeeded", "cancelled",
                    "requeuing"}
ATTEMPT_STATUSES = {"preparing", "running", "failed", "succeeded", "unresponsive", "timeout"}
UNKNOWN_ROLLOUT = st.from_regex(r"ro-[0-9a-f]{12}", fullmatch=True)
UNKNOWN_ATTEMPT = st.from_regex(r"at-[0-9a-f]{8}", fullmatch=True)

BAD_CONFIG = st.one_of(
    NOT_DICT,
    st.fixed_dictionaries({"max_attempts": st.one_of(st.integers(max_value=0), st.floats(),
                                                     st.booleans(), _small_text)}),
    st.fixed_dictionaries({"retry_condition": st.one_of(
        _small_text, st.integers(), st.lists(not_enum(ATTEMPT_STATUSES), min_size=1,
                                             max_size=2))}),
    st.fixed_dictionaries({"timeout_seconds": NOT_NUMBER}),
    st.fixed_dictionaries({"unresponsive_seconds": NOT_NUMBER}),
    st.dictionaries(_small_text.filter(lambda k: k not in {
        "timeout_seconds", "unresponsive_seconds", "max_attempts", "retry_condition"}),
        st.integers(), min_size=1, max_size=2),
)
BAD_RESOURCES = st.one_of(
    NOT_DICT,
    st.dictionaries(st.integers(), st.just({"resource_type": "llm", "endpoint": "e",
                                            "model": "m"}), min_size=1, max_size=1),
    st.dictionaries(_small_text, st.one_of(st.integers(), _small_text,
                                           st.just({"resource_type": "nope"}),
                                           st.just({"resource_type": "llm", "bogus": 1})),
                    min_size=1, max_size=2),
)
BAD_PAIRS = st.one_of(
    NOT_LIST,
    st.lists(st.one_of(st.tuples(_small_text), st.tuples(st.integers(), _small_text),
                       st.tuples(_small_text, _small_text, _small_text), _small_text,
                       st.integers()), min_size=1, max_size=3),
)
BAD_ID_LIST = st.one_of(NOT_LIST, st.lists(NOT_STR.filter(lambda x: not isinstance(x, str)),
                                           min_size=1, max_size=2))
BAD_STATUS_FILTER = st.one_of(NOT_LIST, st.lists(not_enum(ROLLOUT_STATUSES), min_size=1,
                                                 max_size=2))


class Seeded:
    """The store's known records, which the valid arguments refer to."""

    def __init__(self, client: StoreClient) -> None:
        self.queued = client.enqueue_rollout({"q": "queued"}).rollout_id
        running = client.start_rollout({"q": "running"}, worker_id="w0")
        self.rid, self.aid = running.rollout_id, running.attempt.attempt_id
        client.add_span(Span(self.rid, self.aid, 1, "seed"))
        self.resources_id = client.add_resources(
            {"llm": {"resource_type": "llm", "endpoint": "http://x", "model": "m"}}
        ).resources_id
        self.count = 0

    def span(self) -> Span:
        self.count += 1
        return Span(self.rid, self.aid, 100 + self.count, "ok", span_id=f"{self.count:016x}")


def bad_spans(seed: Seeded) -> st.SearchStrategy[Any]:
    def broken(field: str, value: Any) -> Any:
        span = Span(seed.rid, seed.aid, 1, "bad")
        setattr(span, field, value)
        return span

    return st.one_of(
        NOT_DICT,
        st.builds(broken, st.sampled_from(["rollout_id", "attempt_id", "name", "span_id",
                                           "trace_id"]), NOT_STR),
        st.builds(broken, st.just("sequence_id"),
                  st.one_of(st.integers(max_value=-1), st.floats(), _small_text)),
        st.builds(broken, st.sampled_from(["attributes", "status", "resource"]),
                  st.one_of(st.lists(st.integers(), max_size=1), st.integers(), _small_text)),
        st.builds(broken, st.sampled_from(["start_time", "end_time"]), NOT_NUMBER),
        st.builds(broken, st.just("rollout_id"), UNKNOWN_ROLLOUT),
        st.builds(broken, st.just("attempt_id"), UNKNOWN_ATTEMPT),
        st.fixed_dictionaries({"rollout_id": st.just(seed.rid), "bogus": st.integers()}),
    )


def bad_requests(seed: Seeded) -> st.SearchStrategy[Any]:
    bad_item = st.one_of(
        NOT_DICT,
        st.fixed_dictionaries({"mode": st.just("x")}),  # no input
        st.fixed_dictionaries({"input": st.just(1), "bogus": st.integers()}),
        st.fixed_dictionaries({"input": st.just(1), "config": BAD_CONFIG}),
        st.fixed_dictionaries({"input": st.just(1), "metadata": NOT_DICT}),
        st.fixed_dictionaries({"input": UNPICKLABLE}),
    )
    # A good item first: a batch is validated whole, so it must not be stored either.
    return st.one_of(NOT_LIST, st.lists(bad_item, min_size=1, max_size=2).map(
        lambda items: [{"input": {"good": True}}, *items]))


# ----------------------------------------------------------------------------- the table
Param = tuple[Callable[[Seeded], Any], Callable[[Seeded], st.SearchStrategy[Any]]]


def _const(value: Any) -> Callable[[Seeded], Any]:
    return lambda seed: value


def _junk(strategy: st.SearchStrategy[Any]) -> Callable[[Seeded], st.SearchStrategy[Any]]:
    return lambda seed: strategy


RID: Param = (lambda s: s.rid, _junk(NOT_STR))  # reads: an unknown str id is not an error
RID_WRITE: Param = (lambda s: s.rid, _junk(st.one_of(NOT_STR, UNKNOWN_ROLLOUT)))
AID_WRITE: Param = (lambda s: s.aid, _junk(st.one_of(NOT_STR, UNKNOWN_ATTEMPT)))
WORKER: Param = (_const("w1"), _junk(NOT_STR))
OPT_STR: Param = (_const(None), _junk(NOT_STR))
MODE: Param = (_const(None), _junk(not_enum({"train", "val", "test"}).filter(
    lambda x: x is not None)))
CONFIG: Param = (_const(None), _junk(BAD_CONFIG))
METADATA: Param = (_const(None), _junk(NOT_DICT))
INPUT: Param = (_const({"x": 1}), _junk(UNPICKLABLE))
WAIT: Param = (_const(0.0), _junk(NOT_NUMBER))
CHOSEN_ID: Param = (_const(None), _junk(st.one_of(
    NOT_STR, st.sampled_from(["", "a b", "tab\tin", "x" * 257]))))
COUNT: Param = (_const(0), _junk(st.one_of(st.integers(max_value=-1), st.floats(), _small_text,
                                           st.booleans(), st.none())))

LIMIT: Param = (_const(-1), _junk(st.one_of(st.integers(max_value=-2), st.floats(), _small_text,
                                            st.booleans())))
OFFSET: Param = (_const(0), _junk(st.one_of(st.integers(max_value=-1), st.floats(), _small_text,
                                           st.booleans(), st.none())))
ORDER: Param = (_const("asc"), _junk(not_enum({"asc", "desc"})))
LOGIC: Param = (_const("and"), _junk(not_enum({"and", "or"})))
NOT_BOOL: Param = (_const(False), _junk(st.one_of(st.integers(), _small_text, st.none())))
OPT_TEXT: Param = (_const(None), _junk(NOT_STR.filter(lambda x: not isinstance(x, str))))


def sort_by(fields: set[str]) -> Param:
    return (_const(None), _junk(not_enum(fields).filter(lambda x: x is not None)))


WORKER_STATUSES = {"idle", "busy", "unknown"}
BAD_WORKER_FILTER = st.one_of(NOT_LIST, st.lists(not_enum(WORKER_STATUSES), min_size=1,
                                                 max_size=2))
SPAN_FILTERS = {f"{field}{suffix}": OPT_TEXT for field in ("trace_id", "span_id", "parent_id",
                                                           "name") for suffix in ("", "_contains")}

#: method -> parameter -> (valid value, strategy of wrong ones).
TABLE: dict[str, dict[str, Param]] = {
    "add_many_spans": {"spans": (lambda s: [s.span()], lambda s: st.one_of(
        NOT_LIST, st.lists(bad_spans(s), min_size=1, max_size=2).map(
            lambda bad: [s.span(), *bad])))},
    "add_resources": {"resources": (_const({}), _junk(BAD_RESOURCES))},
    "add_span": {"span": (lambda s: s.span(), bad_spans)},
    "dequeue_many_rollouts": {
        "limit": (_const(1), _junk(st.one_of(st.integers(max_value=-1), st.floats(),
                                              _small_text, st.booleans(), st.none()))),
        "worker_id": WORKER, "wait": WAIT},
    "dequeue_rollout": {"worker_id": WORKER, "wait": WAIT},
    "enqueue_many_rollouts": {"requests": (_const([{"input": 1}]), bad_requests)},
    "enqueue_rollout": {"input": INPUT, "mode": MODE, "resources_id": OPT_STR,
                        "config": CONFIG, "metadata": METADATA, "rollout_id": CHOSEN_ID},
    "delete_rollouts": {"rollout_ids": (_const(["ro-unknown"]), _junk(BAD_ID_LIST))},
    "finished_rollouts": {"after": COUNT, "limit": (_const(10), COUNT[1]), "wait": WAIT},
    "get_latest_attempt": {"rollout_id": RID},
    "get_many_span_sequence_ids": {"pairs": (lambda s: [(s.rid, s.aid)], _junk(BAD_PAIRS))},
    "get_next_span_sequence_id": {"rollout_id": RID, "attempt_id": (lambda s: s.aid,
                                                                    _junk(NOT_STR))},
    "get_resources_by_id": {"resources_id": (lambda s: s.resources_id, _junk(NOT_STR))},
    "get_rollout_by_id": {"rollout_id": RID},
    "query_attempts": {"rollout_id": RID,
                       "sort_by": (_const("sequence_id"), _junk(not_enum({"sequence_id"}).filter(
                           lambda x: x is not None))),
                       "sort_order": ORDER, "limit": LIMIT, "offset": OFFSET},
    "query_rollouts": {"status": (_const(None), _junk(BAD_STATUS_FILTER)),
                       "rollout_ids": (_const(None), _junk(BAD_ID_LIST)),
                       "status_in": (_const(None), _junk(BAD_STATUS_FILTER)),
                       "rollout_id_in": (_const(None), _junk(BAD_ID_LIST)),
                       "rollout_id_contains": OPT_TEXT, "filter_logic": LOGIC,
                       "sort_by": sort_by({"rollout_id", "start_time", "status"}),
                       "sort_order": ORDER, "limit": LIMIT, "offset": OFFSET,
                       "with_latest_attempt": NOT_BOOL},
    "query_spans": {"rollout_id": RID, "attempt_id": OPT_STR, **SPAN_FILTERS,
                    "filter_logic": LOGIC, "limit": LIMIT, "offset": OFFSET,
                    "sort_by": (_const("sequence_id"), _junk(not_enum({"sequence_id", "name"}))),
                    "sort_order": ORDER},
    "add_otel_span": {"rollout_id": RID_WRITE, "attempt_id": AID_WRITE,
                      "readable_span": (lambda s: s.span(), _junk(st.one_of(
                          st.integers(), _small_text, st.none(), UNPICKLABLE))),
                      "sequence_id": (_const(None), _junk(st.one_of(
                          st.integers(max_value=-1), st.floats(), _small_text,
                          st.booleans())))},
    "query_resources": {"resources_id": OPT_TEXT, "resources_id_contains": OPT_TEXT,
                        "sort_by": sort_by({"resources_id", "version"}), "sort_order": ORDER,
                        "limit": LIMIT, "offset": OFFSET},
    "query_workers": {"status_in": (_const(None), _junk(BAD_WORKER_FILTER)),
                      "worker_id_contains": OPT_TEXT, "filter_logic": LOGIC,
                      "sort_by": sort_by({"worker_id", "status"}), "sort_order": ORDER,
                      "limit": LIMIT, "offset": OFFSET},
    "get_worker_by_id": {"worker_id": (_const("w0"), _junk(NOT_STR))},
    "update_worker": {"worker_id": (_const("w0"), _junk(NOT_STR)),
                      "heartbeat_stats": (_const({}), _junk(NOT_DICT))},
    "start_attempt": {"rollout_id": RID_WRITE, "worker_id": WORKER},
    "start_rollout": {"input": INPUT, "mode": MODE, "resources_id": OPT_STR, "config": CONFIG,
                      "metadata": METADATA, "worker_id": WORKER, "rollout_id": CHOSEN_ID},
    "update_attempt": {"rollout_id": RID_WRITE, "attempt_id": AID_WRITE,
                       "status": (_const("running"), _junk(not_enum(ATTEMPT_STATUSES))),
                       "worker_id": WORKER,
                       "last_heartbeat_time": (_const(None), _junk(NOT_NUMBER)),
                       "metadata": METADATA},
    "update_resources": {"resources_id": (lambda s: s.resources_id, _junk(NOT_STR)),
                         "resources": (_const({}), _junk(BAD_RESOURCES))},
    "update_rollout": {"rollout_id": RID_WRITE, "input": INPUT, "mode": MODE,
                       "resources_id": OPT_STR,
                       "status": (_const("running"), _junk(not_enum(ROLLOUT_STATUSES))),
                       "config": CONFIG, "metadata": METADATA},
    "wait_for_rollouts": {"rollout_ids": (lambda s: [s.rid], _junk(BAD_ID_LIST)),
                          "timeout": (_const(0.0), _junk(NOT_NUMBER))},
}
#: Methods that take no argument: nothing to get wrong.
NO_ARGUMENTS = {"get_latest_resources", "ping", "run_watchdog", "statistics"}


def test_the_table_covers_every_method_and_parameter() -> None:
    assert set(TABLE) | NO_ARGUMENTS == set(REMOTE_METHODS)
    for name in REMOTE_METHODS:
        params = [p for p in inspect.signature(getattr(StoreClient, name)).parameters
                  if p != "self"]
        assert set(TABLE.get(name, {})) == set(params), name


# ----------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StoreClient, Seeded]]:
    tmp = Path(tmp_path_factory.mktemp("bad-arguments"))
    with running_server(tmp) as server, server.connect() as client:
        yield client, Seeded(client)


def snapshot(client: StoreClient) -> Any:
    stats = client.statistics()
    # Clocks, and what counts since the process started (calls, commits).
    for moving in ("uptime", "time", "server", "since_start", "commits"):
        stats.pop(moving, None)
    rollouts = client.query_rollouts()
    return (stats, rollouts, [client.query_attempts(r.rollout_id) for r in rollouts],
            client.get_latest_resources())


#: Words of a message that says what was wrong (an argument, a field or a record).
ACTIONABLE = ("must", "Invalid", "not found", "Unknown", "unknown", "has no", "pickl",
              "takes a list", "No attempts", "unexpected keyword")


@pytest.mark.parametrize("method", sorted(TABLE))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_wrong_arguments_raise_store_errors_and_change_nothing(
        seeded: tuple[StoreClient, Seeded], method: str, data: st.DataObject) -> None:
    client, seed = seeded
    params = TABLE[method]
    wrong = data.draw(st.sets(st.sampled_from(sorted(params)), min_size=1), label="wrong")
    kwargs = {name: data.draw(bad(seed), label=name) if name in wrong else valid(seed)
              for name, (valid, bad) in params.items()}
    before = snapshot(client)
    with pytest.raises(StoreError) as info:
        getattr(client, method)(**kwargs)
    message = str(info.value)
    assert any(word in message for word in ACTIONABLE), message
    assert snapshot(client) == before


def test_extreme_valid_waits_cross_the_wire(seeded: tuple[StoreClient, Seeded]) -> None:
    # Valid, if odd: the client must not choke on them computing its reply timeout.
    client, _ = seeded
    for wait in (math.inf, 1e300, 10**30):
        rollout = client.enqueue_rollout({"q": "extreme"})
        claimed = client.dequeue_many_rollouts(100, worker_id="w", wait=wait)
        assert rollout.rollout_id in [c.rollout_id for c in claimed]
        client.update_attempt(rollout.rollout_id, "latest", status="succeeded")
        done = client.wait_for_rollouts(rollout_ids=[rollout.rollout_id], timeout=wait)
        assert [r.status for r in done] == ["succeeded"]


@pytest.mark.parametrize("value", ["", 0, {}, False, b""])
def test_falsy_wrong_retry_conditions_are_refused(seeded: tuple[StoreClient, Seeded],
                                                  value: Any) -> None:
    # Found by the stress run: "" (or 0) was read as "no retries" instead of refused.
    client, _ = seeded
    before = snapshot(client)
    with pytest.raises(InvalidArgument, match="retry_condition"):
        client.enqueue_rollout({"q": 1}, config={"retry_condition": value})
    assert snapshot(client) == before
