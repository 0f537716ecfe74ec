"""The transport with real processes: an ``agl store`` subprocess, clients in this process, in
its threads and in forked, spawned and forkserver children.

Covers SPEC §5: the client's method set and signatures, remote tracebacks (tblib), one
connection per thread, fork safety, reconnect after kill -9 and restart, the retry policy
(reads retried, in-flight writes never repeated), timeouts against a stopped server, the
listen backlog, and stock ``BaseProxy`` compatibility.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mpstore import (
    UNSET,
    AttemptNotFound,
    InMemoryStore,
    InvalidArgument,
    RolloutNotFound,
    Span,
    StoreClient,
    StoreUnavailable,
    connect,
)
from mpstore.api import SERVED as REMOTE_METHODS
from mpstore.manager import StoreManager, serve
from mpstore.manager.client import parse_address
from mpstore.manager.ports import free_port
from mpstore.testing import ServerProcess, start_server
from tests.remote import running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path) as srv:
        yield srv


@pytest.fixture
def client(server: ServerProcess) -> Iterator[StoreClient]:
    with server.connect() as c:
        yield c


def restart(old: ServerProcess, tmp_path: Path) -> ServerProcess:
    """A new server on the old one's port, with the same key (as after a crash)."""
    return start_server(old.port, authkey_file=old.authkey_file,
                        log_path=tmp_path / "server2.log")


def server_connections(server: ServerProcess) -> int:
    """Established connections the server process holds on its port."""
    return sum(
        1 for c in psutil.Process(server.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port
    )


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    """Poll a real condition with a deadline (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --------------------------------------------------------------------------- the API
def test_client_has_exactly_the_store_methods_and_signatures() -> None:
    # deferred_commits, durable and once are the server's own business, not served.
    public = {n for n in dir(InMemoryStore) if not n.startswith("_")} - {
        "deferred_commits", "durable", "once"}
    assert {n for n in dir(StoreClient) if not n.startswith("_")} - {"address"} == public
    assert not {"deferred_commits", "durable"} & set(REMOTE_METHODS)
    for name in public:
        assert inspect.signature(getattr(StoreClient, name)) == inspect.signature(
            getattr(InMemoryStore, name)), name
    assert "close" not in REMOTE_METHODS  # the client's close() never closes the server's store


def test_address_forms() -> None:
    assert parse_address("127.0.0.1:4747") == ("127.0.0.1", 4747)
    assert parse_address("localhost") == ("localhost", 4747)
    assert parse_address("[::1]:5000") == ("::1", 5000)
    assert parse_address(("h", 1)) == ("h", 1)
    for bad in ("h:0", "h:x", "", "h:70000"):
        with pytest.raises(InvalidArgument):
            parse_address(bad)


def test_unset_defaults_and_keyword_only_arguments_cross_the_wire(client: StoreClient) -> None:
    claimed = client.start_rollout({"q": 1}, worker_id="w1")
    updated = client.update_attempt(claimed.rollout_id, "latest", metadata={"note": 1})
    assert updated.status == "preparing" and updated.worker_id == "w1"  # UNSET kept them
    assert client.update_rollout(claimed.rollout_id, mode=UNSET).mode is None
    with pytest.raises(TypeError) as remote:
        client.dequeue_rollout("w", 0.5)  # wait is keyword-only, remotely too
    with pytest.raises(TypeError) as local:
        InMemoryStore().dequeue_rollout("w", 0.5)  # type: ignore[misc]
    assert str(remote.value) == str(local.value)
    assert client.dequeue_rollout("w", wait=0.01) is None


def test_store_errors_arrive_as_themselves(client: StoreClient) -> None:
    rollout = client.start_rollout({"q": 1})
    with pytest.raises(AttemptNotFound, match="Attempt at-x not found for rollout"):
        client.update_attempt(rollout.rollout_id, "at-x", status="failed")
    with pytest.raises(InvalidArgument) as info:
        client.update_rollout(rollout.rollout_id, status="bogus")
    assert isinstance(info.value, ValueError)


def test_arguments_the_server_cannot_unpickle(client: StoreClient,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("only_in_the_test_process")

    class Payload:
        pass

    Payload.__module__, Payload.__qualname__ = module.__name__, "Payload"
    module.Payload = Payload  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    # Refused by the allow-list before any import is tried (see tests/test_safe_pickle.py).
    with pytest.raises(InvalidArgument, match=r"only_in_the_test_process\.Payload, which this "
                                              r"server does not decode"):
        client.enqueue_rollout({"payload": Payload()})
    assert client.statistics()["total_rollouts"] == 0  # and the connection is still in sync


def test_remote_traceback_shows_server_and_caller_frames(client: StoreClient) -> None:
    with pytest.raises(RolloutNotFound) as info:
        client.update_rollout("ro-nope", status="failed")
    assert type(info.value) is RolloutNotFound
    assert str(info.value) == "Rollout ro-nope not found"
    text = "".join(traceback.format_exception(info.value))
    assert "test_remote_traceback_shows_server_and_caller_frames" in text  # the caller
    assert 'mpstore/manager/loop.py", line' in text  # the server's request loop ...
    assert 'mpstore/store.py", line' in text and "in update_rollout" in text  # ... the store
    assert text.rstrip().endswith("mpstore.errors.RolloutNotFound: Rollout ro-nope not found")


def test_stock_baseproxy_can_use_the_server(server: ServerProcess) -> None:
    manager = StoreManager(address=("127.0.0.1", server.port), authkey=server.authkey)
    manager.connect()
    proxy = manager.get_store()
    assert proxy.ping()["name"] == "mpstore"
    with pytest.raises(RolloutNotFound):
        proxy.update_rollout("ro-nope", status="failed")


# --------------------------------------------------------------------------- threads, fork
def test_each_thread_has_its_own_connection(server: ServerProcess,
                                            client: StoreClient) -> None:
    threads, per_thread = 8, 20
    done = threading.Barrier(threads + 1)
    release = threading.Event()
    ids: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(per_thread):
                ids.append(client.enqueue_rollout({"i": i}).rollout_id)
                assert client.get_rollout_by_id(ids[-1]) is not None
        except BaseException as exc:
            errors.append(exc)
        done.wait()
        release.wait(30)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    done.wait(30)
    try:
        assert not errors, errors
        assert server_connections(server) == threads + 1  # + the fixture's own connection
    finally:
        release.set()
        for w in workers:
            w.join()
    assert len(set(ids)) == threads * per_thread
    assert client.statistics()["total_rollouts"] == threads * per_thread
    wait_until(lambda: server_connections(server) == 1)  # ended threads closed theirs


def _child_work(client: StoreClient, results: Any) -> None:
    """In a child process: use the client it was given (inherited or unpickled)."""
    try:
        rollout = client.enqueue_rollout({"from": os.getpid()})
        results.put(("ok", rollout.rollout_id, client.get_rollout_by_id(rollout.rollout_id)
                     is not None))
    except BaseException as exc:  # report instead of dying silently
        results.put(("error", repr(exc), False))


@pytest.mark.parametrize("method", multiprocessing.get_all_start_methods())
def test_child_processes_use_their_own_connection(method: str, client: StoreClient) -> None:
    before = client.enqueue_rollout({"from": "parent"})  # the parent has a live connection
    ctx = multiprocessing.get_context(method)
    results = ctx.Queue()
    children = [ctx.Process(target=_child_work, args=(client, results)) for _ in range(3)]
    for child in children:
        child.start()
    got = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert all(kind == "ok" and seen for kind, _, seen in got), got
    # The parent's connection was neither used nor closed by the children.
    assert client.get_rollout_by_id(before.rollout_id) is not None
    assert client.statistics()["total_rollouts"] == 4


def test_fork_closes_inherited_connections_in_the_child(client: StoreClient) -> None:
    client.ping()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its copy of the parent's connection must be closed, unused
        try:
            ok = client._local.channel.closed and client.ping()["name"] == "mpstore"
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.waitpid(pid, 0)
    assert client.ping()["name"] == "mpstore"


# --------------------------------------------------------------------------- restarts
def test_same_client_works_after_kill_and_restart(tmp_path: Path) -> None:
    with running_server(tmp_path) as first:
        client = first.connect()
        client.enqueue_rollout({"q": 1})
        assert first.kill() == -signal.SIGKILL
        second = restart(first, tmp_path)
        try:
            # A write on the stale connection: it is found dead before sending, so even a
            # non-idempotent call goes to the new server (once) instead of failing.
            assert client.enqueue_rollout({"q": 2}).status == "queuing"
            assert client.statistics()["total_rollouts"] == 1  # a fresh, empty server
            assert client.ping()["pid"] == second.pid
        finally:
            assert second.stop() == 0
        client.close()


def test_read_is_retried_until_the_server_is_back(tmp_path: Path) -> None:
    with running_server(tmp_path) as first:
        client = first.connect(retry_for=60)
        client.ping()
        first.kill()
        result: list[Any] = []
        reader = threading.Thread(target=lambda: result.append(client.query_rollouts()))
        reader.start()  # the server is down: the read keeps retrying
        second = restart(first, tmp_path)
        try:
            reader.join(60)
            assert result == [[]]
        finally:
            second.stop()


def _claim_in_thread(client: Any, outcome: list[Any]) -> threading.Thread:
    """A thread whose dequeue(wait=60) has been sent (it blocks reading) when this returns."""
    connected = threading.Event()

    def claim() -> None:
        client.ping()  # this thread's connection is open ...
        connected.set()
        start = time.monotonic()
        try:
            outcome.append(client.dequeue_rollout(worker_id="w", wait=60))
        except StoreUnavailable as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - start)

    worker = threading.Thread(target=claim)
    worker.start()
    # ... and once it blocks reading, the dequeue request has been sent.
    assert connected.wait(30)
    wait_until(lambda: "recv" in _innermost(worker))
    return worker


def test_a_write_in_flight_when_the_server_dies_is_sent_again(tmp_path: Path) -> None:
    """With request ids every call is retried (within retry_for): the claim reaches the
    restarted server and claims there."""
    with running_server(tmp_path) as first:
        client = first.connect(retry_for=30)
        outcome: list[Any] = []
        worker = _claim_in_thread(client, outcome)
        first.kill()
        second = restart(first, tmp_path)
        try:
            made = second.connect().enqueue_rollout("after the restart")
            worker.join(60)
        finally:
            second.stop()
    claimed, elapsed = outcome
    assert claimed is not None and claimed.rollout_id == made.rollout_id
    assert elapsed < 30


def test_a_write_gives_up_after_retry_for(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        client = srv.connect(retry_for=2)
        outcome: list[Any] = []
        worker = _claim_in_thread(client, outcome)
        srv.kill()
        worker.join(30)
    error, elapsed = outcome
    assert isinstance(error, StoreUnavailable) and "unavailable" in str(error)
    assert 1.5 < elapsed < 10  # after retry_for (2 s), not after the wait (60 s)


def _innermost(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or 0)
    return frame.f_code.co_name if frame is not None else ""


def test_calls_fail_with_store_unavailable_after_retry_for(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        client = srv.connect(retry_for=0.5)
        srv.kill()
        for call in (client.ping, lambda: client.enqueue_rollout({"q": 1})):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match="unavailable"):
                call()
            assert 0.4 < time.monotonic() - start < 5
    with pytest.raises(StoreUnavailable):
        connect(f"127.0.0.1:{free_port()}", b"key", retry_for=0.2)


def test_a_stopped_server_cannot_hold_a_call(server: ServerProcess) -> None:
    client = server.connect(timeout=0.5, retry_for=0.5)
    client.ping()
    os.kill(server.pid, signal.SIGSTOP)
    try:
        process = psutil.Process(server.pid)
        wait_until(lambda: process.status() == psutil.STATUS_STOPPED)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            client.ping()
        assert time.monotonic() - start < 5
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert client.ping()["name"] == "mpstore"


def test_wait_for_rollouts_on_a_dead_server_ends_with_its_own_timeout(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        client = srv.connect(retry_for=30)
        rollout = client.enqueue_rollout({"q": 1})
        srv.kill()
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            client.wait_for_rollouts(rollout_ids=[rollout.rollout_id], timeout=0.5)
        assert time.monotonic() - start < 5  # its own timeout, not retry_for


# --------------------------------------------------------------------------- the server
def test_span_is_retried_safely_because_add_span_is_idempotent(client: StoreClient) -> None:
    claimed = client.start_rollout({"q": 1})
    span = Span(claimed.rollout_id, claimed.attempt.attempt_id, 1, "s")
    assert client.add_span(span) == client.add_span(span)
    assert len(client.query_spans(claimed.rollout_id)) == 1


def test_background_watchdog_fires_without_any_call(tmp_path: Path) -> None:
    with running_server(tmp_path, "--watchdog-interval", "0.05") as srv:
        client = srv.connect()
        claimed = client.start_rollout({"q": 1}, config={"timeout_seconds": 0.1})
        time.sleep(1.0)  # time must pass with no call at all: that is the point
        rollout = client.get_rollout_by_id(claimed.rollout_id)
    assert rollout.status == "failed"
    # Stamped by the ticker soon after the deadline, not by this late read.
    assert rollout.end_time - claimed.start_time < 0.6


def test_burst_of_connections_is_served(server: ServerProcess) -> None:
    count = 64
    barrier = threading.Barrier(count)
    answers: list[Any] = []

    def one() -> None:
        barrier.wait(30)
        with server.connect(timeout=10, retry_for=10) as c:
            answers.append(c.ping()["name"])

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == ["mpstore"] * count


def test_serve_in_a_thread_stops_on_its_event() -> None:
    # serve() outside the main thread: no signal handlers, the stop event ends it.
    stop, ready, port = threading.Event(), threading.Event(), free_port()
    thread = threading.Thread(target=serve, args=(InMemoryStore(copy_records=False),
                                                  "127.0.0.1", port),
                              kwargs={"authkey": b"k", "stop": stop,
                                      "on_ready": lambda address: ready.set()})
    thread.start()
    assert ready.wait(10)
    client = connect(f"127.0.0.1:{port}", b"k", retry_for=0.2)
    assert client.enqueue_rollout({"q": 1}).status == "queuing"
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    with pytest.raises(StoreUnavailable):  # its connection was ended, nobody listens
        client.ping()


def test_listen_backlog_is_at_least_128(server: ServerProcess) -> None:
    # For a listening socket, the kernel reports the backlog as the "send queue" (ss -ltn).
    sockets = Path("/proc/net/tcp")
    if not sockets.exists():
        pytest.skip("needs Linux /proc")
    import shutil
    import subprocess

    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    out = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert int(out[2]) >= 128, out


def test_client_sets_tcp_nodelay(client: StoreClient) -> None:
    client.ping()
    sock = socket.socket(fileno=os.dup(client._local.channel.fileno()))
    with sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# --------------------------------------------------------------------------- busy polling
def test_a_busy_polling_server_sleeps_once_calls_stop(tmp_path: Path) -> None:
    # With --busy-poll 0.1 s the loop polls without sleeping while calls come close together;
    # once they stop it may poll for 0.1 s more, then must sleep: a loop that kept polling
    # would spend the whole idle second on the CPU.
    with running_server(tmp_path, "--busy-poll", "100000") as server:
        client = server.connect()
        for _ in range(300):
            assert client.ping()["pid"] == server.pid
        process = psutil.Process(server.pid)
        before = sum(process.cpu_times()[:2])
        threading.Event().wait(1.0)  # the idle window being measured
        assert sum(process.cpu_times()[:2]) - before < 0.5
        assert client.ping()["pid"] == server.pid  # and it still answers
        client.close()
