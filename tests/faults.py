"""Helpers of the reliability and security tests (issue 5): what a test needs to watch a real
``agl store`` process from outside (threads, file descriptors, memory, connections), raw
connections that speak the wire protocol by hand, and polling with a deadline.

No fixed sleeps: every wait polls a real condition and fails with a message at its deadline.
"""

from __future__ import annotations

import pickle
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

import psutil

from mpstore.manager.sockets import set_socket_timeouts
from mpstore.manager.wire import HELLO, PROTOCOL, STORE_IDENT, hello
from mpstore.testing import ServerProcess

__all__ = [
    "ABANDONED",
    "Usage",
    "authenticated",
    "blocked_reading",
    "mp_context",
    "ping_time",
    "raw_socket",
    "request",
    "usage",
    "wait_until",
]


#: What the server logs when it abandons a blocking call whose caller disconnected.
ABANDONED = "disconnected while it waited; call abandoned"


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.01) -> Any:
    """Poll ``condition`` until it is truthy; AssertionError (naming ``what``) at the deadline.
    Returns the truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met within {timeout:g} s"
        time.sleep(interval)


class Usage:
    """Resources of a server process at one moment."""

    def __init__(self, threads: int, fds: int, rss: int, connections: int) -> None:
        self.threads, self.fds, self.rss, self.connections = threads, fds, rss, connections

    def within(self, bound: Usage, slack_threads: int = 2, slack_fds: int = 4) -> bool:
        return (self.threads <= bound.threads + slack_threads
                and self.fds <= bound.fds + slack_fds)

    def __repr__(self) -> str:
        return (f"Usage(threads={self.threads}, fds={self.fds}, rss={self.rss >> 20} MiB, "
                f"connections={self.connections})")


def usage(server: ServerProcess) -> Usage:
    """Threads, open file descriptors, RSS and established connections of the server."""
    proc = psutil.Process(server.pid)
    established = sum(1 for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_ESTABLISHED)
    return Usage(proc.num_threads(), proc.num_fds(), proc.memory_info().rss, established)


def raw_socket(server: ServerProcess, timeout: float = 5.0) -> socket.socket:
    """A plain TCP connection to the server (nothing said yet)."""
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def authenticated(server: ServerProcess, timeout: float = 5.0, say_version: bool = True
                  ) -> Connection:
    """A connection that has passed the handshake with the server's key, as a client's does,
    so a test can then send whatever frames it likes."""
    sock = raw_socket(server, timeout)
    sock.settimeout(None)  # a blocking fd, the kernel's timeouts (as the client does)
    set_socket_timeouts(sock, timeout, timeout)
    conn = Connection(sock.detach())
    answer_challenge(conn, server.authkey)
    deliver_challenge(conn, server.authkey)
    if say_version:  # as mpstore's client does: its wire version, then the server's
        conn.send_bytes(hello())
        assert conn.recv_bytes().startswith(HELLO)
    return conn


def request(conn: Connection, name: str, *args: Any, **kwargs: Any) -> None:
    """Send one store call on a raw connection (the reply is left for the caller)."""
    conn.send_bytes(pickle.dumps((STORE_IDENT, name, args, kwargs), PROTOCOL))


def ping_time(server: ServerProcess, limit: float = 1.0) -> float:
    """Seconds a fresh, good client takes to connect and get ``ping`` answered; it must
    answer within ``limit`` (the client gives up after that: no retries)."""
    start = time.monotonic()
    with server.connect(timeout=limit, retry_for=0) as client:
        assert client.ping()["name"] == "mpstore"
    elapsed = time.monotonic() - start
    assert elapsed < limit, f"ping took {elapsed:.2f} s"
    return elapsed


#: read(2)'s number in /proc/PID/syscall, per machine.
#: read(2) and recvfrom(2) (what socket.recv calls) by machine: a client waits for its reply
#: in one of them.
_READ_SYSCALLS = {"x86_64": ("0", "45"), "aarch64": ("63", "207")}


def blocked_reading(pid: int) -> bool:
    """True once process ``pid``'s main thread sleeps in read(2) or recvfrom(2) (a client
    waiting for a reply). Where /proc does not tell, True once it sleeps at all."""
    import platform

    try:
        with open(f"/proc/{pid}/syscall") as handle:
            fields = handle.read().split()
        numbers = _READ_SYSCALLS.get(platform.machine())
        if numbers is not None and fields:
            return fields[0] in numbers
    except OSError:
        pass
    return psutil.Process(pid).status() == psutil.STATUS_SLEEPING


def mp_context() -> Any:
    """forkserver where there is one (children start fast, from a clean parent), else spawn."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")
