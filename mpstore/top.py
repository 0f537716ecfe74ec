"""``agl top``: a live terminal view of a running server, with ``rich``
(``pip install 'mpstore[top]'``; the rest of mpstore never imports it).

Every ``interval`` seconds it takes one ``statistics()`` of the server (see
:meth:`mpstore.manager.server.StoreServer.statistics`) and draws a frame. Rates and
latencies are over the last interval: the difference between two samples (counters and
latency buckets), divided by the difference of the server's uptime between them. Latency
quantiles are interpolated within the histogram's buckets (10 µs wide below 100 µs), as
Prometheus' ``histogram_quantile`` does.

The live view redraws in place (the terminal's alternate screen, as ``top`` does) and quits
on ``q`` or Ctrl-C. When the server cannot be reached it says so, keeps trying every
interval, and never shows a traceback. ``--once`` prints one frame (from two samples an
interval apart) and exits, for scripts.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

try:
    from rich import box
    from rich.console import Console, Group, RenderableType
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text
except ImportError as exc:  # pragma: no cover - exercised by tests/test_top.py
    raise ImportError("agl top needs rich: pip install 'mpstore[top]'") from exc

from .accounting import quantile
from .api import BLOCKING
from .errors import MpstoreError
from .manager.client import StoreClient, connect

__all__ = ["Sample", "frame", "remember", "run_top", "unreachable"]

_STATUSES = ("queuing", "requeuing", "preparing", "running", "succeeded", "failed",
             "cancelled")
#: Lines of a frame besides the rows of its two tables: the header and the overview (12),
#: each table's title, blank line, heading, rule and trailing blank line (2 x 5).
_FIXED_LINES = 22
_RUNNERS_SEEN = 1000


@dataclass
class Sample:
    """One ``statistics()`` answer, with the ``ping()`` of the connection it came from."""

    stats: dict[str, Any]
    info: dict[str, Any]


# ------------------------------------------------------------------ numbers
def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "> 60 s"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.1f} s"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 0):.1f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


# ------------------------------------------------------------------ differences
class _Delta:
    """What changed between two samples (``previous`` None: nothing to compare yet)."""

    def __init__(self, current: dict[str, Any], previous: dict[str, Any] | None) -> None:
        self.now, self.before = current, previous
        span = None if previous is None else current["uptime"] - previous["uptime"]
        # A server that restarted (uptime went back) starts over.
        self.seconds = span if span is not None and span > 0 else None

    def rate(self, *path: str) -> float | None:
        if self.seconds is None or self.before is None:
            return None
        now, before = _get(self.now, path), _get(self.before, path)
        return max(now - before, 0) / self.seconds

    def calls(self) -> dict[str, dict[str, Any]]:
        return (self.now.get("server") or {}).get("calls") or {}

    def buckets(self, method: str) -> list[int]:
        """The method's latency bucket counts over the interval (since start without one)."""
        now = self.calls()[method]["buckets"]
        before = ((self.before or {}).get("server") or {}).get("calls") or {}
        old = before.get(method, {}).get("buckets") if self.seconds is not None else None
        return list(now) if old is None else [max(a - b, 0) for a, b in zip(now, old, strict=True)]

    def count(self, method: str) -> float | None:
        """Calls of ``method`` per second over the interval (None: no interval yet)."""
        if self.seconds is None or self.before is None:
            return None
        before = ((self.before.get("server") or {}).get("calls") or {}).get(method)
        now = _total(self.calls()[method])
        return max(now - (_total(before) if before else 0), 0) / self.seconds


def _get(stats: dict[str, Any] | None, path: tuple[str, ...]) -> float:
    value: Any = stats
    for key in path:
        if not isinstance(value, dict):
            return 0
        value = value.get(key, 0)
    return value if isinstance(value, (int, float)) else 0


def _total(row: dict[str, Any]) -> int:
    return int(row["ok"] + row["store_error"] + row["transport_error"])


# ------------------------------------------------------------------ the frame
def _rate(value: float | None, unit: str) -> str:
    return "…" if value is None else f"{_num(value)} {unit}/s"


def _overview(stats: dict[str, Any], delta: _Delta) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    by_status = stats.get("rollouts_by_status", {})
    grid.add_row("queue", f"{stats.get('queue_length', 0):,} waiting")
    grid.add_row("rollouts", f"{stats.get('total_rollouts', 0):,}: " + ", ".join(
        f"{by_status.get(s, 0):,} {s}" for s in _STATUSES[:4]))
    grid.add_row("finished", ", ".join(f"{by_status.get(s, 0):,} {s}" for s in _STATUSES[4:]))
    grid.add_row("throughput", " · ".join((
        _rate(delta.rate("rollouts_finished"), "rollouts finished"),
        _rate(delta.rate("spans_stored"), "spans"), _rate(_calls_rate(delta), "calls"))))
    grid.add_row("latency", _latency_line(stats, delta))
    grid.add_row("attempts", f"{stats.get('total_attempts', 0):,} started · "
                 f"{stats.get('attempts_retried', 0):,} retried · "
                 f"{stats.get('attempts_timed_out', 0):,} timed out · "
                 f"{stats.get('attempts_unresponsive', 0):,} unresponsive")
    grid.add_row("spans", f"{stats.get('total_spans', 0):,} held · "
                 f"{_bytes(stats.get('span_bytes', 0))} · "
                 f"{stats.get('spans_evicted', 0):,} evicted")
    server = stats.get("server") or {}
    refused = server.get("connections_refused", {})
    grid.add_row("connections", f"{server.get('connections', 0):,} open · "
                 f"{server.get('connections_accepted', 0):,} accepted · refused: " + ", ".join(
                     f"{n:,} {why}" for why, n in sorted(refused.items())))
    grid.add_row("storage", _storage_line(stats, delta))
    process = server.get("process") or {}
    cpu = delta.rate("server", "process", "cpu_seconds")
    grid.add_row("server", f"RSS {_bytes(process.get('rss_bytes', 0))} · CPU "
                 + ("…" if cpu is None else f"{cpu:.0%}")
                 + f" · {process.get('threads', 0)} threads")
    return grid


def _calls_rate(delta: _Delta) -> float | None:
    if delta.seconds is None:
        return None
    rates = [delta.count(m) for m in delta.calls()]
    return sum(r for r in rates if r is not None)


def _latency_line(stats: dict[str, Any], delta: _Delta) -> str:
    server = stats.get("server") or {}
    if server.get("calls") is None:
        return "not counted (agl store --no-call-stats)"
    bounds = server["latency_bounds"]
    merged = [0] * (len(bounds) + 1)
    for method in delta.calls():
        if method not in BLOCKING:
            merged = [a + b for a, b in zip(merged, delta.buckets(method), strict=True)]
    return (f"p50 {_seconds(quantile(bounds, merged, 0.5))} · "
            f"p99 {_seconds(quantile(bounds, merged, 0.99))}  (calls that do not wait, "
            + ("last interval)" if delta.seconds is not None else "since start)"))


def _storage_line(stats: dict[str, Any], delta: _Delta) -> str:
    commits = stats.get("commits")
    if commits is None:
        return "in memory (no --data-dir)"
    previous = (delta.before or {}).get("commits") if delta.seconds is not None else None
    counts = commits["buckets"]
    if previous is not None:
        counts = [max(a - b, 0) for a, b in zip(counts, previous["buckets"], strict=True)]
    done = sum(commits["buckets"])
    rate = None if delta.seconds is None else sum(counts) / delta.seconds
    return (f"{done:,} commits · {_rate(rate, 'commits')} · "
            f"p50 {_seconds(quantile(commits['bounds'], counts, 0.5))} · "
            f"p99 {_seconds(quantile(commits['bounds'], counts, 0.99))} · "
            f"{commits['failures']:,} failed")


def _calls_table(stats: dict[str, Any], delta: _Delta, rows: int | None) -> Table | None:
    server = stats.get("server") or {}
    calls = server.get("calls")
    if not calls:
        return None
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left",
                  title="calls by method")
    for name, justify in (("method", "left"), ("calls/s", "right"), ("p50", "right"),
                          ("p99", "right"), ("total", "right"), ("store errors", "right"),
                          ("transport errors", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    bounds = server["latency_bounds"]
    ordered = sorted(calls.items(), key=lambda item: (-_total(item[1]), item[0]))
    shown = ordered if rows is None or len(ordered) <= rows else ordered[:rows - 1]
    for method, row in shown:
        buckets = delta.buckets(method)
        rate = delta.count(method)
        table.add_row(method, "…" if rate is None else _num(rate),
                      _seconds(quantile(bounds, buckets, 0.5)),
                      _seconds(quantile(bounds, buckets, 0.99)), f"{_total(row):,}",
                      f"{row['store_error']:,}", f"{row['transport_error']:,}")
    if len(shown) < len(ordered):
        table.add_row("…", f"{len(ordered) - len(shown)} more", "", "", "", "", "")
    return table


def _runner_rows(stats: dict[str, Any], seen: dict[str, dict[str, Any]] | None
                 ) -> list[dict[str, Any]]:
    """The runners in flight, then those seen in flight earlier (by this view) that are no
    longer: idle, or gone (their last heard says which is likelier)."""
    runners = stats.get("runners") or []
    busy = {r["worker_id"] for r in runners}
    earlier = sorted((dict(r, status="idle", rollout_id=f"(last: {r['rollout_id']})")
                      for w, r in (seen or {}).items() if w not in busy),
                     key=lambda r: -r["last_heard"])
    return runners + earlier


def _runners_table(stats: dict[str, Any], runners: list[dict[str, Any]], rows: int | None
                   ) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left",
                  title=f"runners with an attempt in flight: "
                        f"{stats.get('runners_in_flight', 0):,} "
                        f"({stats.get('attempts_in_flight', 0):,} attempts)")
    for name in ("worker", "doing", "rollout", "attempt", "last heard"):
        table.add_column(name)
    now = stats.get("time", time.time())
    shown = runners if rows is None or len(runners) <= rows else runners[:rows - 1]
    for runner in shown:
        table.add_row(runner["worker_id"] or "(no worker id)", runner["status"],
                      runner["rollout_id"], f"#{runner['attempt']}",
                      _ago(now - runner["last_heard"]))
    if len(shown) < len(runners):
        table.add_row("…", f"{len(runners) - len(shown)} more", "", "", "")
    return table


def _flat(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with the counters since start at the top, and the spans ever stored."""
    flat = {**stats, **stats.get("since_start", {})}
    flat["spans_stored"] = flat.get("total_spans", 0) + flat.get("spans_evicted", 0)
    return flat


def _budget(height: int | None, runners: int, calls: int) -> tuple[int | None, int | None]:
    """Rows of the runners' and the calls' tables in a terminal ``height`` lines high (None:
    no limit): all if they fit, else at least half to the runners."""
    if height is None:
        return None, None
    rows = max(2, height - _FIXED_LINES)
    if runners + calls <= rows:
        return runners, calls
    mine = min(runners, max(rows - min(calls, rows // 2), 1))
    return mine, max(rows - mine, 1)


def frame(address: str, current: Sample, previous: Sample | None, interval: float,
          height: int | None = None, seen: dict[str, dict[str, Any]] | None = None
          ) -> RenderableType:
    """One frame: ``current``, with rates over the interval since ``previous``, fit into
    ``height`` lines (None: all rows); ``seen``: the latest row of every runner seen in
    flight so far (see :func:`remember`)."""
    stats, info = _flat(current.stats), current.info
    delta = _Delta(stats, None if previous is None else _flat(previous.stats))
    header = Text.assemble(
        ("mpstore ", "bold"), f"{info.get('version', '?')} at {address} · pid "
        f"{info.get('pid', '?')} · up {_uptime(stats.get('uptime', 0))} · every "
        f"{interval:g} s · q quits")
    runners = _runner_rows(stats, seen)
    runner_rows, call_rows = _budget(height, len(runners),
                                     len((stats.get("server") or {}).get("calls") or ()))
    parts: list[RenderableType] = [header, _overview(stats, delta),
                                   _runners_table(stats, runners, runner_rows)]
    calls = _calls_table(stats, delta, call_rows)
    if calls is not None:
        parts.append(calls)
    return Group(*parts)


def remember(seen: dict[str, dict[str, Any]], stats: dict[str, Any]) -> None:
    """Note the runners in flight in ``stats`` (the most recently heard 1,000 are kept)."""
    for row in stats.get("runners") or []:
        if row["worker_id"] is not None:
            seen.pop(row["worker_id"], None)
            seen[row["worker_id"]] = row
    while len(seen) > _RUNNERS_SEEN:
        del seen[next(iter(seen))]


def unreachable(address: str, reason: str, interval: float) -> RenderableType:
    """The frame shown while no server answers."""
    return Group(Text.assemble(("mpstore ", "bold"), f"at {address} · q quits"),
                 Text(f"server unreachable, retrying every {interval:g} s ({reason})",
                      style="bold red"))


# ------------------------------------------------------------------ the loop
class _Source:
    """Samples of one server, reconnecting after it went away."""

    def __init__(self, host: str, port: int, authkey_file: str | None, timeout: float
                 ) -> None:
        self.host, self.port, self.authkey_file, self.timeout = host, port, authkey_file, timeout
        self._client: StoreClient | None = None
        self._info: dict[str, Any] = {}

    def sample(self) -> Sample:
        """The next sample; raises MpstoreError or OSError while the server cannot answer."""
        try:
            if self._client is None:
                self._client = connect((self.host, self.port), authkey_file=self.authkey_file,
                                       timeout=self.timeout, retry_for=0)
                self._info = self._client.ping()
            return Sample(self._client.statistics(), self._info)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


class _Keys:
    """Single key presses from a terminal (cbreak mode), and Ctrl-C.

    SIGINT does not raise here: its handler only records it and wakes the wait (a pipe), so
    it can never interrupt a call to the server half-way (which could leave the client's
    locks held); the loop then ends at its next wait."""

    def __init__(self) -> None:
        self._fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        self._saved: Any = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._previous: Any = None
        self.interrupted = False

    def __enter__(self) -> _Keys:
        self._previous = signal.signal(signal.SIGINT, self._interrupt)
        if self._fd is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
        signal.signal(signal.SIGINT, self._previous)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def quit_within(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True as soon as q or Ctrl-C is pressed."""
        watched = [self._wake_r] + ([self._fd] if self._fd is not None else [])
        deadline = time.monotonic() + seconds
        while not self.interrupted and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(watched, [], [], left)
            if self._fd in ready and os.read(self._fd, 1) in (b"q", b"Q"):
                return True
        return self.interrupted


def _once(source: _Source, address: str, interval: float, console: Console) -> int:
    try:
        first = source.sample()
        time.sleep(interval)  # the second sample, for rates over the interval
        second = source.sample()
    except (MpstoreError, OSError, EOFError) as exc:
        console.print(f"server unreachable at {address}: {_reason(exc)}", style="bold red")
        return 1
    seen: dict[str, dict[str, Any]] = {}
    remember(seen, first.stats)
    console.print(frame(address, second, first, interval, seen=seen))
    return 0


def _live(source: _Source, address: str, interval: float, console: Console) -> int:
    previous: Sample | None = None
    seen: dict[str, dict[str, Any]] = {}
    with _Keys() as keys, Live(console=console, screen=True, auto_refresh=False,
                               redirect_stdout=False, redirect_stderr=False) as live:
        while True:
            try:
                current = source.sample()
            except (MpstoreError, OSError, EOFError) as exc:
                previous = None
                live.update(unreachable(address, _reason(exc), interval), refresh=True)
            else:
                live.update(frame(address, current, previous, interval,
                                  console.size.height, seen), refresh=True)
                remember(seen, current.stats)
                previous = current
            if keys.quit_within(interval):
                return 0


def run_top(host: str, port: int, *, authkey_file: str | None, interval: float, once: bool,
            timeout: float) -> int:
    """``agl top``: the exit code (0; 1 if ``once`` and no server answered)."""
    address = f"{host}:{port}"
    source = _Source(host, port, authkey_file, timeout)
    console = Console()
    if once:
        try:
            code = _once(source, address, interval, Console(width=max(console.width, 100)))
        except KeyboardInterrupt:
            return 130  # interrupted, perhaps inside a call: exit without closing politely
        source.close()
        return code
    try:
        return _live(source, address, interval, console)
    finally:
        source.close()

