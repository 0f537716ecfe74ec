"""A real dashboard for tests: ``agl dashboard`` as a subprocess in front of a real
``agl store``, and a store filled with one rollout in every status, spans and resources.

Hostile values (``<script>``, ``<img onerror>``) sit in inputs, metadata, worker ids, span
names and span attributes: pages must show them as text.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpstore import RolloutConfig, Span
from mpstore.manager.ports import free_port

__all__ = ["EVIL", "Dashboard", "Filled", "fetch", "fill", "running_dashboard"]

#: Markup that must never run: each would set ``window.pwned`` (or call alert) if it did.
EVIL = {
    "script": "<script>window.pwned = 1; alert('xss')</script>",
    "img": '<img src=x onerror="window.pwned = 2">',
}


@dataclass
class Filled:
    """What :func:`fill` stored: rollout ids by status, the traced attempt, span names."""

    by_status: dict[str, str] = field(default_factory=dict)
    traced: tuple[str, str] = ("", "")
    span_names: list[str] = field(default_factory=list)
    resources_id: str = ""
    old_resources_id: str = ""
    workers: dict[str, str] = field(default_factory=dict)  # worker -> rollout it holds
    idle_workers: set[str] = field(default_factory=set)  # their attempts ended


def _claim(store: Any, worker: str, **kwargs: Any) -> Any:
    """Enqueue a rollout and claim exactly it (the queue is FIFO: it must be empty)."""
    rollout = store.enqueue_rollout(**kwargs)
    claimed = store.dequeue_rollout(worker_id=worker)
    assert claimed is not None and claimed.rollout_id == rollout.rollout_id
    return claimed


def _trace(store: Any, rollout_id: str, attempt_id: str, base: float) -> list[str]:
    """A root, two children and a grandchild with known times; returns the names."""
    root = Span(rollout_id, attempt_id, 1, "agent.run", start_time=base, end_time=base + 2.0,
                attributes={"note": EVIL["script"], "tokens": 3})
    llm = Span(rollout_id, attempt_id, 2, "llm.call", parent_id=root.span_id,
               start_time=base + 0.2, end_time=base + 1.2, attributes={"model": EVIL["img"]})
    tool = Span(rollout_id, attempt_id, 3, "tool.search", parent_id=root.span_id,
                start_time=base + 1.3, end_time=base + 1.9)
    leaf = Span(rollout_id, attempt_id, 4, EVIL["img"], parent_id=llm.span_id,
                start_time=base + 0.3, end_time=base + 0.8)
    store.add_many_spans([root, llm, tool, leaf])
    return [root.name, llm.name, tool.name, leaf.name]


def fill(store: Any) -> Filled:
    """One rollout in every status, a traced running attempt, two resources versions."""
    out = Filled()
    old = store.add_resources({"prompt": {"template": "Q: {q}", "engine": "f-string",
                                          "resource_type": "prompt_template"}})
    store.update_resources("rs-main", {"llm": {"endpoint": "http://127.0.0.1:9/v0",
                                               "model": "older", "resource_type": "llm"}})
    latest = store.update_resources("rs-main", {"llm": {
        "endpoint": "http://127.0.0.1:9/v1", "model": "tiny", "api_key": "sk-do-not-show",
        "sampling_parameters": {"max_tokens": 16}, "resource_type": "llm"}})
    out.resources_id, out.old_resources_id = latest.resources_id, old.resources_id
    common = {"metadata": {"note": EVIL["img"]}, "resources_id": latest.resources_id}
    evil_input = {"question": EVIL["script"], "image": EVIL["img"]}

    running = _claim(store, "runner-1", input=evil_input, **common)
    out.traced = (running.rollout_id, running.attempt.attempt_id)
    out.span_names = _trace(store, *out.traced, base=time.time() - 5)
    store.update_attempt(*out.traced, status="running")
    out.by_status["running"] = running.rollout_id
    preparing = _claim(store, EVIL["script"], input={"q": "preparing"}, **common)
    out.by_status["preparing"] = preparing.rollout_id
    out.workers = {"runner-1": running.rollout_id, EVIL["script"]: preparing.rollout_id}
    for status in ("succeeded", "failed"):
        done = _claim(store, "runner-2", input={"q": status}, **common)
        store.update_attempt(done.rollout_id, done.attempt.attempt_id, status=status)
        out.by_status[status] = done.rollout_id
    out.idle_workers = {"runner-2", "runner-3"}
    retry = RolloutConfig(max_attempts=3, retry_condition=["failed"])
    again = _claim(store, "runner-3", input={"q": "requeuing"}, config=retry, **common)
    store.update_attempt(again.rollout_id, again.attempt.attempt_id, status="failed")
    out.by_status["requeuing"] = again.rollout_id
    cancelled = store.enqueue_rollout(input={"q": "cancelled"}, **common)
    store.update_rollout(cancelled.rollout_id, status="cancelled")
    out.by_status["cancelled"] = cancelled.rollout_id
    # requeuing sits in the queue: claim nothing after this point
    out.by_status["queuing"] = store.enqueue_rollout(input={"q": "queuing"}, **common).rollout_id
    return out


@dataclass
class Dashboard:
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def fetch(url: str, headers: dict[str, str] | None = None,
          timeout: float = 30.0) -> tuple[int, dict[str, str], str]:
    """GET ``url``: status, headers (lower-case names) and body, errors included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return (response.status, {k.lower(): v for k, v in response.headers.items()},
                    response.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()


def _wait_ready(dash: Dashboard, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dash.popen.poll() is not None:
            return False
        try:
            fetch(dash.url + "/static/dashboard.css", timeout=2)
            return True
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"agl dashboard did not answer within {timeout} s:\n{dash.log()}")


@contextlib.contextmanager
def running_dashboard(tmp_path: Path, store: str, *args: str,
                      env: dict[str, str] | None = None) -> Iterator[Dashboard]:
    """``python -m mpstore dashboard --store STORE ARGS`` on a free port; SIGTERM at the end,
    which must exit 0."""
    log = tmp_path / f"dashboard-{time.monotonic_ns()}.log"
    for _attempt in range(5):
        port = free_port()
        command = [sys.executable, "-m", "mpstore", "dashboard", "--port", str(port),
                   "--store", store, *args]
        with open(log, "ab") as sink:
            popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        dash = Dashboard(popen, port, log)
        if _wait_ready(dash, 30):
            break
    else:
        raise RuntimeError(f"agl dashboard did not start:\n{dash.log()}")
    try:
        yield dash
    finally:
        if popen.poll() is None:
            popen.terminate()
            try:
                code = popen.wait(10)
            except subprocess.TimeoutExpired:
                popen.kill()
                code = popen.wait()
            assert code == 0, f"agl dashboard exited with {code}:\n{dash.log()}"
