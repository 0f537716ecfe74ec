"""Memory under a span flood (issue 5): a real ``agl store`` with small eviction thresholds
(in bytes) takes far more span payload than the thresholds, in the shapes real traces have
(a top-level prompt, chat messages nested in lists of dicts, exception events). Its RSS stays
under a bound, and eviction follows D8: the spans of finished rollouts go first, oldest first;
unfinished rollouts only when that is not enough, oldest first; an evicted rollout raises
``SpansEvicted`` for good while its later spans still count as heartbeats; every rollout not
evicted still has all its acknowledged spans.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mpstore import Span, SpansEvicted, StoreClient
from mpstore.testing import ServerProcess
from tests.faults import mp_context, usage
from tests.remote import running_server

MiB = 1024 * 1024
EVICTION, SAFE = 8 * MiB, 6 * MiB
PAYLOAD = 50_000  # characters of text per span
#: RSS allowed above the idle server's: the thresholds' worth of spans, a few requests in
#: flight and their pickles, the allocator's slack. Without eviction a flood exceeds it.
RSS_ALLOWANCE = 48 * MiB


def make_span(rid: str, aid: str, n: int) -> Span:
    """A span of ~PAYLOAD characters in one of three shapes, distinct text each time (so
    pickle cannot share one string between spans)."""
    text = f"{rid}-{n}-" + "x" * PAYLOAD
    shape = n % 3
    if shape == 0:
        return Span(rid, aid, n, "llm", attributes={"prompt": text})
    if shape == 1:
        return Span(rid, aid, n, "chat", attributes={
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": text}]})
    return Span(rid, aid, n, "tool", events=[
        {"name": "exception", "attributes": {"exception.stacktrace": text}}])


def fill(store: StoreClient, rid: str, aid: str, spans: int, first: int = 1,
         batch: int = 20) -> list[str]:
    """Add ``spans`` spans to an attempt in batches; returns their acknowledged span ids."""
    acked: list[str] = []
    for start in range(first, first + spans, batch):
        count = min(batch, first + spans - start)
        stored = store.add_many_spans([make_span(rid, aid, n)
                                       for n in range(start, start + count)])
        acked.extend(s.span_id for s in stored)
    return acked


def evicted(store: StoreClient, rid: str) -> bool:
    try:
        store.query_spans(rid)
    except SpansEvicted:
        return True
    return False


def is_prefix(flags: list[bool]) -> bool:
    """True if the evicted ones (True) all come before the kept ones (oldest first)."""
    return flags == sorted(flags, reverse=True)


def _flooder(address: str, key: bytes, rollouts: int, spans: int, out: Any) -> None:
    """Another process: its own running rollouts, each flooded with spans."""
    from mpstore import connect

    store = connect(address, key, timeout=60)
    for _ in range(rollouts):
        claimed = store.start_rollout({"flood": True})
        fill(store, claimed.rollout_id, claimed.attempt.attempt_id, spans)
    out.put("done")


@pytest.fixture
def server(tmp_path: Path) -> Any:
    with running_server(tmp_path, "--eviction-threshold", str(EVICTION),
                        "--safe-threshold", str(SAFE)) as srv:
        yield srv


def flood(server: ServerProcess, store: StoreClient, processes: int, rollouts: int,
          spans: int) -> int:
    """Flood from ``processes`` client processes, sampling the server's RSS; returns the
    peak."""
    ctx = mp_context()
    out = ctx.Queue()
    procs = [ctx.Process(target=_flooder, daemon=True,
                         args=(server.address, server.authkey, rollouts, spans, out))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    peak, finished = 0, 0
    deadline = time.monotonic() + 600
    while finished < processes:
        assert time.monotonic() < deadline, "the flood did not finish"
        peak = max(peak, usage(server).rss)
        try:
            out.get(timeout=0.05)
            finished += 1
        except Exception:
            pass
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    return max(peak, usage(server).rss)


def run_memory(server: ServerProcess, processes: int, rollouts: int, spans: int
               ) -> dict[str, Any]:
    store = server.connect(timeout=60)
    store.ping()
    idle = usage(server).rss

    # Phase 1, D8's order: an unfinished rollout, then ten finished ones, then a running one
    # whose spans push the total over the threshold.
    old = store.start_rollout({"old": "unfinished"})
    old_spans = fill(store, old.rollout_id, old.attempt.attempt_id, 10)
    finished = []
    for i in range(10):
        claimed = store.start_rollout({"finished": i})
        fill(store, claimed.rollout_id, claimed.attempt.attempt_id, 10)
        store.update_attempt(claimed.rollout_id, "latest", status="succeeded")
        finished.append(claimed.rollout_id)
    assert store.statistics()["evicted_rollouts"] == 0
    hot = store.start_rollout({"hot": True})
    hot_spans = fill(store, hot.rollout_id, hot.attempt.attempt_id, 60, batch=5)
    flags = [evicted(store, rid) for rid in finished]
    assert any(flags) and is_prefix(flags), flags  # finished first, oldest first ...
    assert not evicted(store, old.rollout_id)  # ... before an older unfinished one
    assert {s.span_id for s in store.query_spans(old.rollout_id)} == set(old_spans)
    assert {s.span_id for s in store.query_spans(hot.rollout_id)} == set(hot_spans)
    assert store.statistics()["span_bytes"] <= EVICTION

    # Phase 2, the flood: far more than the thresholds, from other processes.
    peak = flood(server, store, processes, rollouts, spans)
    stats = store.statistics()
    assert stats["span_bytes"] <= EVICTION
    assert all(evicted(store, rid) for rid in finished)
    unfinished = [r.rollout_id for r in store.query_rollouts(status=["running"])]
    flags = [evicted(store, rid) for rid in unfinished]
    assert flags[:2] == [True, True], flags  # the oldest unfinished (old, hot) went first
    kept_spans = sum(len(store.query_spans(rid)) for rid, gone in zip(unfinished, flags,
                                                                       strict=True) if not gone)
    assert stats["total_spans"] == kept_spans
    assert peak - idle < RSS_ALLOWANCE, f"RSS grew by {(peak - idle) / MiB:.0f} MiB"

    # D8: the mark is permanent; a later span is a heartbeat, not kept.
    before = store.get_latest_attempt(old.rollout_id).last_heartbeat_time
    store.add_span(make_span(old.rollout_id, old.attempt.attempt_id, 999))
    with pytest.raises(SpansEvicted, match="have been evicted"):
        store.query_spans(old.rollout_id)
    assert store.get_latest_attempt(old.rollout_id).last_heartbeat_time > before
    flooded = processes * rollouts * spans * PAYLOAD
    store.close()
    return {"flooded_mib": flooded / MiB, "peak_rss_growth_mib": (peak - idle) / MiB,
            "evicted_rollouts": stats["evicted_rollouts"]}


def test_span_flood_keeps_rss_bounded_and_evicts_by_d8(server: ServerProcess) -> None:
    result = run_memory(server, processes=2, rollouts=10, spans=150)  # ~150 MB of text
    assert result["flooded_mib"] > 2 * RSS_ALLOWANCE / MiB  # without eviction: over it


@pytest.mark.stress
def test_span_flood_keeps_rss_bounded_and_evicts_by_d8_stress(server: ServerProcess) -> None:
    start = time.monotonic()
    result = run_memory(server, processes=4, rollouts=40, spans=400)  # ~3 GB of text
    print(f"\nmemory: {result} in {time.monotonic() - start:.1f} s")


# --------------------------------------------------------------------------- the server's gc
_GC_PROBE = """
import gc
from mpstore.startup import tune_gc
tune_gc()
at_start = gc.get_freeze_count()
kept = [[i] for i in range(50_000)]  # lists: always tracked by the gc
gc.collect()  # a full collection: what survives it is frozen
print(at_start, gc.get_freeze_count())
"""


def test_the_server_freezes_what_survives_a_full_collection() -> None:
    # In a child process: freezing is process-wide, and this one is pytest's.
    out = subprocess.run([sys.executable, "-c", _GC_PROBE], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    at_start, after = int(out[0]), int(out[1])
    assert at_start > 0  # the imports
    assert after >= at_start + 50_000  # the kept lists, skipped by later collections


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def test_deleting_what_was_consumed_gives_memory_and_disk_back(tmp_path: Path) -> None:
    """A long run's worth of rollouts and spans through a durable server, consumed from the
    feed and deleted: the server's RSS and the data directory shrink back towards where they
    started (issue 12: ``delete_rollouts``)."""
    data = tmp_path / "data"
    with running_server(tmp_path, "--data-dir", str(data)) as server:
        store = server.connect()
        idle = usage(server).rss
        for _ in range(4):
            store.enqueue_many_rollouts([{"input": i} for i in range(50)])
            for c in store.dequeue_many_rollouts(50):
                store.add_many_spans([make_span(c.rollout_id, c.attempt.attempt_id, n)
                                      for n in range(1, 11)])
                store.update_attempt(c.rollout_id, "latest", status="succeeded")
        full, full_disk = usage(server).rss, _dir_bytes(data)
        page = store.finished_rollouts(0, 1000)
        deleted = store.delete_rollouts([r.rollout_id for r in page.rollouts])
        stats = store.statistics()
        emptied = usage(server).rss
        store.close()
    assert deleted == 200 and stats["total_spans"] == 0 and stats["span_bytes"] == 0
    print("rss idle/full/emptied MiB:", idle // MiB, full // MiB, emptied // MiB,
          "disk full/after MiB:", full_disk // MiB, _dir_bytes(data) // MiB)
    assert emptied - idle < (full - idle) / 2, "the server kept the deleted spans' memory"
    assert _dir_bytes(data) < full_disk / 4, "the data directory did not shrink"
