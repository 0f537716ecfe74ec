"""Blocking calls in the server (server side): how a waiting call notices that its caller has
gone.

A blocking call (a row of :data:`mpstore.api.CALLS` with a ``wait``: ``wait_for_rollouts``,
``dequeue_rollout`` with a ``wait`` ...) runs in a worker thread of the dispatcher
(:class:`Workers`), as successive waits (:func:`mpstore.api.in_slices`); between them the
worker checks that its caller is still connected, so a caller that died frees its worker
instead of holding it, or claiming rollouts, until the wait ends.

How long a slice is (:func:`slice_seconds`) is a trade: a short one notices a dead caller
sooner, but every slice's end wakes a thread, which takes the GIL and the store's lock from
the threads serving the live calls. With 1,000 idle long-pollers, 1 s slices (1,000 wake-ups
a second) cost the cycle of 4 active clients a quarter of its speed (benchmarks' runners
scenario: x0.69-0.76 against x0.81-0.99 with 10 s slices). So slices are BLOCKING_SLICE long
while few calls wait, and stretched so that all waiting calls together wake at most
SLICE_WAKEUPS times a second, up to LONGEST_SLICE: a dead caller is noticed within 1 s
with up to 50 waiting calls, within 10 s with 500, within 30 s with 1,500 or more.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..api import BLOCKING, in_slices

__all__ = ["BLOCKING_SLICE", "LONGEST_SLICE", "SLICE_WAKEUPS", "WORKER_IDLE", "Abandoned",
           "Workers", "blocks", "hung_up", "slice_seconds", "sliced"]

log = logging.getLogger("mpstore.manager.server")

#: The shortest slice, seconds: how soon a vanished caller is noticed while few calls wait.
BLOCKING_SLICE = 1.0
#: Slice ends per second, all waiting calls together, that slices are stretched to keep under.
SLICE_WAKEUPS = 50.0
#: The longest slice, seconds, however many calls wait.
LONGEST_SLICE = 30.0

_waiting = 0  # blocking calls in their slices now, in this process (under _waiting_lock)
_waiting_lock = threading.Lock()


def slice_seconds(waiting: int) -> float:
    """The slice for a call's next wait while ``waiting`` calls (itself included) wait."""
    return min(max(BLOCKING_SLICE, waiting / SLICE_WAKEUPS), LONGEST_SLICE)
#: Seconds a worker thread with no blocking call to run waits for one before it ends.
WORKER_IDLE = 2.0


class Abandoned(Exception):
    """The caller of a blocking call has disconnected: nobody is left to answer."""


def blocks(name: str, kwds: dict[str, Any]) -> bool:
    """True if the call may wait: a blocking method with a wait that is None or > 0."""
    if name not in BLOCKING:  # the common case, asked of every request: one lookup
        return False
    return BLOCKING[name].longer_than(kwds, 0.0)


def hung_up(fd: int) -> bool:
    """True if the peer closed its end of the connection (a client sends nothing while its
    call runs, so anything readable but data means it has gone)."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.detach()


def sliced(fd: int, name: str, func: Callable[..., Any], args: tuple[Any, ...],
           kwds: dict[str, Any]) -> Any:
    """Run the call, a wait longer than a slice (:func:`slice_seconds`) in slices of it,
    checking between them that the caller on ``fd`` is still connected (raises Abandoned if
    not)."""
    global _waiting
    wait = BLOCKING.get(name)
    with _waiting_lock:
        _waiting += 1
        longest = slice_seconds(_waiting)
    try:
        if wait is None or not wait.longer_than(kwds, longest):
            return func(*args, **kwds)  # short, or not a number (the store rejects it)
        # Each slice's length from the calls waiting when it starts, not only when this
        # call did: long-pollers that arrived one after another would otherwise keep the
        # 1 s slices of the first ones (1,000 of them woke ~200 times a second, not 50).
        return in_slices(wait, lambda kw: func(*args, **kw), kwds,
                         lambda: slice_seconds(_waiting), _check(fd, name))
    finally:
        with _waiting_lock:
            _waiting -= 1


def _check(fd: int, name: str) -> Callable[[], None]:
    """What runs between the slices of a call from ``fd``: raise Abandoned if it hung up."""

    def still_there() -> None:
        if hung_up(fd):
            log.info("A caller of %s disconnected while it waited; call abandoned", name)
            raise Abandoned

    return still_there


class Workers:
    """The dispatcher's threads for blocking calls. Waiting calls take a thread each
    (bounded by --max-connections); a worker idle for WORKER_IDLE seconds ends, so a burst
    leaves no pool behind, while long-pollers that come back every few seconds reuse their
    threads instead of starting one per call."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0  # workers waiting for a job; under _lock
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` in an idle worker, or a new one (thread-safe)."""
        with self._lock:
            reuse = self._idle > 0
            self._idle -= reuse
        self._jobs.put(job)
        if not reuse:
            threading.Thread(target=self._work, name="mpstore-wait", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=WORKER_IDLE)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody counted on this worker: end it
                        self._idle -= 1
                        return
                continue  # a job was promised to this worker: it is on its way
            job()
            with self._lock:
                self._idle += 1
