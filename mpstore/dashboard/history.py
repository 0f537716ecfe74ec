"""Throughput over the last minutes: a background sampler of the store's O(1) statistics.

Every ``interval`` seconds one ``statistics()`` call; the rate between two samples is the
growth of a counter divided by the time between them. "Finished" counts the rollouts in a
finished status (succeeded, failed, cancelled); one that is restarted leaves that count, so a
rate never goes below zero. While the store cannot be read there are no samples (a gap,
not a drop to zero).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .data import Source, StoreDown

__all__ = ["FINISHED", "History", "Rate", "Sample", "chart"]

#: The statuses counted as finished.
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Sample:
    at: float  # time.time() of the answer
    finished: int
    spans: int


@dataclass(frozen=True)
class Rate:
    at: float
    finished_per_s: float
    spans_per_s: float


def sample_of(stats: dict[str, Any], at: float) -> Sample:
    by_status = stats.get("rollouts_by_status", {})
    return Sample(at, sum(int(by_status.get(s, 0)) for s in FINISHED),
                  int(stats.get("total_spans", 0)))


class History:
    """The last ``keep`` samples, taken every ``interval`` seconds by a daemon thread."""

    def __init__(self, source: Source, interval: float = 2.0, keep: int = 150,
                 clock: Callable[[], float] = time.time) -> None:
        self.source, self.interval, self._clock = source, interval, clock
        self._samples: deque[Sample] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample now (none while the store cannot be read: the chart has a gap)."""
        try:
            stats = self.source.statistics()
        except StoreDown:
            return
        self.add(sample_of(stats, self._clock()))

    def add(self, sample: Sample) -> None:
        with self._lock:
            self._samples.append(sample)

    def rates(self) -> list[Rate]:
        """Rates between consecutive samples, oldest first."""
        with self._lock:
            samples = list(self._samples)
        rates = []
        for before, after in itertools.pairwise(samples):
            span = after.at - before.at
            if span <= 0:
                continue
            rates.append(Rate(after.at, max(0, after.finished - before.finished) / span,
                              max(0, after.spans - before.spans) / span))
        return rates

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval)
        self._thread = threading.Thread(target=loop, name="mpstore-dashboard-history",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def chart(rates: list[Rate], pick: Callable[[Rate], float], width: int = 600,
          height: int = 120, window: float = 300.0, least: float = 60.0) -> dict[str, Any]:
    """What the SVG line chart of one rate needs: a polyline's points over the last
    ``window`` seconds (newest at the right; a shorter history is spread over at least
    ``least`` seconds), the peak and the latest value."""
    if not rates:
        return {"points": "", "peak": 0.0, "latest": None, "width": width, "height": height,
                "window": least}
    end = rates[-1].at
    shown = [r for r in rates if r.at >= end - window]
    span = min(max(end - shown[0].at, least), window)
    values = [pick(r) for r in shown]
    peak = max(values) or 1.0
    points = " ".join(
        f"{width * (1 - (end - r.at) / span):.1f},{height - 4 - (height - 8) * v / peak:.1f}"
        for r, v in zip(shown, values, strict=True))
    return {"points": points, "peak": max(values), "latest": values[-1], "width": width,
            "height": height, "window": span}
