"""A small, naive reference model of the rollout/attempt status machine (SPEC §3, REF §2).

Written independently of ``mpstore.transitions``/``mpstore.state`` and deliberately simple:
lists instead of indexes, a full scan for the watchdog, the rules spelt out as REF states them
(with mpstore's D2-D4, D7, D12). The state-machine tests compare the real store to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

QUEUED = ("queuing", "requeuing")
WATCHED = ("preparing", "running")
TERMINAL = ("failed", "succeeded", "cancelled")
ATTEMPT_ENDED = ("failed", "succeeded")


@dataclass
class MAttempt:
    attempt_id: str
    sequence_id: int
    start_time: float
    status: str = "preparing"
    end_time: float | None = None
    heartbeat: float | None = None


@dataclass
class MConfig:
    timeout: float | None = None
    unresponsive: float | None = None
    max_attempts: int = 1
    retry: tuple[str, ...] = ()


@dataclass
class MRollout:
    rollout_id: str
    status: str
    config: MConfig = field(default_factory=MConfig)
    end_time: float | None = None
    attempts: list[MAttempt] = field(default_factory=list)
    counter: int = 0
    span_keys: set[tuple[str, str]] = field(default_factory=set)


class Model:
    def __init__(self) -> None:
        self.rollouts: dict[str, MRollout] = {}
        self.queue: list[str] = []
        self.spans = 0

    # -- the E5 path
    def write(self, r: MRollout, status: str, now: float) -> None:
        r.status = status
        if status in TERMINAL:
            r.end_time = now
        if status in QUEUED:
            if r.rollout_id not in self.queue:
                self.queue.append(r.rollout_id)
        elif r.rollout_id in self.queue:
            self.queue.remove(r.rollout_id)

    @staticmethod
    def p(a: MAttempt, c: MConfig) -> str:
        if a.status in ("preparing", "running", "succeeded"):
            return a.status
        if a.status in c.retry and a.sequence_id < c.max_attempts:
            return "requeuing"
        return "failed"

    def propagate(self, r: MRollout, now: float) -> None:
        if r.status == "cancelled" or not r.attempts:
            return
        status = self.p(r.attempts[-1], r.config)
        if status != r.status:  # D12: an unchanged status writes nothing
            self.write(r, status, now)

    # -- events
    def add(self, rid: str, status: str, now: float, attempt_id: str | None = None) -> None:
        r = MRollout(rid, "queuing")
        self.rollouts[rid] = r
        if status == "queuing":
            self.queue.append(rid)
        else:
            assert attempt_id is not None
            self.new_attempt(r, attempt_id, now)

    def new_attempt(self, r: MRollout, attempt_id: str, now: float) -> None:
        r.attempts.append(MAttempt(attempt_id, len(r.attempts) + 1, now))
        self.write(r, "preparing", now)

    def update_attempt(self, r: MRollout, a: MAttempt, status: str | None,
                       heartbeat: float | None, now: float) -> None:
        if heartbeat is not None:
            a.heartbeat = heartbeat
        if status is None:
            return  # D3: no status, no propagation
        a.status = status
        if status in ATTEMPT_ENDED:
            a.end_time = now
        if a is r.attempts[-1]:
            self.propagate(r, now)

    def add_span(self, r: MRollout, a: MAttempt, span_id: str, seq: int, now: float) -> bool:
        """E7 with D4/D7; False for a duplicate (which changes nothing)."""
        if (a.attempt_id, span_id) in r.span_keys:
            return False
        r.span_keys.add((a.attempt_id, span_id))
        r.counter = max(r.counter, seq)
        revive = (a is r.attempts[-1] and a.status in ("preparing", "running", "unresponsive")
                  and r.status in ("queuing", "requeuing", "preparing"))
        a.heartbeat = now
        if a.status in ("preparing", "unresponsive"):
            a.status = "running"
        if revive:
            self.write(r, "running", now)
        self.spans += 1
        return True

    def watchdog(self, now: float) -> None:
        for r in self.rollouts.values():
            if r.status not in WATCHED or not r.attempts:
                continue
            a, c = r.attempts[-1], r.config
            if a.status in ATTEMPT_ENDED:
                self.propagate(r, now)
            elif c.timeout is not None and now - a.start_time > c.timeout:
                a.status = "timeout"
                self.propagate(r, now)
            elif a.heartbeat:
                if a.status == "preparing":
                    a.status = "running"
                    self.propagate(r, now)
                if c.unresponsive is not None and now - a.heartbeat > c.unresponsive:
                    a.status = "unresponsive"
                    self.propagate(r, now)
            elif c.unresponsive is not None and now - a.start_time > c.unresponsive:
                a.status = "unresponsive"
                self.propagate(r, now)

    def terminal(self) -> list[str]:
        return [rid for rid, r in self.rollouts.items() if r.status in TERMINAL]
