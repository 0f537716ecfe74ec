"""The dashboard's pure parts, in process: the throughput history and chart (on a fake
clock), the trace tree and its scale, secrets hidden, values as JSON text."""

from __future__ import annotations

import pytest

pytest.importorskip("jinja2", reason="needs mpstore[dashboard]")

from mpstore import Span
from mpstore.dashboard import is_loopback
from mpstore.dashboard.data import Source, StoreDown
from mpstore.dashboard.history import History, Sample, chart, sample_of
from mpstore.dashboard.views import as_json, duration, href, masked, waterfall
from mpstore.errors import InvalidArgument
from tests.conftest import FakeClock


class _Stats:
    """A Source stand-in that answers statistics() from a list (None: the store is away)."""

    address = "127.0.0.1:1"

    def __init__(self, answers: list[dict | None]) -> None:
        self.answers = answers

    def statistics(self) -> dict:
        answer = self.answers.pop(0)
        if answer is None:
            raise StoreDown("away")
        return answer


def _stats(finished: int, spans: int) -> dict:
    return {"rollouts_by_status": {"succeeded": finished - 1, "failed": 1, "running": 7},
            "total_spans": spans}


def test_rates_come_from_counter_growth_over_time() -> None:
    clock = FakeClock(100.0)
    answers = [_stats(1, 0), _stats(11, 50), None, _stats(31, 250), _stats(21, 260)]
    history = History(_Stats(answers), clock=clock)  # type: ignore[arg-type]
    for _ in range(len(answers)):
        history.sample()
        clock.advance(2.0)
    rates = history.rates()
    assert [(r.finished_per_s, r.spans_per_s) for r in rates] == [(5.0, 25.0), (5.0, 50.0),
                                                                 (0.0, 5.0)]
    assert [r.at for r in rates] == [102.0, 106.0, 108.0]  # the failed sample is a gap


def test_sample_counts_finished_statuses_only() -> None:
    sample = sample_of({"rollouts_by_status": {"succeeded": 2, "failed": 3, "cancelled": 4,
                                               "running": 100, "queuing": 9},
                        "total_spans": 12}, 5.0)
    assert sample == Sample(5.0, 9, 12)


def test_chart_scales_to_peak_and_window() -> None:
    history = History(_Stats([]), clock=FakeClock())  # type: ignore[arg-type]
    for at, finished in [(0, 0), (100, 100), (200, 300), (400, 400)]:
        history.add(Sample(float(at), finished, 0))
    c = chart(history.rates(), lambda r: r.finished_per_s, width=300, height=108)
    assert c["peak"] == 2.0 and c["latest"] == 0.5 and c["window"] == 300
    # rates at t=100 (1/s, the left edge), t=200 (2/s, the peak, top), t=400 (0.5/s, right)
    assert c["points"] == "0.0,54.0 100.0,4.0 300.0,79.0"
    history.add(Sample(500.0, 450, 0))  # t=100 is now older than the window: left out
    assert chart(history.rates(), lambda r: r.finished_per_s)["points"].count(",") == 3
    assert chart([], lambda r: r.spans_per_s)["latest"] is None


def test_waterfall_orders_a_tree_and_draws_to_scale() -> None:
    root = Span("r", "a", 1, "root", start_time=10.0, end_time=14.0)
    late = Span("r", "a", 2, "late", parent_id=root.span_id, start_time=12.0, end_time=13.0)
    early = Span("r", "a", 3, "early", parent_id=root.span_id, start_time=10.5, end_time=11.0)
    leaf = Span("r", "a", 4, "leaf", parent_id=early.span_id, start_time=10.5, end_time=10.5)
    lost = Span("r", "a", 5, "lost", parent_id="0" * 16, start_time=13.0, end_time=None)
    bars, total = waterfall([late, leaf, root, lost, early])
    assert total == 4.0
    assert [(b.span.name, b.depth, b.orphan) for b in bars] == [
        ("root", 0, False), ("early", 1, False), ("leaf", 2, False), ("late", 1, False),
        ("lost", 0, True)]
    assert [(b.x, b.width) for b in bars] == [(0.0, 1000.0), (125.0, 125.0), (125.0, 1.0),
                                              (500.0, 250.0), (750.0, 1.0)]


def test_waterfall_survives_cycles_long_chains_and_missing_times() -> None:
    a = Span("r", "a", 1, "a")
    b = Span("r", "a", 2, "b", parent_id=a.span_id)
    a.parent_id = b.span_id  # a cycle: neither is a root
    chain = [Span("r", "a", 10, "c0", start_time=0.0, end_time=1.0)]
    for n in range(1, 3000):  # deeper than the recursion limit
        chain.append(Span("r", "a", 10 + n, f"c{n}", parent_id=chain[-1].span_id))
    bars, _ = waterfall([a, b, *chain])
    assert len(bars) == 3002 and {b.span.name for b in bars} >= {"a", "b", "c2999"}
    assert max(b.depth for b in bars) == 2999
    assert waterfall([]) == ([], 0.0)


def test_values_are_text_and_secrets_hidden() -> None:
    assert masked({"llm": {"api_key": "sk-1", "model": "m", "max_tokens": 3}}) == {
        "llm": {"api_key": "(hidden)", "model": "m", "max_tokens": 3}}
    assert '"<script>"' in as_json({"x": "<script>"})  # the template escapes it, not this
    assert as_json({"s": {1, 2}, "o": object}).count("class") == 1
    assert href("/trace", rollout="a&b", attempt=None) == "/trace?rollout=a%26b"
    assert duration(1.0, 1.25) == "250.0 ms" and duration(None, 1.0) == "\u2013"


def test_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.3.0.1") and is_loopback("::1")
    assert is_loopback("localhost") and not is_loopback("0.0.0.0")
    assert not is_loopback("example.org")
    with pytest.raises(InvalidArgument):
        Source("not an address")
    with pytest.raises(InvalidArgument):
        Source("127.0.0.1:0")
    assert Source("localhost:4747").address == "localhost:4747"
