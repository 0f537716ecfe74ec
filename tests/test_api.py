"""The call table (``mpstore.api``): it matches the store, the transport follows it, and a
process that only connects depends on it rather than on the store."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mpstore import InMemoryStore, Rollout, RolloutStatus, StoreClient
from mpstore.api import (
    BLOCKING,
    CALLS,
    MUTATING,
    PACKED,
    RETRIED,
    SERVED,
    Packed,
    Wait,
    in_slices,
)
from tests.conftest import FakeClock
from tests.remote import running_server


def public_methods(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))}


# --------------------------------------------------------------------------- the table
def test_one_row_per_public_method_of_the_store() -> None:
    # A new store method without a row (or a row without a method) fails here.
    assert set(CALLS) == public_methods(InMemoryStore)
    assert set(SERVED) == {name for name, call in CALLS.items() if call.served}
    assert set(SERVED) == public_methods(InMemoryStore) - {"close", "deferred_commits", "once"}
    # The client has exactly the served methods (and its own close()).
    assert public_methods(StoreClient) == set(SERVED) | {"close"}


def test_a_wait_is_the_stores_keyword_only_argument_with_its_default() -> None:
    assert set(BLOCKING) == {"dequeue_many_rollouts", "dequeue_rollout", "finished_rollouts",
                             "wait_for_rollouts"}
    for name, wait in BLOCKING.items():
        parameter = inspect.signature(getattr(InMemoryStore, name)).parameters[wait.keyword]
        # Keyword-only: the transport finds it in the call's kwargs, never among positionals.
        assert parameter.kind is parameter.KEYWORD_ONLY, name
        assert parameter.default == wait.default, name


def test_packed_calls_take_records_first() -> None:
    assert set(PACKED) == {"add_span", "add_many_spans"}
    for name, (record, many) in PACKED.items():
        first = list(inspect.signature(getattr(InMemoryStore, name)).parameters)[1]
        assert first == ("spans" if many else "span"), name
        assert hasattr(record, "_wire") and hasattr(record, "_unwire")
        assert CALLS[name].packed == Packed(record, many)


def test_reads_are_retried_and_unsafe_writes_are_not() -> None:
    for name in SERVED:
        if name not in MUTATING:
            assert name in RETRIED, f"{name} is a read: sending it again is always safe"
    # Writes that are sent again only because they are idempotent (D7; a delete of what is
    # gone does nothing) or a heartbeat (update_worker stamps the time again), and nothing
    # else: a resent sequence id, claim or create would apply twice.
    assert RETRIED & MUTATING == {"add_span", "add_many_spans", "delete_rollouts",
                                  "update_worker"}
    assert {"get_next_span_sequence_id", "get_many_span_sequence_ids", "dequeue_rollout",
            "enqueue_rollout", "run_watchdog"} <= MUTATING


def rollout(rid: str) -> Rollout:
    return Rollout(rollout_id=rid, input=None, start_time=0.0, status=RolloutStatus.SUCCEEDED)


@pytest.mark.parametrize(("name", "result", "kwargs", "done"), [
    ("dequeue_rollout", None, {}, False),
    ("dequeue_rollout", object(), {}, True),
    ("dequeue_many_rollouts", [], {}, False),
    ("dequeue_many_rollouts", [object()], {}, True),
    ("wait_for_rollouts", [rollout("a")], {"rollout_ids": ["a", "b"]}, False),
    ("wait_for_rollouts", [rollout("b"), rollout("a")], {"rollout_ids": ["a", "b"]}, True),
    ("wait_for_rollouts", [], {"rollout_ids": []}, True),
])
def test_when_a_slice_has_the_answer(name: str, result: Any, kwargs: dict[str, Any],
                                     done: bool) -> None:
    assert BLOCKING[name].done(result, kwargs) is done


# --------------------------------------------------------------------------- slices
class SlowCall:
    """A blocking call that uses its whole wait (on a fake clock) and answers ``answers`` in
    turn; records the wait each slice was given."""

    def __init__(self, clock: FakeClock, answers: list[Any]) -> None:
        self.clock, self.answers, self.waits = clock, answers, []

    def __call__(self, kwargs: dict[str, Any]) -> Any:
        self.waits.append(kwargs["wait"])
        self.clock.advance(kwargs["wait"])
        return self.answers.pop(0)


def test_a_long_wait_is_cut_into_slices_that_end_at_the_answer() -> None:
    clock = FakeClock()
    wait = BLOCKING["dequeue_many_rollouts"]
    call = SlowCall(clock, [[], [], ["claimed"], ["never asked"]])
    checks: list[float] = []
    result = in_slices(wait, call, {"wait": 10.0}, 3.0, lambda: checks.append(clock()),
                       clock=clock)
    assert result == ["claimed"]
    assert call.waits == [3.0, 3.0, 3.0]
    assert len(checks) == 2  # between slices only


def test_the_last_slice_waits_for_what_is_left() -> None:
    clock = FakeClock()
    call = SlowCall(clock, [[], [], []])
    assert in_slices(BLOCKING["dequeue_many_rollouts"], call, {"wait": 7.0}, 3.0,
                     clock=clock) == []
    assert call.waits == [3.0, 3.0, 1.0]


def test_an_unbounded_wait_slices_until_done() -> None:
    clock = FakeClock()
    wait = Wait("wait", None, lambda result, kwargs: result == "done")
    call = SlowCall(clock, ["no"] * 5 + ["done"])
    assert in_slices(wait, call, {}, 2.0, clock=clock) == "done"
    assert call.waits == [2.0] * 6


def test_a_slice_length_given_as_a_function_is_asked_before_every_slice() -> None:
    clock = FakeClock()
    wait = Wait("wait", None, lambda result, kwargs: result == "done")
    call = SlowCall(clock, ["no", "no", "no", "done"])
    lengths = iter([1.0, 2.0, 4.0, 4.0])
    assert in_slices(wait, call, {}, lambda: next(lengths), clock=clock) == "done"
    assert call.waits == [1.0, 2.0, 4.0, 4.0]


def test_a_slice_that_returns_early_has_the_answer() -> None:
    clock = FakeClock()
    waits: list[float] = []

    def early(kwargs: dict[str, Any]) -> list[Any]:
        waits.append(kwargs["wait"])
        clock.advance(0.5)  # the store returned before the slice's time was up
        return []

    assert in_slices(BLOCKING["dequeue_many_rollouts"], early, {"wait": 10.0}, 3.0,
                     clock=clock) == []
    assert waits == [3.0]


@pytest.mark.parametrize(("wait", "longer"), [
    (None, True), (5.0, True), (2, False), (0.0, False), (-1.0, False), (float("nan"), False),
    (True, False), ("5", False),
])
def test_which_waits_are_sliced(wait: Any, longer: bool) -> None:
    assert BLOCKING["dequeue_rollout"].longer_than({"wait": wait}, 2.0) is longer


# --------------------------------------------------------------------------- the client
CLIENT_ONLY = r"""
import json, sys

WATCHED = ("fcntl", "sqlite3")
importers = {}


class Spy:
    # Records which module imports a watched one (the first frame outside importlib).
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED and name not in importers:
            frame = sys._getframe(1)
            while frame and frame.f_globals.get("__name__", "").startswith("importlib"):
                frame = frame.f_back
            importers[name] = frame.f_globals.get("__name__") if frame else None
        return None


sys.meta_path.insert(0, Spy())
from mpstore import Span, connect

store = connect(sys.argv[1], open(sys.argv[2], "rb").read().strip(), timeout=5.0)
store.ping()
rid = store.enqueue_rollout({"q": 1}).rollout_id
claimed = store.dequeue_rollout(wait=1.0)
seq = store.get_next_span_sequence_id(rid, claimed.attempt.attempt_id)
store.add_span(Span(rollout_id=rid, attempt_id=claimed.attempt.attempt_id, sequence_id=seq,
                    trace_id="t", span_id="s", parent_id=None, name="n", start_time=0.0))
store.update_attempt(rid, claimed.attempt.attempt_id, status="succeeded")
finished = store.wait_for_rollouts(rollout_ids=[rid], timeout=5.0)
loaded = sorted(m for m in sys.modules if m.startswith(("mpstore", "sqlite3"))
                or m == "fcntl")
import inspect

signature = str(inspect.signature(store.add_span))  # imports the store, on purpose
print(json.dumps({"loaded": loaded, "importers": importers, "finished": len(finished),
                  "signature": signature, "store_now": "mpstore.store" in sys.modules}))
"""


def test_a_process_that_only_connects_does_not_load_the_store(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        out = subprocess.run([sys.executable, "-c", CLIENT_ONLY, server.address,
                              str(tmp_path / "authkey")], capture_output=True, text=True,
                             timeout=60, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["finished"] == 1
    loaded = set(report["loaded"])
    assert not loaded & {"mpstore.store", "mpstore.state", "mpstore.durable", "sqlite3",
                         "mpstore.manager.server", "mpstore.manager.loop"}, loaded
    assert "mpstore.api" in loaded
    # fcntl: the standard library's subprocess imports it for multiprocessing.connection,
    # which the client needs for the manager's handshake; mpstore itself must not.
    importer = report["importers"].get("fcntl")
    assert importer is None or not importer.startswith("mpstore"), importer
    # Introspection still shows the store's signature, importing the store only then.
    assert report["signature"] == str(inspect.signature(InMemoryStore.add_span).replace(
        parameters=list(inspect.signature(InMemoryStore.add_span).parameters.values())[1:]))
    assert report["store_now"] is True
