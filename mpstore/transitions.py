"""Pure status logic: what a rollout or attempt becomes after an event. No locks, no I/O, no
clock: callers pass ``now`` in and apply the verdicts.

The tables below are agent-lightning's status machine (REF §2) with mpstore's deliberate
differences (SPEC D2-D4, D12). ``store.py`` is the only caller; the state-machine tests keep a
separate, naive model to check both.
"""

from __future__ import annotations

import math
from typing import Protocol

from .types import Attempt, AttemptStatus, RolloutConfig, RolloutStatus

__all__ = [
    "QUEUED",
    "TERMINAL",
    "WATCHED",
    "Timed",
    "WatchdogVerdict",
    "next_check_time",
    "propagate",
    "span_attempt_status",
    "span_revives_rollout",
    "watchdog_verdict",
]

A, R = AttemptStatus, RolloutStatus

#: Rollout statuses that must be in the queue (and only those are).
QUEUED = frozenset({R.QUEUING, R.REQUEUING})
#: Rollout statuses the watchdog looks at (REF §2.4).
WATCHED = frozenset({R.PREPARING, R.RUNNING})
#: Rollout statuses that stamp ``end_time`` and release waiters.
TERMINAL = frozenset({R.FAILED, R.SUCCEEDED, R.CANCELLED})
#: Attempt statuses that stamp the attempt's ``end_time`` (REF: not timeout/unresponsive).
ATTEMPT_ENDED = frozenset({A.FAILED, A.SUCCEEDED})
#: Attempt outcomes that may be retried when listed in ``retry_condition``.
_RETRYABLE = frozenset({A.FAILED, A.TIMEOUT, A.UNRESPONSIVE})

#: P for the attempt statuses that map one to one (REF §2.2).
_DIRECT = {A.PREPARING: R.PREPARING, A.RUNNING: R.RUNNING, A.SUCCEEDED: R.SUCCEEDED}

#: What a span does to its attempt's status (REF E7): revive preparing/unresponsive to running,
#: leave the others (timeout stays timeout: a late span is a heartbeat, not a resurrection).
_SPAN_ATTEMPT = {A.PREPARING: A.RUNNING, A.UNRESPONSIVE: A.RUNNING}

#: Attempt statuses from which a span on the latest attempt revives the rollout (D4).
_REVIVING_ATTEMPT = frozenset({A.PREPARING, A.RUNNING, A.UNRESPONSIVE})
#: Rollout statuses that a reviving span moves to running (E7; terminal ones are left alone).
_REVIVABLE_ROLLOUT = frozenset({R.QUEUING, R.REQUEUING, R.PREPARING})


def propagate(attempt: Attempt, config: RolloutConfig) -> RolloutStatus:
    """P(attempt, config): the rollout status that the latest attempt's status implies.

    A retryable outcome requeues only while ``attempt.sequence_id < max_attempts`` (the
    sequence number, not the number of attempts, is compared, as in REF).
    """
    direct = _DIRECT.get(attempt.status)
    if direct is not None:
        return direct
    if (
        attempt.status in _RETRYABLE
        and attempt.status in config.retry_condition
        and attempt.sequence_id < config.max_attempts
    ):
        return R.REQUEUING
    return R.FAILED


def span_attempt_status(status: AttemptStatus) -> AttemptStatus:
    """The attempt status after one of its spans arrives."""
    return _SPAN_ATTEMPT.get(status, status)


def span_revives_rollout(
    rollout_status: RolloutStatus, attempt_status: AttemptStatus, is_latest: bool
) -> bool:
    """True when a span on this attempt moves the rollout to running (and out of the queue).

    D4: only the latest attempt, and only while it is preparing, running or unresponsive; a span
    on a timed-out or finished attempt is just a heartbeat. Terminal rollouts are never moved
    by a span (that also keeps ``cancelled`` sticky, D2).
    """
    return (
        is_latest
        and attempt_status in _REVIVING_ATTEMPT
        and rollout_status in _REVIVABLE_ROLLOUT
    )


class WatchdogVerdict:
    """The outcome of one watchdog look at a watched rollout's latest attempt.

    ``attempt_status`` is the attempt's new status (None: unchanged); ``propagate`` says the
    rollout must be re-derived with P afterwards.
    """

    __slots__ = ("attempt_status", "propagate")

    def __init__(self, attempt_status: AttemptStatus | None, propagate: bool) -> None:
        self.attempt_status = attempt_status
        self.propagate = propagate

    def __repr__(self) -> str:
        return f"WatchdogVerdict({self.attempt_status!r}, propagate={self.propagate})"


_NOTHING = WatchdogVerdict(None, False)
_REPAIR = WatchdogVerdict(None, True)
_TIMEOUT = WatchdogVerdict(A.TIMEOUT, True)
_UNRESPONSIVE = WatchdogVerdict(A.UNRESPONSIVE, True)
_PROMOTE = WatchdogVerdict(A.RUNNING, True)


class Timed(Protocol):
    """What the watchdog rules read of an attempt: its status and its times, in whichever
    clock ``now`` is given in (the state passes monotonic times; see mpstore.sections)."""

    @property
    def status(self) -> AttemptStatus: ...
    @property
    def start_time(self) -> float: ...
    @property
    def last_heartbeat_time(self) -> float | None: ...


def watchdog_verdict(attempt: Timed, config: RolloutConfig, now: float) -> WatchdogVerdict:
    """REF §2.4 rules 1-4 for the latest attempt of a preparing/running rollout; first match wins.

    1. repair: a finished attempt re-derives the rollout;
    2. timeout: ``now - start_time > timeout_seconds`` (strict; also re-applies to an attempt
       that already timed out);
    3. with a heartbeat: a preparing attempt is promoted to running, then goes unresponsive
       if ``now - last_heartbeat_time > unresponsive_seconds``;
    4. never a heartbeat: unresponsive once ``now - start_time > unresponsive_seconds``.
    A heartbeat time of 0.0 counts as none, as in REF.
    """
    if attempt.status in ATTEMPT_ENDED:
        return _REPAIR
    timeout = config.timeout_seconds
    if timeout is not None and now - attempt.start_time > timeout:
        return _TIMEOUT
    silence = config.unresponsive_seconds
    heartbeat = attempt.last_heartbeat_time
    if heartbeat:
        if silence is not None and now - heartbeat > silence:
            return _UNRESPONSIVE
        return _PROMOTE if attempt.status is A.PREPARING else _NOTHING
    if silence is not None and now - attempt.start_time > silence:
        return _UNRESPONSIVE
    return _NOTHING


def next_check_time(attempt: Timed, config: RolloutConfig) -> float | None:
    """The earliest time at which :func:`watchdog_verdict` could stop returning "nothing".

    ``-inf`` means "look now" (rules 1 and 3a need no time to pass); None means "never, unless
    the attempt or config changes". The store keeps one heap entry per watched rollout keyed by
    this, so a watchdog pass costs O(rollouts due), not O(rollouts running).
    """
    if attempt.status in ATTEMPT_ENDED:
        return -math.inf
    candidates: list[float] = []
    heartbeat = attempt.last_heartbeat_time
    if heartbeat and attempt.status is A.PREPARING:
        return -math.inf
    if config.timeout_seconds is not None:
        candidates.append(attempt.start_time + config.timeout_seconds)
    if config.unresponsive_seconds is not None:
        since = heartbeat if heartbeat else attempt.start_time
        candidates.append(since + config.unresponsive_seconds)
    return min(candidates) if candidates else None
