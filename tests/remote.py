"""Real servers for tests.

* :func:`running_server`: ``python -m mpstore store`` (the code behind ``agl store``) as a
  subprocess on a free 127.0.0.1 port, with its key and log in ``tmp_path``; stopped with
  SIGTERM at the end, which must exit 0.
* :func:`fresh_remote_store`: that, plus a connected client: the ``store`` fixture of
  tests/conftest.py runs the contract suite through it, so every remote test gets a fresh,
  empty server.
* :class:`ClockedServer`: the real server code (:func:`mpstore.manager.server.serve`) in a
  child process, serving an ``InMemoryStore`` whose clock reads a shared
  ``multiprocessing`` double that the test advances; :class:`ValueClock` is that clock, with
  FakeClock's interface (``now``, ``advance``), so a test drives time in the server exactly as
  it does in process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mpstore import InMemoryStore, StoreClient, connect
from mpstore.manager import serve
from mpstore.manager.ports import free_port
from mpstore.testing import ServerProcess, start_server, write_key_file
from tests.certs import TLSFiles
from tests.conftest import FakeClock

__all__ = ["ClockedServer", "ValueClock", "fresh_remote_store", "running_server"]


@contextlib.contextmanager
def running_server(tmp_path: Path, *args: str, port: int | None = None,
                   env: dict[str, str] | None = None, tls: TLSFiles | None = None,
                   **connect_args: Any) -> Iterator[ServerProcess]:
    """A real ``agl store`` subprocess (key ``tmp_path/authkey``, log ``tmp_path/server.log``);
    it must stop gracefully (exit 0) at the end unless the test already stopped it. With
    ``tls``, it speaks TLS with those certificates and its ``connect()`` verifies them;
    ``connect_args`` are more of ``connect()``'s (for every ``server.connect()``)."""
    key = tmp_path / "authkey"
    if not key.exists():
        write_key_file(key)
    if tls is not None:
        args = (*tls.server_args(), *args)
        connect_args = {**tls.client_args(), **connect_args}
    server = start_server(port, authkey_file=key, log_path=tmp_path / "server.log",
                          args=args, env=env, connect_args=connect_args)
    try:
        yield server
    finally:
        if server.popen.poll() is None:
            code = server.stop()
            assert code == 0, f"agl store exited with {code}:\n{server.log()}"


@contextlib.contextmanager
def fresh_remote_store(tmp_path: Any, *args: str, tls: TLSFiles | None = None
                       ) -> Iterator[StoreClient]:
    """A client connected to a fresh ``agl store`` server (``args``: more options; over TLS
    with ``tls``), torn down afterwards."""
    with running_server(Path(tmp_path), *args, tls=tls) as server:
        client = server.connect()
        try:
            yield client
        finally:
            client.close()


class ValueClock(FakeClock):
    """A FakeClock whose time lives in shared memory, so that a server in a child process
    reads what the test sets. Picklable to a child as a Process argument."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._value = multiprocessing.RawValue("d", start)

    @property  # type: ignore[override]
    def now(self) -> float:
        return float(self._value.value)

    @now.setter
    def now(self, value: float) -> None:
        self._value.value = value


def _serve_clocked(clock: ValueClock, port: int, authkey: bytes, ready: Any) -> None:
    """Child process: the real server code on a store with the test's clock. The watchdog
    ticker is off so that, as in process, the watchdog runs only when a call runs it."""
    store = InMemoryStore(clock=clock, copy_records=False)
    serve(store, "127.0.0.1", port, authkey=authkey, watchdog_interval=None,
          on_ready=lambda address: ready.set())


def _context() -> Any:
    """forkserver where there is one: a clean single-threaded parent (unlike a pytest process
    with threads), and each later child starts in milliseconds instead of a spawn's ~0.5 s."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.remote"])  # children start with it imported
    return ctx


class ClockedServer:
    """``serve()`` in a child process with a :class:`ValueClock`; ``client`` talks to it.
    Stop it with :meth:`stop` (SIGTERM: the same graceful path as ``agl store``)."""

    def __init__(self, tmp_dir: Path, clock: ValueClock | None = None) -> None:
        self.clock = clock or ValueClock()
        self.authkey = write_key_file(tmp_dir / "authkey").read_bytes().strip()
        ctx = _context()
        ready = ctx.Event()
        for _attempt in range(5):
            self.port = free_port()
            self.process = ctx.Process(target=_serve_clocked, daemon=True,
                                       args=(self.clock, self.port, self.authkey, ready))
            self.process.start()
            if self._wait_ready(ready):
                break
        else:
            raise RuntimeError("the clocked server did not start")
        self.client = connect(f"127.0.0.1:{self.port}", self.authkey)

    def _wait_ready(self, ready: Any) -> bool:
        """True once the child listens; False if it died first (e.g. the port was taken)."""
        while not ready.wait(0.05):
            if not self.process.is_alive():
                return False
        return True

    def stop(self) -> int | None:
        self.client.close()
        self.process.terminate()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        return self.process.exitcode

    def __enter__(self) -> ClockedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
