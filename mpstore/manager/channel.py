"""``Channel`` (client side): one authenticated connection to the server, owned by one thread
of one process.

A lean replacement for ``multiprocessing.managers.BaseProxy``'s connection handling. It speaks
the manager's protocol (see :mod:`.wire`) over a ``multiprocessing.connection.Connection``
but opens the socket itself, because the stock ``Client()`` cannot:

* set ``TCP_NODELAY`` before the handshake: without it the handshake's small writes wait on
  Nagle's algorithm against delayed ACKs, and a connect plus first call takes ~260 ms instead
  of ~3 ms on loopback;
* bound the TCP connect, the handshake and every reply: ``SO_RCVTIMEO``/``SO_SNDTIMEO`` are
  kernel-side, so they cost nothing per call and ``Connection``'s blocking reads honour them
  (a timed-out read raises ``BlockingIOError``); blocking calls set a longer one for their own
  wait;
* tell "not sent" from "maybe applied": an idle connection to a server that has since died or
  restarted is readable (EOF), so :meth:`Channel.request` checks for that with one ``poll``
  before writing and reports it as not delivered; a failed write never delivers a whole
  request either; only a failure while waiting for the reply leaves the outcome unknown.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import weakref
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from ..errors import AuthenticationFailed, VersionMismatch
from . import tls
from .sockets import set_socket_timeouts, tune_socket
from .wire import frame, hello, mismatch, parse_hello

__all__ = ["Channel", "TransportError", "fork_epoch"]

# Errors that mean "the connection is gone or stuck", as opposed to an answer.
_IO_ERRORS = (OSError, EOFError)


class TransportError(Exception):
    """The connection failed. ``delivered`` is False when the server cannot have received the
    request (so any call may be repeated), True when it may have run it."""

    def __init__(self, cause: BaseException, delivered: bool) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
        self.delivered = delivered


def _recv_message(sock: socket.socket) -> bytes | memoryview:
    """One framed message. Raises EOFError if the peer closes, BlockingIOError at the kernel's
    receive timeout, OSError for a broken connection."""
    data = sock.recv(_RECV_SIZE)
    while True:
        if not data:
            raise EOFError("connection closed by the server")
        if len(data) >= 4:
            size, header = int.from_bytes(data[:4], "big", signed=True), 4
            if size != -1:
                break
            if len(data) >= 12:
                size, header = int.from_bytes(data[4:12], "big"), 12
                break
        more = sock.recv(_RECV_SIZE)
        data = data + more if more else b""
    end = header + size
    if len(data) >= end:  # the common case: the whole reply came in one read
        return memoryview(data)[header:end]
    buf = bytearray(data)
    while len(buf) < end:
        more = sock.recv(min(end - len(buf), 1 << 20))
        if not more:
            raise EOFError("connection closed by the server in the middle of a reply")
        buf += more
    return memoryview(buf)[header:end]


_RECV_SIZE = 64 * 1024

#: Every open channel of this process, so that a forked child can close the inherited ones.
_OPEN: weakref.WeakSet[Channel] = weakref.WeakSet()
#: The fork generation: bumped in every forked child, so channels of the parent are not used.
_EPOCH = [0]


def _say_versions(conn: Connection) -> None:
    """Say our wire version and read the server's; raises VersionMismatch if they differ
    (or the server says none: an older mpstore), EOFError if it hangs up."""
    conn.send_bytes(hello())
    said = parse_hello(conn.recv_bytes())
    ours = parse_hello(hello())
    if said is None or ours is None or said[0] != ours[0]:
        raise VersionMismatch(mismatch(ours, said))


def fork_epoch() -> int:
    """The current fork generation of this process (see ``Channel.epoch``)."""
    return _EPOCH[0]


def _after_fork_in_child() -> None:
    # The parent's connections carry the parent's conversations: a child that wrote on one
    # would interleave its requests with the parent's. Close the child's copies of their file
    # descriptors (the parent's stay open) and make every client reconnect.
    _EPOCH[0] += 1
    for channel in list(_OPEN):
        channel.close()
    _OPEN.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Channel:
    """An authenticated connection; not thread-safe (one per thread, see ``StoreClient``).

    ``epoch`` is the fork generation it was opened in (see :func:`fork_epoch`): a channel
    of another generation was inherited through ``fork`` and must not be used."""

    __slots__ = ("__weakref__", "_poller", "_sock", "_timeout", "_tls", "epoch")

    def __init__(self, host: str, port: int, authkey: bytes, timeout: float, epoch: int,
                 tls_context: ssl.SSLContext | None = None) -> None:
        """Connect (over TLS with ``tls_context``) and authenticate within about ``timeout``
        seconds per step.

        Raises AuthenticationFailed for a wrong key or a TLS failure that retrying cannot
        mend (never worth retrying), OSError/EOFError when the server cannot be reached or
        drops the connection."""
        sock = socket.create_connection((host, port), timeout=timeout)
        conn: Connection
        try:
            tune_socket(sock)
            if tls_context is None:
                sock.settimeout(None)  # blocking fd: timeouts are the kernel's, set below
                set_socket_timeouts(sock, timeout, timeout)
                conn = Connection(sock.detach())
            else:
                # Python's timeouts, not the kernel's: a blocking SSL socket retries a read
                # that the kernel timed out, so SO_RCVTIMEO would never end it.
                sock = tls.connect(tls_context, sock, host, port)
                conn = tls.TLSConnection(sock)
        except BaseException:
            sock.close()
            raise
        _authenticate(conn, authkey, host, port)
        try:
            _say_versions(conn)
        except BaseException:
            conn.close()
            raise
        self._tls = tls_context is not None
        if isinstance(conn, tls.TLSConnection):
            self._sock = conn.keep()
            conn.close()
        else:
            # After the handshake, requests go over the socket itself: one send and (usually)
            # one recv per call, where Connection.recv_bytes makes two reads through Python
            # buffers. A Connection cannot hand over its descriptor, so take a duplicate.
            try:
                self._sock = socket.socket(fileno=os.dup(conn.fileno()))
            finally:
                conn.close()
        self._timeout: float | None = timeout
        self._poller = select.poll()
        self._poller.register(self._sock.fileno(), select.POLLIN)
        self.epoch = epoch
        _OPEN.add(self)

    def request(self, payload: bytes, timeout: float | None) -> bytes:
        """Send one request and return the raw reply, waiting at most ``timeout`` seconds
        (None: no limit). Raises TransportError; afterwards the channel must be closed."""
        sock = self._sock
        if self._poller.poll(0):
            # The server never speaks unasked: readable means EOF (it died or restarted) or
            # garbage. Nothing was sent, so any call may go to a fresh connection.
            raise TransportError(EOFError("connection closed by the server"), delivered=False)
        try:
            if timeout != self._timeout:
                if self._tls:
                    sock.settimeout(timeout)
                else:
                    set_socket_timeouts(sock, timeout)
                self._timeout = timeout
            sock.sendall(frame(payload))
        except _IO_ERRORS as exc:
            # A failed write never completes a request, so the server cannot have run it.
            raise TransportError(exc, delivered=False) from None
        try:
            return _recv_message(sock)
        except _IO_ERRORS as exc:
            raise TransportError(exc, delivered=True) from None
        except BaseException:
            # KeyboardInterrupt & co. while the reply is on its way: it would be read as the
            # reply to the next call. This connection is done.
            self.close()
            raise

    def close(self) -> None:
        """Close the connection (idempotent); the server's thread for it then ends."""
        try:
            self._sock.close()
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        return self._sock.fileno() == -1

    def fileno(self) -> int:
        return self._sock.fileno()


def _authenticate(conn: Connection, authkey: bytes, host: str, port: int) -> None:
    """The client's side of the authkey handshake; closes ``conn`` if it fails. Raises
    AuthenticationFailed, EOFError, OSError."""
    try:
        # CPython internal: multiprocessing.connection's answer_challenge and
        # deliver_challenge (not documented; the digest negotiation changed in 3.12), as the
        # server's _authenticate uses them in the other order.
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
    except AuthenticationError as exc:
        conn.close()
        raise AuthenticationFailed(
            f"authentication with the mpstore server at {host}:{port} failed ({exc}): "
            "the client and the server do not use the same authkey"
        ) from None
    except (EOFError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        conn.close()
        raise EOFError("the server closed the connection before the handshake (at its "
                       "--max-connections limit, or it speaks TLS and this client does not: "
                       "connect with tls_ca=; see its log)") from None
    except ssl.SSLError as exc:
        conn.close()
        raise tls.refused_by_server(exc, host, port) from None
    except BaseException:
        conn.close()
        raise
