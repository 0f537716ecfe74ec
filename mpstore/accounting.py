"""Counters and histograms that the server keeps about itself, in plain Python (no metrics
library): what ``statistics()`` reports, ``agl top`` shows and ``agl store --metrics-port``
exposes (:mod:`mpstore.metrics` translates them for Prometheus at scrape time).

Cost on the hot path: :meth:`CallStats.record` is a dict lookup, a bisect and three
increments on lists owned by the one dispatcher thread (no lock: only that thread writes
them). Readers in other threads copy a list at a time (``list(...)`` is atomic under the
GIL), so a snapshot may lag a call behind but never sees a torn number. Events that several
threads count (refused connections) go through :class:`Tally`, which takes a lock: they are
rare.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import psutil

__all__ = [
    "COMMIT_BUCKETS",
    "LATENCY_BUCKETS",
    "OK",
    "OTHER",
    "OUTCOMES",
    "STORE_ERROR",
    "TRANSPORT_ERROR",
    "CallStats",
    "Histogram",
    "Tally",
    "process_usage",
    "quantile",
]

#: Upper bounds (seconds) of the call latency buckets: 10 µs steps up to 100 µs, where most
#: calls of a loopback server fall, then coarser up to a minute (long polls). Written as
#: microseconds / 1e6 so that each bound prints as the decimal it is (3e-05, not 2.99..e-05).
LATENCY_BUCKETS: tuple[float, ...] = tuple(us / 1e6 for us in (
    10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 125, 150, 200, 250, 300, 400, 500, 750,
    1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000))
#: Upper bounds (seconds) of the storage commit latency buckets.
COMMIT_BUCKETS: tuple[float, ...] = tuple(us / 1e6 for us in (
    50, 100, 200, 300, 500, 750, 1_000, 2_000, 3_000, 5_000, 7_500, 10_000, 25_000, 50_000,
    100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000))
#: Outcomes of a call, as indexes into :attr:`CallStats` rows and their names. A store error
#: is a ``StoreError`` (the store refused the call, e.g. an unknown rollout); a transport
#: error is anything else that kept a call from being answered normally: a request that
#: cannot be unpickled or is too large, an unknown method, wrong arguments, a reply that
#: cannot be pickled.
OK, STORE_ERROR, TRANSPORT_ERROR = 0, 1, 2
OUTCOMES = ("ok", "store_error", "transport_error")
#: The method name under which requests for unknown methods (and undecodable ones) count:
#: names come from peers, so they must not create new label values.
OTHER = "other"


class Histogram:
    """Counts per bucket (``bounds`` are upper bounds, inclusive, as Prometheus' ``le``; the
    last bucket is +Inf) and the sum of the observed values. One writer at a time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        """``{"buckets": counts per bucket (not cumulative), "sum": seconds}``."""
        return {"buckets": list(self.counts), "sum": self.sum}


class _Method:
    __slots__ = ("latency", "outcomes")

    def __init__(self) -> None:
        self.outcomes = [0, 0, 0]
        self.latency = Histogram(LATENCY_BUCKETS)


class CallStats:
    """Calls per method and outcome, and their latency; written by the dispatcher thread."""

    def __init__(self, methods: Iterable[str]) -> None:
        self._rows = {name: _Method() for name in methods}
        self._other = self._rows.setdefault(OTHER, _Method())

    def record(self, method: str | None, outcome: int, seconds: float) -> None:
        """Count one call of ``method`` (None or unknown: :data:`OTHER`) that took
        ``seconds``, with ``outcome`` one of OK, STORE_ERROR, TRANSPORT_ERROR."""
        row = self._rows.get(method, self._other) if method is not None else self._other
        row.outcomes[outcome] += 1
        row.latency.observe(seconds)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per method called at least once: its count per outcome, its latency buckets (not
        cumulative; bounds: :data:`LATENCY_BUCKETS`) and the sum of its latencies."""
        calls = {}
        for name, row in self._rows.items():
            outcomes = list(row.outcomes)
            if any(outcomes):
                counts = dict(zip(OUTCOMES, outcomes, strict=True))
                calls[name] = {**counts, **row.latency.snapshot()}
        return calls


class Tally:
    """Named counters that several threads bump (rare events: each takes a lock)."""

    def __init__(self, *names: str) -> None:
        self._counts = dict.fromkeys(names, 0)
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The ``q``-quantile (0 < q < 1) of a histogram (``counts`` per bucket, not cumulative),
    interpolated linearly within its bucket as Prometheus' ``histogram_quantile`` does; None
    without observations, ``math.inf`` if it falls in the +Inf bucket."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(bounds):
                return math.inf
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return math.inf


def process_usage() -> dict[str, Any]:
    """This process's resident memory (bytes), CPU time (seconds, user + system) and
    threads."""
    proc = psutil.Process()
    with proc.oneshot():
        times = proc.cpu_times()
        return {"rss_bytes": proc.memory_info().rss,
                "cpu_seconds": times.user + times.system, "threads": proc.num_threads()}
