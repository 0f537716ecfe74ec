"""``Dispatcher``: one thread that serves the requests of every authenticated connection.

Why one thread: with a thread per connection, every request hands the GIL (and the store's
lock) from one server thread to another, which measured at 2.3 context switches per call and
about twice the CPU per call of the transport's own echo. One thread on ``epoll`` answers
whatever requests are ready in turn, without hand-offs; the store's operations are short, so
nobody waits long behind anybody.

The exceptions are calls that block by design (those with a ``wait`` in
:data:`mpstore.api.CALLS`: ``wait_for_rollouts``, ``dequeue_rollout`` with a ``wait`` ...) and
cannot be answered at once: they run in a worker thread each, in slices (see
:mod:`.blocking`). While a blocking call is in flight its connection is not read (a client
sends nothing before its reply anyway), and the worker hands the reply back to the loop,
which sends it.

While requests come close together, the loop polls for the next one without sleeping, for up
to ``busy_poll`` seconds (``agl store --busy-poll``): being woken from epoll_wait costs a
request ~13 µs. Requests further apart than that find it asleep, so sparse traffic costs no
polling.

Framing is ``multiprocessing.connection``'s (a 4-byte big-endian length, or -1 and 8 bytes),
read and written without blocking, so a slow or silent peer holds up nobody. A request larger
than ``max_message_size`` is discarded as it arrives, never buffered, and answered with
InvalidArgument. A peer whose replies are not being read is not read either, so its requests
cannot pile up in the server. The first request decides the protocol: anything but the store's
fixed ident (a stock ``BaseProxy``) is handed to ``fallback`` to be served by a thread.
A TLS connection is served the same way, with TLS's reads and writes (see :func:`.tls.streams`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .._version import WIRE_VERSION
from ..accounting import OK, STORE_ERROR, TRANSPORT_ERROR, CallStats
from ..api import BLOCKING, REQUEST_KEY
from ..errors import StorageError, StoreError, VersionMismatch
from .blocking import Abandoned, Workers, blocks, sliced
from .pipelined import FALLBACK, RESULT, Pipeline
from .safe_pickle import AllowList, Refused, refused
from .tls import WOULD_BLOCK, streams
from .wire import (
    HELLO,
    PACKED_IDENT,
    STORE_IDENT,
    dump_error,
    dump_reply,
    dump_result,
    frame,
    hello,
    mismatch,
    once_call,
    parse_hello,
    too_large,
    unpack,
    unpickle_failure,
)

__all__ = ["BUSY_POLL", "Dispatcher"]

log = logging.getLogger("mpstore.manager.server")

#: Default seconds the loop polls without sleeping while requests come close together (see
#: ``Dispatcher._ready``): a thread asleep in epoll_wait pays ~13 µs per request to be woken
#: (measured: ping p50 48 -> 36 µs, add_span 79 -> 64 µs); the price is up to one core spent
#: polling while requests come less than this apart, none when they come further apart.
BUSY_POLL = 100e-6
#: Bytes asked of each recv. Not more: a buffer over glibc's mmap threshold (128 KiB until
#: it adapts) is mapped and unmapped per call, measured at 17.7 against 3.4 µs a recv.
_READ_SIZE = 64 * 1024
#: epoll events that call for a read: data, or the peer hung up / the socket failed (the read
#: then sees EOF or the error and closes the connection).
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
#: Rounds of ready requests one commit may cover (bounds how long the first reply waits).
_BATCH_ROUNDS = 4
_clock = time.perf_counter


class _Peer:
    """One connection's buffers and state (owned by the loop thread)."""

    __slots__ = ("busy", "closed", "drain", "drain_size", "inbuf", "out", "recv", "said",
                 "send", "sock", "tls")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # The socket's own recv and send, or TLS's (see .tls.streams): chosen once here, so
        # that a plaintext read or write checks nothing more per call.
        self.recv, self.send, self.tls = streams(sock)
        self.inbuf = bytearray()
        self.out: memoryview | None = None  # reply bytes not yet sent
        self.busy = False  # a blocking call runs in a worker
        self.closed = False
        self.drain = 0  # bytes of an oversized request still to discard
        self.drain_size = 0
        #: The wire version the client said (None: not yet). Store calls are answered only
        #: once it said ours, so that no record is ever decoded by another layout.
        self.said: tuple[int, str] | None = None


class Dispatcher:
    """The loop; see the module docstring. ``on_close`` is called once per connection it
    closes; ``fallback(sock, first_request)`` takes over a connection that speaks the stock
    manager protocol (the socket is blocking again and no longer the loop's)."""

    def __init__(self, methods: dict[str, Callable[..., Any]], *, max_message_size: int,
                 on_close: Callable[[], None],
                 fallback: Callable[[socket.socket, bytes], None],
                 batch: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
                 busy_poll: float = BUSY_POLL,
                 loads: Callable[[bytes], Any] | None = None,
                 once: Callable[[Any, Callable[..., Any]], Callable[..., Any]] | None = None,
                 calls: CallStats | None = None, offload: bool = False,
                 pipeline: Pipeline | None = None) -> None:
        self._methods = methods
        # The restricted decoder of .safe_pickle: the server's allow-list.
        self._loads = loads if loads is not None else AllowList.for_requests().loads
        # ``once(request_id, method)``: the store's exactly-once wrapper for a request that
        # carries an id (api.REQUEST_KEY); without it, such requests are refused.
        self._once = once
        # Counts and times every call answered here (None: no accounting); only this
        # thread writes it.
        self._calls = calls
        # With ``offload`` (a store whose calls wait on a database), every call runs in a
        # worker thread, so that the calls of different clients overlap their waits. The
        # loop then never busy-polls: spinning for the next request would hold the GIL the
        # workers need to finish theirs.
        self._offload = offload
        # With a ``pipeline`` (see .pipelined), the calls it names are offered to it first:
        # it answers them from this thread, without a worker.
        self._pipeline = pipeline
        # With ``batch`` (a durable store's deferred_commits), the requests ready at one
        # wake-up are answered under ``batch()`` (one commit for all of them) and their
        # replies sent after it. Without, each reply goes out at once.
        self._batch = batch
        self._busy_poll = 0.0 if offload else busy_poll
        self._outbox: list[tuple[_Peer, bytes]] | None = None
        self._max_size = max_message_size
        self._on_close, self._fallback = on_close, fallback
        # epoll itself rather than ``selectors``: its Python wrapper cost ~2 µs a wake-up.
        self._epoll = select.epoll()
        self._by_fd: dict[int, _Peer | Callable[[int], None] | None] = {}  # None: _wake_r
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._watch(self._wake_r, None)
        self._inbox: collections.deque[tuple[str, Any, Any]] = collections.deque()
        self._peers: set[_Peer] = set()
        self._workers = Workers()  # the blocking calls' threads
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mpstore-dispatch", daemon=True)
        if pipeline is not None:
            pipeline.attach(self._watch_fd, self._unwatch_fd)

    # ------------------------------------------------------------ other threads
    def start(self) -> None:
        self._thread.start()

    def adopt(self, sock: socket.socket) -> None:
        """Serve an authenticated connection from now on (thread-safe)."""
        self._post("adopt", sock, None)

    def stop(self) -> None:
        """Close every connection and end the loop (thread-safe, idempotent)."""
        self._post("stop", None, None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def _post(self, what: str, target: Any, payload: Any) -> None:
        self._inbox.append((what, target, payload))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken (buffer full), or stopped

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        peers, clock = self._by_fd, time.perf_counter
        recent = False
        while not self._stopping:
            began = clock()
            ready = self._ready(recent)
            recent = clock() - began < self._busy_poll
            events = [(peers.get(fd, False), mask) for fd, mask in ready]
            if self._batch is None:
                for peer, mask in events:
                    self._event(peer, mask)
            else:
                self._answer_batch(events)
            if self._pipeline is not None:
                self._pipeline.flush()
        self._close_all()

    def _ready(self, recent: bool) -> list[tuple[int, int]]:
        """The next ready events. If the last ones came ``recent``-ly (within ``busy_poll``
        seconds of the wait for them), the next request is likely to come as soon: poll
        without sleeping for up to ``busy_poll`` seconds first, sparing the wake-up. If they
        did not, sleep at once, so that sparse requests cost no polling."""
        poll = self._epoll.poll
        if recent:
            until = time.perf_counter() + self._busy_poll
            while True:
                ready = poll(0)
                if ready:
                    return ready
                if time.perf_counter() >= until:
                    break
        return poll()

    def _answer_batch(self, events: list[tuple[Any, int]]) -> None:
        """Answer ``events``, and requests that arrive meanwhile (up to ``_BATCH_ROUNDS``
        rounds), under one ``batch()``: one commit for all of them. The replies are sent once
        it has ended: none may leave before the changes it reports are committed."""
        assert self._batch is not None
        self._outbox = []
        try:
            with self._batch():
                for rounds in range(1, _BATCH_ROUNDS + 1):
                    for peer, mask in events:
                        self._event(peer, mask)
                    if rounds == _BATCH_ROUNDS:
                        break  # what is ready now is reported again (level-triggered)
                    # Requests that came while these were answered join the same commit.
                    events = [(self._by_fd.get(fd, False), mask)
                              for fd, mask in self._epoll.poll(0)]
                    if not events:
                        break
        except Exception as exc:  # no reply of this batch may claim success
            if isinstance(exc, StorageError):
                log.error("Committing a batch of requests failed: %s", exc)
            else:
                log.exception("Unexpected error in the dispatcher")
            failure = dump_error(exc)
            self._outbox = [(peer, failure) for peer, _ in self._outbox]
        outbox, self._outbox = self._outbox, None
        for peer, reply in outbox:
            if not peer.closed:
                self._send(peer, reply)

    def _event(self, peer: _Peer | Callable[[int], None] | bool | None, mask: int) -> None:
        if type(peer) is not _Peer:
            if peer is None:
                self._drain_inbox()
            elif callable(peer):  # the pipeline's descriptor
                peer(mask)
            return  # False: closed by an earlier event of this wake-up (fd looked up before)
        if peer.closed:
            return
        if mask & select.EPOLLOUT:
            self._flush(peer)
        if mask & _READABLE and not peer.closed:
            self._read(peer)

    # ------------------------------------------------------------ epoll registration
    def _watch(self, sock: socket.socket, peer: _Peer | None, mask: int = select.EPOLLIN
               ) -> None:
        self._epoll.register(sock.fileno(), mask)
        self._by_fd[sock.fileno()] = peer

    def _rewatch(self, peer: _Peer, mask: int) -> None:
        self._epoll.modify(peer.sock.fileno(), mask)

    def _watch_fd(self, fd: int, ready: Callable[[int], None]) -> None:
        self._epoll.register(fd, _READABLE)
        self._by_fd[fd] = ready

    def _unwatch_fd(self, fd: int) -> None:
        with contextlib.suppress(OSError):  # already closed: epoll forgot it
            self._epoll.unregister(fd)
        self._by_fd.pop(fd, None)

    def _unwatch(self, sock: socket.socket) -> None:
        self._epoll.unregister(sock.fileno())
        del self._by_fd[sock.fileno()]

    def _drain_inbox(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._inbox:
            what, target, payload = self._inbox.popleft()
            if what == "adopt":
                target.setblocking(False)
                peer = _Peer(target)
                self._peers.add(peer)
                self._watch(target, peer)
                if peer.tls and target.pending():  # decrypted during the handshake already
                    self._read(peer)
            elif what == "reply":
                self._finish_blocking(target, payload)
            elif what == "stop":
                self._stopping = True

    def _read(self, peer: _Peer) -> None:
        try:
            chunk = peer.recv(_READ_SIZE)
        except WOULD_BLOCK:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(peer)
            return
        if peer.drain:
            chunk = self._discard(peer, chunk)
        elif not peer.inbuf and len(chunk) > 4 and not (peer.busy or peer.out is not None):
            # The common case, spared the buffer: one whole request, as a client sends it.
            size = int.from_bytes(chunk[:4], "big", signed=True)
            if len(chunk) == size + 4 and size <= self._max_size:
                self._handle(peer, chunk[4:])
                return
        peer.inbuf += chunk
        self._frames(peer)

    def _discard(self, peer: _Peer, chunk: bytes) -> bytes:
        """Drop what belongs to an oversized request; answer it once it has all gone."""
        used = min(len(chunk), peer.drain)
        peer.drain -= used
        if not peer.drain:
            self._send(peer, too_large(peer.drain_size, self._max_size))
            self._count(None, TRANSPORT_ERROR, _clock())
        return chunk[used:]

    def _frames(self, peer: _Peer) -> None:
        """Answer every complete request in the buffer, in order."""
        buf = peer.inbuf
        while len(buf) >= 4 and not (peer.busy or peer.closed or peer.out is not None):
            size, header = int.from_bytes(buf[:4], "big", signed=True), 4
            if size == -1:
                if len(buf) < 12:
                    return
                size, header = int.from_bytes(buf[4:12], "big"), 12
            if size > self._max_size:
                available = len(buf) - header
                del buf[:header + min(size, available)]
                peer.drain, peer.drain_size = size - min(size, available), size
                if not peer.drain:
                    self._send(peer, too_large(size, self._max_size))
                    self._count(None, TRANSPORT_ERROR, _clock())
                    continue
                return
            if len(buf) - header < size:
                return
            data = bytes(buf[header:header + size])
            del buf[:header + size]
            self._handle(peer, data)

    def _handle(self, peer: _Peer, data: bytes) -> None:
        if peer.said is None and data.startswith(HELLO):
            self._hello(peer, data)
            return
        began = _clock()
        try:
            request = self._loads(data)
        except Refused as exc:
            self._send(peer, dump_error(refused(exc, data, peer.sock)))
            self._count(None, TRANSPORT_ERROR, began)
            return
        except Exception as exc:  # e.g. a class the server cannot import
            self._send(peer, unpickle_failure(exc))
            self._count(None, TRANSPORT_ERROR, began)
            return
        if not (isinstance(request, tuple) and len(request) == 4) or (
                request[0] != STORE_IDENT and request[0] != PACKED_IDENT):
            self._hand_over(peer, data)
            return
        ident, name, args, kwds = request
        func, outcome = None, OK
        try:
            if peer.said is None or peer.said[0] != WIRE_VERSION:
                raise VersionMismatch(mismatch(peer.said, parse_hello(hello())))
            func = self._methods.get(name)
            if func is None:
                raise AttributeError(f"the mpstore server has no method {name!r}")
            if ident == PACKED_IDENT:
                args = unpack(name, args)
            request = None
            if REQUEST_KEY in kwds:
                request = kwds[REQUEST_KEY]
                func = once_call(self._once, kwds, func)
            if self._pipeline is not None and name in self._pipeline.names and \
                    self._pipelined(peer, name, func, args, kwds, request, began):
                return
            if self._offload and not (isinstance(kwds, dict) and blocks(name, kwds)):
                self._start_offloaded(peer, name, func, args, kwds, began)
                return
            if isinstance(kwds, dict) and blocks(name, kwds):
                ready = self._without_waiting(name, func, args, kwds)
                if ready is None:
                    self._start_blocking(peer, name, func, args, kwds, began)
                    return
                reply = dump_reply(ready[0])
            else:
                reply = dump_result(func(*args, **kwds), args)
        except Exception as exc:
            reply = dump_error(exc)  # with the server-side traceback (tblib)
            outcome = STORE_ERROR if isinstance(exc, StoreError) else TRANSPORT_ERROR
        self._send(peer, reply)
        if self._calls is not None:
            self._calls.record(name if func is not None else None, outcome, _clock() - began)

    def _count(self, name: str | None, outcome: int, began: float) -> None:
        """Account for one answered call (a few increments; see :mod:`mpstore.accounting`)."""
        if self._calls is not None:
            self._calls.record(name, outcome, _clock() - began)

    def _hello(self, peer: _Peer, data: bytes) -> None:
        """A client said its wire version: answer with ours (the client decides and says
        why); a client of another version is refused every store call (and logged)."""
        peer.said = parse_hello(data) or (-1, "unknown")
        if peer.said[0] != WIRE_VERSION:
            log.warning("Refused a client of another wire version: %s",
                        mismatch(peer.said, parse_hello(hello())))
        self._send(peer, hello())

    # ------------------------------------------------------------ blocking calls
    @staticmethod
    def _without_waiting(name: str, func: Callable[..., Any], args: tuple[Any, ...],
                         kwds: dict[str, Any]) -> tuple[Any] | None:
        """The answer of a blocking call if it needs no wait (a rollout to claim, every
        rollout waited for already finished), as a 1-tuple; None if it must wait. Spares the
        common case a worker thread."""
        wait = BLOCKING[name]
        result = func(*args, **{**kwds, wait.keyword: 0.0})
        return (result,) if wait.done(result, kwds) else None

    def _start_blocking(self, peer: _Peer, name: str, func: Callable[..., Any],
                        args: tuple[Any, ...], kwds: dict[str, Any], began: float) -> None:
        peer.busy = True
        self._unwatch(peer.sock)  # nothing to read until the reply is out
        fd = peer.sock.fileno()

        def work() -> None:
            outcome = OK
            try:
                reply: bytes | None = dump_reply(sliced(fd, name, func, args, kwds))
            except Abandoned:
                reply, outcome = None, TRANSPORT_ERROR
            except Exception as exc:
                reply = dump_error(exc)
                outcome = STORE_ERROR if isinstance(exc, StoreError) else TRANSPORT_ERROR
            self._post("reply", peer, (reply, name, outcome, began))

        self._workers.submit(work)

    def _start_offloaded(self, peer: _Peer, name: str, func: Callable[..., Any],
                         args: tuple[Any, ...], kwds: dict[str, Any], began: float) -> None:
        """A call that does not block by design, run in a worker (see ``offload``)."""
        peer.busy = True
        self._unwatch(peer.sock)
        self._offloaded(peer, name, func, args, kwds, began)

    def _offloaded(self, peer: _Peer, name: str, func: Callable[..., Any],
                   args: tuple[Any, ...], kwds: dict[str, Any], began: float) -> None:
        def work() -> None:
            outcome = OK
            try:
                reply = dump_result(func(*args, **kwds), args)
            except Exception as exc:
                reply = dump_error(exc)
                outcome = STORE_ERROR if isinstance(exc, StoreError) else TRANSPORT_ERROR
            self._post("reply", peer, (reply, name, outcome, began))

        self._workers.submit(work)

    def _pipelined(self, peer: _Peer, name: str, func: Callable[..., Any],
                   args: tuple[Any, ...], kwds: dict[str, Any], request: Any, began: float
                   ) -> bool:
        """Offer the call to the pipeline; True if it took it (and will call ``done``)."""
        def done(kind: str, value: Any) -> None:
            if kind == FALLBACK:
                self._offloaded(peer, name, func, args, kwds, began)
                return
            assert kind == RESULT
            self._finish_blocking(peer, (dump_result(value, args), name, OK, began))

        assert self._pipeline is not None
        if not self._pipeline.submit(name, args, kwds, request, done):
            return False
        peer.busy = True
        self._unwatch(peer.sock)
        return True

    def _finish_blocking(self, peer: _Peer, answer: tuple[bytes | None, str, int, float]
                         ) -> None:
        reply, name, outcome, began = answer
        self._count(name, outcome, began)
        peer.busy = False
        if peer.closed:  # closed while the worker ran (see _close): finish closing now
            self._release(peer)
            return
        if reply is None:  # its caller is gone
            self._close(peer, registered=False)
            return
        self._watch(peer.sock, peer)
        self._send(peer, reply)
        self._frames(peer)

    # ------------------------------------------------------------ writing
    def _send(self, peer: _Peer, reply: bytes) -> None:
        if self._outbox is not None:  # answering a batch: sent once it is committed
            self._outbox.append((peer, reply))
            return
        data = frame(reply)
        try:
            sent = peer.send(data)
        except WOULD_BLOCK:  # TLS: retried with the same bytes, as SSL_write requires
            sent = 0
        except OSError:
            self._close(peer)
            return
        if sent < len(data):
            peer.out = memoryview(data)[sent:]
            self._rewatch(peer, select.EPOLLOUT)

    def _flush(self, peer: _Peer) -> None:
        assert peer.out is not None
        try:
            sent = peer.send(peer.out)
        except WOULD_BLOCK:
            return
        except OSError:
            self._close(peer)
            return
        peer.out = peer.out[sent:] if sent < len(peer.out) else None
        if peer.out is None:
            self._rewatch(peer, select.EPOLLIN)
            self._frames(peer)

    # ------------------------------------------------------------ closing
    def _hand_over(self, peer: _Peer, first: bytes) -> None:
        """The connection is a stock proxy's: a thread serves it from now on."""
        if peer.tls:  # stock proxies cannot speak TLS: only a foreign client gets here
            log.warning("Closed a TLS connection that spoke the stock manager protocol")
            self._close(peer)
            return
        self._unwatch(peer.sock)
        self._peers.discard(peer)
        peer.closed = True
        peer.sock.setblocking(True)
        self._fallback(peer.sock, first)

    def _close(self, peer: _Peer, registered: bool = True) -> None:
        if peer.closed:
            return
        peer.closed = True
        if peer.busy:
            # A worker still uses the file descriptor (it checks for hang-ups): closing it
            # now could let a new connection reuse the number. Shut it down, which the
            # worker notices; the socket is released when the worker's reply comes back.
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if registered:
            self._unwatch(peer.sock)
        self._release(peer)

    def _release(self, peer: _Peer) -> None:
        peer.sock.close()
        self._peers.discard(peer)
        self._on_close()

    def _close_all(self) -> None:
        for peer in list(self._peers):
            self._close(peer, registered=not peer.busy)
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()
