"""Waits woken across servers: one ``LISTEN`` connection per store, no polling per waiter.

Writers ``NOTIFY`` in the transaction that makes the change (delivered at its commit, to
every listening server): ``mpstore_queued`` (payload: how many rollouts entered the queue)
and ``mpstore_finished`` (payload: a rollout id written terminal). The :class:`Listener`'s
thread waits on its connection's socket and sets the events of the waiters concerned:

* a claim waiter (``dequeue_rollout(wait=...)``) is woken by "queued", as many as entered;
* a finish waiter (``wait_for_rollouts``) by the finish of one of its ids only;
* a feed waiter (``finished_rollouts(wait=...)``) by any finish.

A waiter registers *before* it looks at the database, so a notification that arrives
between its look and its sleep is not lost. While anyone waits, a ticker runs the store's
watchdog every ``interval`` (timeouts fire, and wake waiters, with nobody calling). If the
listening connection fails, it is reopened and every waiter is woken to look again (what
was notified meanwhile is lost).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Listener", "Waiter"]

log = logging.getLogger("mpstore.postgres")
CHANNELS = ("mpstore_queued", "mpstore_finished")


class Waiter:
    """One waiting call: an event set by the listener."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()

    def wait(self, deadline: float | None) -> bool:
        """Sleep until woken or the deadline (monotonic); False once it has passed."""
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return False
        self.event.wait(timeout)
        self.event.clear()
        return True


class Listener:
    """The store's one listening connection and its waiters; started by the first wait."""

    def __init__(self, url: str, watchdog: Callable[[], None], interval: float) -> None:
        self._url = url
        self._watchdog = watchdog
        self._interval = interval
        self._lock = threading.Lock()
        self._claimers: dict[Waiter, None] = {}  # in arrival order
        self._finishers: dict[str, set[Waiter]] = {}
        self._feed: set[Waiter] = set()
        self._waiting = 0
        self._thread: threading.Thread | None = None
        self._ticking = False
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()

    # ----------------------------------------------------------------- waiters
    @contextlib.contextmanager
    def queue_waiter(self) -> Iterator[Waiter]:
        waiter = Waiter()
        with self._lock:
            self._claimers[waiter] = None
        try:
            self._started()
            yield waiter
        finally:
            with self._lock:
                self._claimers.pop(waiter, None)
                self._waiting -= 1

    @contextlib.contextmanager
    def feed_waiter(self) -> Iterator[Waiter]:
        waiter = Waiter()
        with self._lock:
            self._feed.add(waiter)
        try:
            self._started()
            yield waiter
        finally:
            with self._lock:
                self._feed.discard(waiter)
                self._waiting -= 1

    @contextlib.contextmanager
    def finish_waiter(self, ids: list[str]) -> Iterator[Waiter]:
        waiter = Waiter()
        with self._lock:
            for rid in ids:
                self._finishers.setdefault(rid, set()).add(waiter)
        try:
            self._started()
            yield waiter
        finally:
            with self._lock:
                for rid in ids:
                    waiters = self._finishers.get(rid)
                    if waiters is not None:
                        waiters.discard(waiter)
                        if not waiters:
                            del self._finishers[rid]
                self._waiting -= 1

    def _started(self) -> None:
        """Count a waiter in; make sure the listening connection is up (before the waiter's
        first look) and the ticker runs."""
        with self._lock:
            self._waiting += 1
            start_ticker = not self._ticking
            self._ticking = True
            if self._thread is None and not self._closed:
                conn = self._connect()
                self._thread = threading.Thread(target=self._listen, args=(conn,),
                                                name="mpstore-listen", daemon=True)
                self._thread.start()
        if start_ticker:
            threading.Thread(target=self._tick, name="mpstore-pg-watchdog", daemon=True).start()

    def _tick(self) -> None:
        while True:
            time.sleep(self._interval)
            with self._lock:
                if not self._waiting or self._closed:
                    self._ticking = False
                    return
            self._watchdog()

    # ----------------------------------------------------------------- the connection
    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=10)
        for channel in CHANNELS:
            conn.execute(f"LISTEN {channel}")
        return conn

    def _listen(self, conn: Any) -> None:
        import psycopg

        while not self._closed:
            try:
                self._drain(conn)
            except (psycopg.Error, OSError) as exc:
                if self._closed:
                    break
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                with contextlib.suppress(Exception):
                    conn.close()
                conn = self._reconnect()
                self._wake_all()
        with contextlib.suppress(Exception):
            conn.close()

    def _reconnect(self) -> Any:
        import psycopg

        while not self._closed:
            try:
                return self._connect()
            except psycopg.Error:
                time.sleep(0.5)
        return None

    def _drain(self, conn: Any) -> None:
        """Wait on the socket; hand each notification to the waiters it concerns."""
        if conn is None:
            return
        pgconn = conn.pgconn
        while not self._closed:
            ready, _, _ = select.select([pgconn.socket, self._wake_r], [], [], 30.0)
            if self._wake_r in ready:
                return
            if not ready:
                conn.execute("SELECT 1")  # keep-alive: notices a dead server
            pgconn.consume_input()
            if pgconn.status != 0:  # CONNECTION_OK
                raise psycopg_error("the listening connection is broken")
            while (note := pgconn.notifies()) is not None:
                self._deliver(note.relname.decode(), note.extra.decode())

    def _deliver(self, channel: str, payload: str) -> None:
        with self._lock:
            if channel == "mpstore_finished":
                for waiter in self._finishers.get(payload, ()):
                    waiter.event.set()
                for waiter in self._feed:
                    waiter.event.set()
                return
            count = int(payload) if payload.isdigit() else len(self._claimers)
            for waiter in list(self._claimers)[:count]:
                waiter.event.set()

    def _wake_all(self) -> None:
        with self._lock:
            for waiter in (*self._claimers, *self._feed):
                waiter.event.set()
            for waiters in self._finishers.values():
                for waiter in waiters:
                    waiter.event.set()

    def close(self) -> None:
        """Stop listening (idempotent)."""
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        thread = self._thread
        if thread is not None:
            thread.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)


def psycopg_error(message: str) -> Exception:
    import psycopg

    return psycopg.OperationalError(message)
