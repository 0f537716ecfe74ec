"""``agl store --metrics-port``: a real server, driven through known calls, scraped over HTTP
and parsed with prometheus_client's own parser; every counter must have moved by exactly
what the test did. Also: what the endpoint serves (only metrics, on loopback), that the core
never imports the extras, and the error that names the extra when it is missing."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mpstore import AuthenticationFailed, RolloutNotFound, Span, StoreClient, connect
from mpstore.accounting import LATENCY_BUCKETS, CallStats, Histogram, quantile
from mpstore.manager.ports import free_port
from tests.remote import running_server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, path: str = "/metrics") -> Samples:
    """Every sample of the endpoint, keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def calls(samples: Samples, method: str, outcome: str = "ok") -> float:
    return value(samples, "mpstore_calls_total", method=method, outcome=outcome)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


def metrics_server(tmp_path: Path, *args: str) -> Any:
    port = free_port()
    return running_server(tmp_path, "--metrics-port", str(port), *args), port


def _cycle(client: StoreClient, n: int, spans: int) -> list[str]:
    """n rollouts through enqueue, dequeue, ``spans`` spans each and success."""
    ids = [client.enqueue_rollout({"i": i}).rollout_id for i in range(n)]
    for i in range(n):
        claimed = client.dequeue_rollout(worker_id=f"runner-{i}")
        assert claimed is not None
        for seq in range(1, spans + 1):
            client.add_span(Span(claimed.rollout_id, claimed.attempt.attempt_id, seq, "step"))
        client.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id,
                              status="succeeded")
    return ids


def test_counters_move_by_exactly_what_the_test_did(tmp_path: Path) -> None:
    server, port = metrics_server(tmp_path, "--watchdog-interval", "0.05")
    with server as srv, srv.connect() as client:
        before = scrape(port)
        _cycle(client, 3, spans=4)
        with pytest.raises(RolloutNotFound):
            client.update_attempt("ro-missing", "latest", status="failed")
        with pytest.raises(AttributeError):
            client._call("no_such_method", (), {})
        # Its first attempt times out and is retried; the second is reported unresponsive
        # (requeuing the rollout), then revived by a span (running again).
        slow = client.enqueue_rollout({"slow": True}, config={
            "timeout_seconds": 0.2, "max_attempts": 3,
            "retry_condition": ["timeout", "unresponsive"]})
        first = client.dequeue_rollout(worker_id="slowpoke")
        assert first is not None and first.rollout_id == slow.rollout_id
        polls = 0

        def requeued() -> bool:
            nonlocal polls
            polls += 1
            return client.get_rollout_by_id(slow.rollout_id).status == "requeuing"

        wait_until(requeued, "the watchdog to time the attempt out")
        # No time limit for the second attempt: however slow this machine, only the first
        # one times out.
        client.update_rollout(slow.rollout_id, config={
            "max_attempts": 3, "retry_condition": ["timeout", "unresponsive"]})
        second = client.dequeue_rollout(worker_id="slowpoke")
        assert second is not None and second.attempt.sequence_id == 2
        client.update_attempt(second.rollout_id, "latest", status="unresponsive")
        client.add_span(Span(second.rollout_id, second.attempt.attempt_id, 1, "late"))
        waited = client.wait_for_rollouts(rollout_ids=[slow.rollout_id], timeout=0.15)
        assert waited == []
        after = scrape(port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mpstore_calls_total", method="enqueue_rollout", outcome="ok") == 4
    assert moved("mpstore_calls_total", method="dequeue_rollout", outcome="ok") == 5
    assert moved("mpstore_calls_total", method="add_span", outcome="ok") == 13
    assert moved("mpstore_calls_total", method="update_attempt", outcome="ok") == 4
    assert moved("mpstore_calls_total", method="update_attempt", outcome="store_error") == 1
    assert moved("mpstore_calls_total", method="other", outcome="transport_error") == 1
    assert moved("mpstore_calls_total", method="get_rollout_by_id", outcome="ok") == polls
    assert moved("mpstore_calls_total", method="wait_for_rollouts", outcome="ok") == 1
    assert moved("mpstore_call_duration_seconds_count", method="add_span") == 13
    # The wait took >= 0.15 s: counted in no bucket up to 0.1 s, in every one from 10 s.
    wait = {"method": "wait_for_rollouts"}
    assert moved("mpstore_call_duration_seconds_bucket", le="0.1", **wait) == 0
    assert moved("mpstore_call_duration_seconds_bucket", le="10.0", **wait) == 1
    assert moved("mpstore_call_duration_seconds_sum", **wait) >= 0.15
    assert moved("mpstore_rollouts_finished_total") == 3
    assert moved("mpstore_attempts_started_total") == 5
    assert moved("mpstore_attempts_retried_total") == 1
    assert moved("mpstore_attempts_timed_out_total") == 1
    assert moved("mpstore_attempts_unresponsive_total") == 1
    assert moved("mpstore_spans_stored_total") == 13
    assert moved("mpstore_spans_evicted_total") == 0
    assert value(after, "mpstore_spans") == 13
    assert value(after, "mpstore_span_bytes") > 0
    assert value(after, "mpstore_queue_length") == 0
    assert value(after, "mpstore_rollouts", status="succeeded") == 3
    assert value(after, "mpstore_rollouts", status="running") == 1  # revived by its span
    assert value(after, "mpstore_attempts_in_flight") == 1
    assert value(after, "mpstore_runners_in_flight") == 1
    assert value(after, "mpstore_connections") >= 1
    assert value(after, "mpstore_process_resident_memory_bytes") > 0
    assert value(after, "mpstore_process_cpu_seconds_total") > 0
    assert "mpstore_storage_commit_duration_seconds_count" not in {n for n, _ in after}


def test_histogram_is_well_formed(tmp_path: Path) -> None:
    server, port = metrics_server(tmp_path)
    with server as srv, srv.connect() as client:
        for _ in range(20):
            client.ping()
        samples = scrape(port)
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                     if name == "mpstore_call_duration_seconds_bucket"
                     and dict(labels)["method"] == "ping")
    assert [le for le, _ in buckets] == [*LATENCY_BUCKETS, float("inf")]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == value(samples, "mpstore_call_duration_seconds_count", method="ping")
    assert counts[-1] >= 20  # the ping of wait_ready came before


def test_refused_connections_by_reason(tmp_path: Path) -> None:
    server, port = metrics_server(tmp_path, "--max-connections", "3",
                                  "--handshake-timeout", "30")
    with server as srv:
        before = scrape(port)
        with pytest.raises(AuthenticationFailed):
            connect(srv.address, b"not the key", retry_for=0)
        wait_until(lambda: value(scrape(port), "mpstore_connections_refused_total",
                                 reason="auth") == 1, "the refusal to be counted")
        with srv.connect() as client:
            client.ping()
            # Two peers that never authenticate hold the other two slots.
            silent = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
            try:
                wait_until(lambda: value(scrape(port), "mpstore_connections") == 3,
                           "3 open connections")
                extra = socket.create_connection(("127.0.0.1", srv.port))
                extra.settimeout(10)
                assert extra.recv(1) == b""  # closed at once: over the limit
                extra.close()
                # The accepter counts the refusal as it closes the socket: wait for it.
                limit = value(before, "mpstore_connections_refused_total", reason="limit")
                after = wait_until(
                    lambda: (lambda s: s if value(s, "mpstore_connections_refused_total",
                                                  reason="limit") > limit else None)(
                        scrape(port)), "the over-the-limit refusal to be counted")
            finally:
                for sock in silent:
                    sock.close()
    refused = {reason: value(after, "mpstore_connections_refused_total", reason=reason)
               - value(before, "mpstore_connections_refused_total", reason=reason)
               for reason in ("auth", "handshake", "limit")}
    assert refused == {"auth": 1, "handshake": 0, "limit": 1}
    assert (value(after, "mpstore_connections_accepted_total")
            - value(before, "mpstore_connections_accepted_total")) == 4


def test_storage_commits_with_a_data_dir(tmp_path: Path) -> None:
    server, port = metrics_server(tmp_path, "--data-dir", str(tmp_path / "data"))
    with server as srv, srv.connect() as client:
        before = scrape(port)
        client.enqueue_rollout({"x": 1})
        after = scrape(port)
    name = "mpstore_storage_commit_duration_seconds"
    assert value(after, f"{name}_count") - value(before, f"{name}_count") == 1
    assert value(after, f"{name}_sum") > value(before, f"{name}_sum")
    assert value(after, "mpstore_storage_commit_failures_total") == 0


def test_endpoint_serves_only_metrics_on_loopback(tmp_path: Path) -> None:
    server, port = metrics_server(tmp_path)
    with server as srv:
        assert scrape(port, "/")  # / and /metrics are the same page
        for path in ("/rollouts", "/metrics/../etc/passwd", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
            assert info.value.code == 404, path
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/metrics", body=b"x")
        assert conn.getresponse().status == 405
        conn.close()
        listening = {c.laddr for c in psutil.Process(srv.pid).net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert ("127.0.0.1", port) in {(a.ip, a.port) for a in listening}
        assert "Serving metrics at http://127.0.0.1:" in srv.log()


def test_a_taken_metrics_port_is_a_start_failure(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        taken = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "mpstore", "store", "--port", str(free_port()),
             "--authkey-file", str(_key(tmp_path)), "--metrics-port", str(taken)],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{taken} (--metrics-port)" in result.stderr
    assert "Traceback" not in result.stderr


def _key(tmp_path: Path) -> Path:
    from mpstore.testing import write_key_file

    return write_key_file(tmp_path / "key")


# ------------------------------------------------------------------ the extras
def test_the_core_imports_neither_extra() -> None:
    code = ("import sys, mpstore, mpstore.cli, mpstore.manager.server, mpstore.store\n"
            "from click.testing import CliRunner\n"
            "CliRunner().invoke(mpstore.cli.main, ['store', '--help'])\n"
            "print(sorted({'prometheus_client', 'rich'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("module", "argv", "extra"), [
    ("prometheus_client", ["store", "--metrics-port", "9"], "metrics"),
    ("rich", ["top", "--once"], "top"),
])
def test_a_missing_extra_is_named(module: str, argv: list[str], extra: str) -> None:
    code = (f"import sys; sys.modules[{module!r}] = None\n"  # makes the import fail
            "from mpstore.cli import main\n"
            f"main({argv!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert f"pip install 'mpstore[{extra}]'" in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------ the pieces
def test_histogram_bounds_are_inclusive_upper_bounds() -> None:
    hist = Histogram((1.0, 2.0))
    for sample in (0.5, 1.0, 1.5, 2.0, 7.0):
        hist.observe(sample)
    assert hist.snapshot() == {"buckets": [2, 2, 1], "sum": 12.0}


def test_call_stats_keep_unknown_names_under_other() -> None:
    stats = CallStats(["ping"])
    stats.record("ping", 0, 15e-6)
    stats.record("nope", 2, 1e-6)
    stats.record(None, 2, 1e-6)
    snap = stats.snapshot()
    assert set(snap) == {"ping", "other"}
    assert (snap["ping"]["ok"], snap["other"]["transport_error"]) == (1, 2)
    assert snap["ping"]["buckets"][1] == 1  # 15 µs: in (10 µs, 20 µs]


def test_quantile_interpolates_within_a_bucket() -> None:
    bounds = (10e-6, 20e-6, 30e-6)
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile(bounds, [0, 4, 0, 0], 0.5) == pytest.approx(15e-6)
    assert quantile(bounds, [10, 0, 0, 0], 0.99) == pytest.approx(9.9e-6)
    assert quantile(bounds, [1, 0, 0, 1], 0.99) == float("inf")
