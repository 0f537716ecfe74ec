"""The two physical limits of the transport: what a store call could cost at best.

* ``raw``: a ``multiprocessing.connection.Listener`` with an authkey; one server thread per
  connection receives a small tuple and sends it back (pickle + socket + thread hand-off, no
  dispatch).
* ``manager``: a ``multiprocessing.managers.BaseManager`` serving one registered object
  whose ``echo(x)`` returns ``x``; the client calls it through an ordinary proxy (the same
  request/reply path, dispatch and per-connection server threads a store call uses).

Both servers run as their own interpreter, like ``agl store``::

    python -m benchmarks.limits raw --port 5001 --authkey-file key
    python -m benchmarks.limits manager --port 5002 --authkey-file key

The client side (``open_raw`` / ``open_manager``) returns a one-argument callable that does
one round trip; the workload loops in :mod:`benchmarks.workload` drive it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

#: The payload both echoes carry: a small tuple, about the size of a cheap store request.
PAYLOAD: tuple[Any, ...] = ("get_rollout_by_id", ("ro-0123456789ab",), {})

BACKLOG = 1024


class Echo:
    """The trivial registered object of the BaseManager echo."""

    def echo(self, x: Any) -> Any:
        """Return ``x`` unchanged."""
        return x


_ECHO = Echo()


def _get_echo() -> Echo:
    return _ECHO


class EchoServerManager(BaseManager):
    """Server side of the BaseManager echo."""


class EchoClientManager(BaseManager):
    """Client side of the BaseManager echo (no callables: they live in the server)."""


EchoServerManager.register("get_echo", callable=_get_echo)
EchoClientManager.register("get_echo")


# ------------------------------------------------------------------ servers
def _echo_connection(conn: Connection) -> None:
    """Echo every message on ``conn`` until the peer closes it."""
    with conn:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            conn.send(message)


def serve_raw(host: str, port: int, authkey: bytes) -> None:
    """Accept authenticated connections forever; one echo thread per connection."""
    with Listener((host, port), backlog=BACKLOG, authkey=authkey) as listener:
        print(f"raw echo serving on {host}:{port}", flush=True)
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, Exception):  # a failed handshake: keep serving
                continue
            threading.Thread(target=_echo_connection, args=(conn,), daemon=True).start()


def serve_manager(host: str, port: int, authkey: bytes) -> None:
    """Serve the ``Echo`` object with a plain ``BaseManager`` server until killed."""
    manager = EchoServerManager(address=(host, port), authkey=authkey)
    server = manager.get_server()
    print(f"manager echo serving on {host}:{port}", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.limits {raw,manager} --port P --authkey-file F``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["raw", "manager"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--authkey-file", required=True)
    args = parser.parse_args(argv)
    authkey = Path(args.authkey_file).read_bytes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if args.kind == "raw":
            serve_raw(args.host, args.port, authkey)
        else:
            serve_manager(args.host, args.port, authkey)
    except KeyboardInterrupt:
        pass
    return 0


# ------------------------------------------------------------------ clients
def open_raw(address: tuple[str, int], authkey: bytes) -> tuple[Callable[[Any], Any], Any]:
    """A connected raw echo client: ``(call, handle)``; ``call(x)`` is one round trip."""
    conn = Client(tuple(address), authkey=authkey)

    def call(x: Any) -> Any:
        conn.send(x)
        return conn.recv()

    return call, conn


def open_manager(address: tuple[str, int], authkey: bytes
                 ) -> tuple[Callable[[Any], Any], Any]:
    """A connected BaseManager echo client: ``(call, handle)`` over a proxy."""
    manager = EchoClientManager(address=tuple(address), authkey=authkey)
    manager.connect()
    proxy = manager.get_echo()
    return proxy.echo, (manager, proxy)


def close_handle(handle: Any) -> None:
    """Close what ``open_raw``/``open_manager`` opened (best effort)."""
    if isinstance(handle, Connection):
        handle.close()
        return
    if isinstance(handle, tuple):
        _, proxy = handle
        # CPython internal: BaseProxy keeps its connection in _tls.connection (best effort:
        # if it moves, the connection is left to the garbage collector).
        conn = getattr(getattr(proxy, "_tls", None), "connection", None)
        if conn is not None:
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
