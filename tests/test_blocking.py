"""The server's slices of a blocking call: how long, and how many calls they count."""

from __future__ import annotations

from typing import Any

import pytest

from mpstore.manager import blocking
from mpstore.manager.blocking import (
    BLOCKING_SLICE,
    LONGEST_SLICE,
    SLICE_WAKEUPS,
    slice_seconds,
    sliced,
)


@pytest.mark.parametrize(("waiting", "seconds"), [
    (1, BLOCKING_SLICE),
    (int(SLICE_WAKEUPS), BLOCKING_SLICE),
    (int(SLICE_WAKEUPS * 10), 10.0),
    (int(SLICE_WAKEUPS * LONGEST_SLICE * 10), LONGEST_SLICE),
])
def test_slices_stretch_so_that_all_waiters_wake_at_most_slice_wakeups_a_second(
        waiting: int, seconds: float) -> None:
    assert slice_seconds(waiting) == pytest.approx(seconds)
    # The wake-ups of all waiting calls together, at the most of the policy:
    if seconds < LONGEST_SLICE:
        assert waiting / seconds <= SLICE_WAKEUPS


def _recording(asked: list[float]) -> Any:
    def dequeue_rollout(*, worker_id: str | None = None, wait: float | None = None) -> None:
        asked.append(wait)  # returns at once: the slice had the answer
        return None
    return dequeue_rollout


def test_a_call_that_starts_while_many_wait_gets_a_longer_slice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[float] = []
    sliced(-1, "dequeue_rollout", _recording(asked), (), {"wait": 60.0})
    monkeypatch.setattr(blocking, "_waiting", int(SLICE_WAKEUPS * 10) - 1)
    sliced(-1, "dequeue_rollout", _recording(asked), (), {"wait": 60.0})
    assert asked == [BLOCKING_SLICE, pytest.approx(10.0)]
    assert blocking._waiting == int(SLICE_WAKEUPS * 10) - 1  # itself no longer counted


def test_a_call_that_fails_is_no_longer_counted() -> None:
    before = blocking._waiting

    def broken(**_: Any) -> None:
        raise ValueError("broken")

    with pytest.raises(ValueError):
        sliced(-1, "dequeue_rollout", broken, (), {"wait": 60.0})
    assert blocking._waiting == before


def test_a_waiting_calls_slices_stretch_as_more_calls_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first of many long-pollers must not keep the short slice it started with: the
    slice is asked for again before each one (in_slices' own test: tests/test_api.py)."""
    seen: dict[str, Any] = {}

    def in_slices(wait: Any, call: Any, kwargs: Any, longest: Any, between: Any) -> str:
        seen["first"] = longest()
        monkeypatch.setattr(blocking, "_waiting", int(SLICE_WAKEUPS * 10))  # many more now
        seen["later"] = longest()
        return "answer"

    monkeypatch.setattr(blocking, "in_slices", in_slices)
    assert sliced(-1, "wait_for_rollouts", lambda **_: None, (),
                  {"rollout_ids": ["ro-1"], "timeout": None}) == "answer"
    assert seen == {"first": BLOCKING_SLICE, "later": pytest.approx(10.0)}
