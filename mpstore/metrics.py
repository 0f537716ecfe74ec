"""Prometheus metrics of a running server (``agl store --metrics-port``), with
``prometheus_client`` (``pip install 'mpstore[metrics]'``; the rest of mpstore never imports
it).

Nothing is counted here: at each scrape, :class:`StoreCollector` takes one
``statistics()`` of the server (the same numbers ``agl stats`` and ``agl top`` show, see
:mod:`mpstore.accounting`) and translates it into metric families (:func:`families`). So
the hot path pays only the dispatcher's few increments per call, and a scrape costs one
``statistics()`` call.

The endpoint (:func:`start_exporter`) serves ``GET /metrics`` (and ``/``) and nothing else:
metric names, labels (methods, outcomes, statuses, reasons) and numbers, never a rollout,
span or resource. It binds loopback unless told otherwise, and has no authentication: anyone
who can reach it can read the numbers.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

try:
    from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised by tests/test_metrics.py
    raise ImportError(
        "mpstore's metrics need prometheus_client: pip install 'mpstore[metrics]'"
    ) from exc

from .errors import ServerStartError
from .manager.ports import find_listener

__all__ = ["PATHS", "Exporter", "StoreCollector", "families", "start_exporter"]

log = logging.getLogger(__name__)

#: The only paths served (anything else: 404).
PATHS = frozenset({"/", "/metrics"})

#: Plain numbers of statistics(): (metric name, kind, help, key). Counters get ``_total``.
_SCALARS = (
    ("mpstore_queue_length", "gauge", "Rollouts waiting in the queue.", "queue_length"),
    ("mpstore_rollouts_finished", "counter",
     "Rollouts that reached a terminal status (since the server started).",
     "rollouts_finished"),
    ("mpstore_attempts_started", "counter", "Attempts started (a durable store counts its "
     "restored ones too).", "total_attempts"),
    ("mpstore_attempts_retried", "counter", "Attempts that retried a rollout (attempt 2 and "
     "later), since the server started.", "attempts_retried"),
    ("mpstore_attempts_timed_out", "counter", "Attempts that became timeout (watchdog or "
     "update_attempt), since the server started.", "attempts_timed_out"),
    ("mpstore_attempts_unresponsive", "counter", "Attempts that became unresponsive "
     "(watchdog or update_attempt), since the server started.", "attempts_unresponsive"),
    ("mpstore_attempts_in_flight", "gauge", "Latest attempts of rollouts preparing or "
     "running.", "attempts_in_flight"),
    ("mpstore_runners_in_flight", "gauge", "Distinct worker ids of the attempts in flight.",
     "runners_in_flight"),
    ("mpstore_spans", "gauge", "Spans held (evicted ones excluded).", "total_spans"),
    ("mpstore_spans_evicted", "counter", "Spans dropped by eviction, since the server "
     "started.", "spans_evicted"),
    ("mpstore_rollouts_evicted", "gauge", "Rollouts whose spans were evicted.",
     "evicted_rollouts"),
    ("mpstore_span_bytes", "gauge", "Estimated bytes of the spans held.", "span_bytes"),
    ("mpstore_span_eviction_threshold_bytes", "gauge", "Span bytes above which spans are "
     "evicted.", "eviction_threshold_bytes"),
    ("mpstore_span_safe_threshold_bytes", "gauge", "Span bytes at which eviction stops.",
     "safe_threshold_bytes"),
    ("mpstore_resources", "gauge", "Resource versions held.", "total_resources"),
    ("mpstore_uptime_seconds", "gauge", "Seconds since the store started.", "uptime"),
)
_SERVER = (
    ("mpstore_connections", "gauge", "Open connections (authenticating ones included).",
     "connections"),
    ("mpstore_connections_accepted", "counter", "Connections accepted.",
     "connections_accepted"),
)


def _family(name: str, kind: str, doc: str, value: float) -> Metric:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(name, doc, value=value)


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], bounds: Iterable[float],
                   counts: list[int], total: float) -> None:
    """Add one histogram from per-bucket ``counts`` (not cumulative; the last is +Inf)."""
    cumulative, buckets = 0, []
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    family.add_metric(labels, buckets, sum_value=total)


def _calls(server: dict[str, Any]) -> Iterator[Metric]:
    calls = server.get("calls")
    if calls is None:
        return
    counted = CounterMetricFamily("mpstore_calls", "Calls answered, by method and outcome "
                                  "(store_error: the store refused it; transport_error: it "
                                  "could not be decoded, delivered or answered).",
                                  labels=["method", "outcome"])
    latency = _histogram("mpstore_call_duration_seconds", "Server time per call, from the "
                         "request read to its reply made (a durable store's commit and the "
                         "network excluded), by method.", ["method"])
    for method, row in sorted(calls.items()):
        for outcome in ("ok", "store_error", "transport_error"):
            counted.add_metric([method, outcome], row[outcome])
        _add_histogram(latency, [method], server["latency_bounds"], row["buckets"], row["sum"])
    yield counted
    yield latency


def families(stats: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of one ``statistics()`` answer of a server."""
    stats = {**stats, **stats.get("since_start", {})}
    for name, kind, doc, key in _SCALARS:
        if key in stats:
            yield _family(name, kind, doc, stats[key])
    by_status = GaugeMetricFamily("mpstore_rollouts", "Rollouts by status.", labels=["status"])
    for status, count in sorted(stats.get("rollouts_by_status", {}).items()):
        by_status.add_metric([status], count)
    yield by_status
    spans_total = stats.get("total_spans", 0) + stats.get("spans_evicted", 0)
    yield CounterMetricFamily("mpstore_spans_stored", "Spans stored (held plus evicted).",
                              value=spans_total)
    commits = stats.get("commits")
    if commits is not None:
        latency = _histogram("mpstore_storage_commit_duration_seconds", "Seconds per "
                             "storage commit with --data-dir (its _count: the commits).", [])
        _add_histogram(latency, [], commits["bounds"], commits["buckets"], commits["sum"])
        yield latency
        yield CounterMetricFamily("mpstore_storage_commit_failures", "Storage commits that "
                                  "failed.", value=commits["failures"])
    server = stats.get("server")
    if server is None:
        return
    for name, kind, doc, key in _SERVER:
        yield _family(name, kind, doc, server[key])
    refused = CounterMetricFamily("mpstore_connections_refused", "Connections refused: auth "
                                  "(wrong key), handshake (none in time, or broken), limit "
                                  "(over --max-connections).", labels=["reason"])
    for reason, count in sorted(server["connections_refused"].items()):
        refused.add_metric([reason], count)
    yield refused
    yield from _calls(server)


class StoreCollector(Collector):
    """Reads ``source()`` (a server's statistics()) at every scrape."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from families(self._source())


class _Threading(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds is not worth a log line."""


class Exporter:
    """The HTTP endpoint, served by a daemon thread until :meth:`stop`."""

    def __init__(self, httpd: WSGIServer) -> None:
        self._httpd = httpd
        self.address: tuple[str, int] = httpd.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(target=httpd.serve_forever, name="mpstore-metrics",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=2.0)


def _app(registry: CollectorRegistry) -> Callable[..., Any]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "/") not in PATHS:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Only /metrics is served here.\n"]
        return metrics(environ, start_response)

    return app


def start_exporter(source: Callable[[], dict[str, Any]], host: str, port: int) -> Exporter:
    """Serve the metrics of ``source()`` (plus this process's CPU and memory) on
    ``http://host:port/metrics``. Raises ServerStartError if it cannot listen there."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(source))
    ProcessCollector(namespace="mpstore", registry=registry)
    server_class = type("_MetricsServer", (_Threading,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    try:
        httpd = make_server(host, port, _app(registry), server_class, handler_class=_Quiet)
    except OSError as exc:
        holder = find_listener(host, port) if exc.errno == errno.EADDRINUSE else None
        held = f" (held by PID {holder.pid}: {holder.cmdline})" if holder and holder.pid else ""
        raise ServerStartError(
            f"mpstore server failed to start: cannot serve metrics on {host}:{port} "
            f"(--metrics-port): {exc.strerror or exc}{held}") from None
    exporter = Exporter(httpd)
    log.info("Serving metrics at http://%s:%s/metrics", host, exporter.address[1])
    return exporter
