"""Server restarts (issue 5): the server is SIGKILLed (or stopped with SIGSTOP) while clients
are mid-call: blocked in ``wait_for_rollouts`` (bounded and unbounded) and in
``dequeue_rollout(wait=...)``, and busy with streams of reads and writes, in threads and in
another process. Every call returns or raises ``StoreUnavailable`` within its bound (no hang),
and after a restart on the same port the very same client objects work again.

Bounds: a call outlives a dead server by at most ``retry_for`` (plus its reply timeout when the
server stops answering without closing: SIGSTOP).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from mpstore import StoreClient, StoreUnavailable
from mpstore.testing import ServerProcess, start_server, write_key_file
from tests.faults import blocked_reading, mp_context, wait_until
from tests.remote import running_server

RETRY_FOR = 1.0
TIMEOUT = 1.0
MARGIN = 2.0


def restart(old: ServerProcess, tmp_path: Path, n: int) -> ServerProcess:
    """A new server on the old one's port with the same key (as a supervisor would)."""
    return start_server(old.port, authkey_file=old.authkey_file,
                        log_path=tmp_path / f"server-{n}.log")


class Caller(threading.Thread):
    """Repeats one call in a thread until one fails or it is told to stop, timing every
    call; records what each call ended with ("ok", "unavailable" or another exception)."""

    def __init__(self, name: str, call: Callable[[], Any], repeat: bool = True) -> None:
        super().__init__(name=name, daemon=True)
        self.call, self.repeat = call, repeat
        self.stop = threading.Event()
        self.started_call = threading.Event()
        self.outcomes: list[tuple[str, float]] = []  # (outcome, seconds)

    def run(self) -> None:
        for _ in range(100_000):
            start = time.monotonic()
            self.started_call.set()
            try:
                self.call()
                outcome = "ok"
            except StoreUnavailable:
                outcome = "unavailable"
            except Exception as exc:  # anything else is a failure of the test
                outcome = f"{type(exc).__name__}: {exc}"
            self.outcomes.append((outcome, time.monotonic() - start))
            if not self.repeat or outcome != "ok" or self.stop.is_set():
                return


def _busy_child(address: str, key: bytes, events: Any, rounds: int) -> None:
    """Another process: enqueue + query in a loop until a call raises StoreUnavailable;
    reports how long that call took."""
    from mpstore import connect

    store = connect(address, key, timeout=TIMEOUT, retry_for=RETRY_FOR)
    events.put(("ready", os.getpid()))
    for _ in range(rounds):
        start = time.monotonic()
        try:
            store.enqueue_rollout({"from": "child"})
            store.query_rollouts(status=["queuing"])
        except StoreUnavailable:
            events.put(("unavailable", time.monotonic() - start))
            return


def _child_after_restart(address: str, key: bytes, events: Any, go: Any) -> None:
    from mpstore import connect

    store = connect(address, key, timeout=TIMEOUT, retry_for=RETRY_FOR)
    store.ping()
    events.put(("ready", os.getpid()))
    assert go.wait(60)
    try:
        store.ping()  # the old connection is dead; the same object reconnects
        events.put(("ok", store.statistics()["total_rollouts"]))
    except Exception as exc:
        events.put(("error", repr(exc)))


def _callers(client: StoreClient, rid: str) -> list[Caller]:
    return [
        Caller("wait-unbounded", lambda: client.wait_for_rollouts(rollout_ids=[rid]), False),
        Caller("wait-bounded", lambda: client.wait_for_rollouts(rollout_ids=[rid],
                                                                timeout=30), False),
        Caller("dequeue", lambda: client.dequeue_rollout(worker_id="w", wait=30), False),
        Caller("writes", lambda: client.start_rollout({"q": 1})),  # never queued
        Caller("reads", lambda: client.query_rollouts(status=["queuing"])),
        Caller("spans-stats", lambda: client.statistics()),
    ]


def crash_round(server: ServerProcess, client: StoreClient, how: str, tmp_path: Path,
                n: int) -> ServerProcess:
    """Callers mid-call in threads, then ``how`` (SIGKILL, or SIGSTOP then SIGKILL) the
    server: every call ends within its bound with StoreUnavailable. Then a server restarted
    on the same port serves the very same client, in this thread and in new ones. Returns
    the new server."""
    rid = client.start_rollout({"q": "never finishes"}).rollout_id
    callers = _callers(client, rid)
    for caller in callers:
        caller.start()
        assert caller.started_call.wait(10)
    wait_until(lambda: all(c.outcomes for c in callers if c.repeat), 10,
               "every repeating caller completed a call")
    proc = psutil.Process(server.pid)
    if how == "sigkill":
        server.kill()
    else:
        os.kill(server.pid, signal.SIGSTOP)
        wait_until(lambda: proc.status() == psutil.STATUS_STOPPED, 10, "server stopped")
    died = time.monotonic()
    try:
        # Pieces of waits (TIMEOUT), a reply timeout (TIMEOUT), then retry_for.
        bound = 2 * TIMEOUT + RETRY_FOR + MARGIN
        for caller in callers:
            caller.join(bound + 10)
            assert not caller.is_alive(), f"{caller.name} hangs"
            outcome, seconds = caller.outcomes[-1]
            assert outcome == "unavailable", (caller.name, caller.outcomes[-3:])
            assert time.monotonic() - died < bound, (caller.name, seconds)
        # A call made now fails within retry_for (+ a reply/connect timeout).
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            client.ping()
        assert time.monotonic() - start < TIMEOUT + RETRY_FOR + MARGIN
    finally:
        if how == "sigstop":
            server.kill()  # SIGKILL works on a stopped process
    second = restart(server, tmp_path, n)
    # The same client object, in this thread and in new ones.
    assert client.ping()["pid"] == second.pid
    assert client.statistics()["total_rollouts"] == 0  # a fresh in-memory store
    again = [c for c in _callers(client, client.start_rollout({}).rollout_id) if c.repeat]
    for caller in again:
        caller.start()
    wait_until(lambda: all(c.outcomes for c in again), 10, "calls after the restart")
    for caller in again:
        caller.stop.set()
        caller.join(10)
        assert {o for o, _ in caller.outcomes} == {"ok"}, caller.outcomes
    return second


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_calls_end_in_time_and_the_same_clients_work_after_a_restart(
        tmp_path: Path, how: str) -> None:
    ctx = mp_context()
    with running_server(tmp_path) as server:
        client = server.connect(timeout=TIMEOUT, retry_for=RETRY_FOR)
        events, go = ctx.Queue(), ctx.Event()
        child = ctx.Process(target=_child_after_restart, daemon=True,
                            args=(server.address, server.authkey, events, go))
        child.start()
        assert events.get(timeout=30)[0] == "ready"
        second = crash_round(server, client, how, tmp_path, 2)
        try:
            go.set()  # and the same client object in another process
            kind, detail = events.get(timeout=30)
            assert kind == "ok", detail
            child.join(10)
            assert child.exitcode == 0
        finally:
            assert second.stop() == 0
        client.close()


@pytest.mark.stress
def test_calls_end_in_time_over_many_crashes_stress(tmp_path: Path) -> None:
    rounds, started = 30, time.monotonic()
    server = start_server(authkey_file=write_key_file(tmp_path / "authkey"),
                          log_path=tmp_path / "server-1.log")
    client = server.connect(timeout=TIMEOUT, retry_for=RETRY_FOR)
    try:
        for n in range(rounds):
            server = crash_round(server, client, ["sigkill", "sigstop"][n % 2], tmp_path, n + 2)
    finally:
        server.stop()
    print(f"\nrestarts: {rounds} rounds of 6 callers in {time.monotonic() - started:.1f} s")


def test_blocked_waits_continue_on_a_server_restarted_within_retry_for(tmp_path: Path) -> None:
    # A read (here a bounded wait) that finds the server gone keeps trying for retry_for; a
    # server back on the port in that time answers it (the new, empty store knows no such
    # rollout: the wait returns nothing, as for any unknown id, D11).
    with running_server(tmp_path) as server:
        client = server.connect(timeout=5.0, retry_for=30.0)
        rid = client.start_rollout({"q": 1}).rollout_id
        result: list[Any] = []
        waiter = threading.Thread(target=lambda: result.append(
            client.wait_for_rollouts(rollout_ids=[rid], timeout=60)))
        waiter.start()
        wait_until(lambda: "recv" in _innermost(waiter) or "read" in _innermost(waiter), 10,
                   "the waiter blocked on its reply")
        server.kill()
        second = restart(server, tmp_path, 2)
        try:
            waiter.join(30)
            assert not waiter.is_alive()
            assert result == [[]]
            assert client.ping()["pid"] == second.pid
        finally:
            assert second.stop() == 0


def _innermost(thread: threading.Thread) -> str:
    import sys

    frame = sys._current_frames().get(thread.ident or 0)
    return frame.f_code.co_name if frame is not None else ""


def test_a_process_mid_stream_sees_store_unavailable_then_recovers(tmp_path: Path) -> None:
    ctx = mp_context()
    with running_server(tmp_path) as server:
        events = ctx.Queue()
        child = ctx.Process(target=_busy_child, daemon=True,
                            args=(server.address, server.authkey, events, 100_000))
        child.start()
        kind, pid = events.get(timeout=30)
        wait_until(lambda: blocked_reading(pid), 10, "the child mid-call")
        server.kill()
        kind, seconds = events.get(timeout=RETRY_FOR + TIMEOUT + 30)
        assert kind == "unavailable" and seconds < RETRY_FOR + TIMEOUT + MARGIN
        child.join(30)
        assert child.exitcode == 0
