"""TLS for the store's connections (the standard ``ssl`` module).

``agl store --tls-cert F --tls-key F [--tls-client-ca F]`` makes the server speak TLS on every
connection (with a client CA: mutual TLS, a client must show a certificate it signed); a client
verifies the server with ``connect(..., tls_ca=F)`` (or ``MPSTORE_TLS_CA``) and shows its own
certificate with ``tls_cert``/``tls_key`` (``MPSTORE_TLS_CERT``/``MPSTORE_TLS_KEY``). The
authkey handshake then runs inside TLS, and so does everything after it.

The server's TLS handshake is non-blocking (:func:`accept`): ``do_handshake`` is retried on
``SSLWantReadError``/``SSLWantWriteError`` after waiting for the socket, all within the same
deadline as the authkey handshake (``--handshake-timeout``), so a peer that opens TLS and then
trickles bytes, or a plaintext client that waits for a challenge the server never sends, is
dropped like any other. Once authenticated, the connection is served by the one epoll thread
(:mod:`.loop`), which reads and writes TLS records without blocking and drains what the SSL
object has already decrypted (``pending()``: epoll cannot see it).

Choices: TLS 1.2 at least; no renegotiation; no session tickets (nothing resumes sessions, and
TLS 1.3 tickets sent after the handshake would be unasked-for bytes on an idle connection);
the client checks the server's host name (its certificate must name the host or IP clients
connect to).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from ..errors import AuthenticationFailed, InvalidArgument, ServerStartError

if TYPE_CHECKING:
    from ..accounting import Tally

__all__ = [
    "ENV_TLS_CA",
    "ENV_TLS_CERT",
    "ENV_TLS_KEY",
    "WOULD_BLOCK",
    "ClientTLS",
    "TLSConnection",
    "accept",
    "client_tls",
    "connect",
    "drain_pending",
    "looks_like_tls",
    "refused_by_server",
    "server_context",
    "streams",
]

log = logging.getLogger("mpstore.manager.server")
ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY = "MPSTORE_TLS_CA", "MPSTORE_TLS_CERT", "MPSTORE_TLS_KEY"


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return context


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """The server's context: its certificate chain and key; with ``client_ca``, clients must
    show a certificate signed by it. Raises ServerStartError naming the unusable file."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.num_tickets = 0
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ServerStartError(f"cannot use --tls-cert {cert} / --tls-key {key}: {exc}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ServerStartError(f"cannot use --tls-client-ca {client_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(frozen=True)
class ClientTLS:
    """What a client verifies the server with (``ca``) and shows it (``cert``, ``key``), as
    file names (so that a pickled client carries them); :meth:`context` loads them."""

    ca: str
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        """Raises InvalidArgument naming a file that cannot be used."""
        context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        try:
            context.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"cannot use tls_ca {self.ca}: {exc}") from None
        if self.cert is not None:
            try:
                context.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidArgument(
                    f"cannot use tls_cert {self.cert} / tls_key {self.key}: {exc}") from None
        return context


def client_tls(ca: str | os.PathLike[str] | None = None,
               cert: str | os.PathLike[str] | None = None,
               key: str | os.PathLike[str] | None = None) -> ClientTLS | None:
    """The client's TLS settings: the arguments, else ``MPSTORE_TLS_CA`` / ``_CERT`` /
    ``_KEY``; None (plaintext) without a CA. Raises InvalidArgument for a ``cert`` or ``key``
    argument without a CA, a key without a certificate, or a file that cannot be used."""
    if ca is None:
        if cert is not None or key is not None:
            raise InvalidArgument("tls_cert needs tls_ca (or MPSTORE_TLS_CA): the CA that "
                                  "signed the server's certificate")
        ca = os.environ.get(ENV_TLS_CA) or None
    if ca is None:  # (MPSTORE_TLS_CERT alone may be a server's own: agl store reads it too)
        return None
    cert = cert if cert is not None else os.environ.get(ENV_TLS_CERT) or None
    key = key if key is not None else os.environ.get(ENV_TLS_KEY) or None
    if key is not None and cert is None:
        raise InvalidArgument("tls_key needs tls_cert (or MPSTORE_TLS_CERT)")
    settings = ClientTLS(os.fspath(ca), None if cert is None else os.fspath(cert),
                         None if key is None else os.fspath(key))
    settings.context()  # a file that cannot be used shows now, not at the first call
    return settings


def connect(context: ssl.SSLContext, sock: socket.socket, host: str, port: int
            ) -> ssl.SSLSocket:
    """The client's TLS handshake on a connected socket, within the socket's timeout.
    Raises AuthenticationFailed when it cannot succeed by retrying (the certificate does not
    verify, the server does not speak TLS), EOFError if the server closed the connection
    (at its --max-connections limit, say), OSError for a timeout or a broken connection."""
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        raise AuthenticationFailed(
            f"TLS: the certificate of the mpstore server at {host}:{port} does not verify "
            f"({exc.verify_message}): tls_ca must be the CA that signed it, and the "
            f"certificate must be valid now and name {host}") from None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        raise EOFError("the server closed the connection during the TLS handshake (at its "
                       "--max-connections limit? see its log)") from None
    except ssl.SSLError as exc:
        raise AuthenticationFailed(
            f"TLS handshake with the mpstore server at {host}:{port} failed "
            f"({exc.reason or exc}): does it speak TLS (agl store --tls-cert)?") from None


def refused_by_server(exc: ssl.SSLError, host: str, port: int) -> AuthenticationFailed:
    """What a client is told when the server ends TLS after the handshake: with TLS 1.3 a
    server that wants a client certificate says so only then."""
    return AuthenticationFailed(
        f"TLS: the mpstore server at {host}:{port} refused the connection "
        f"({exc.reason or exc}); if it requires a client certificate (agl store "
        "--tls-client-ca), give one it trusts with tls_cert= and tls_key=")


def _wait(sock: socket.socket, events: int, deadline: float) -> None:
    """Wait until ``sock`` is ready for ``events`` or raise BlockingIOError at ``deadline``."""
    left = deadline - time.monotonic()
    poller = select.poll()
    poller.register(sock.fileno(), events)
    if left <= 0 or not poller.poll(left * 1000):
        raise BlockingIOError(errno.EAGAIN, "handshake deadline passed")


def _retrying(sock: ssl.SSLSocket, deadline: float, operation: Callable[[], Any]) -> Any:
    """``operation()`` on a non-blocking SSL socket, retried whenever it wants to read or
    write, until ``deadline`` (then BlockingIOError)."""
    while True:
        try:
            return operation()
        except ssl.SSLWantReadError:
            _wait(sock, select.POLLIN, deadline)
        except ssl.SSLWantWriteError:
            _wait(sock, select.POLLOUT, deadline)


def drain_pending(sock: ssl.SSLSocket, chunk: bytes) -> bytes:
    """``chunk`` and whatever ``sock`` has decrypted but not handed out yet (``pending()``):
    epoll sees only the kernel's buffer, so data left in the SSL object would wait for the
    peer's next bytes."""
    while True:
        waiting = sock.pending()
        if not waiting:
            return chunk
        chunk += sock.recv(waiting)


#: What a non-blocking socket raises when it cannot go on now: plain, or TLS wanting to
#: read or write first (the dispatcher tries again when epoll says so).
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def streams(sock: socket.socket) -> tuple[Callable[[int], bytes], Callable[[Any], int], bool]:
    """The dispatcher's ``recv``, ``send`` for ``sock``, and whether it speaks TLS: a plain
    socket's own methods; for an SSL socket, a ``recv`` that also returns what the SSL
    object has decrypted already (:func:`drain_pending`). Chosen once per connection, so a
    plaintext read or write pays nothing for TLS."""
    if not isinstance(sock, ssl.SSLSocket):
        return sock.recv, sock.send, False
    tls_sock = sock

    def recv(size: int) -> bytes:
        return drain_pending(tls_sock, tls_sock.recv(size))

    return recv, sock.send, True


def looks_like_tls(first: bytes) -> bool:
    """True if ``first`` (a peer's first bytes) starts a TLS record: a handshake record
    (0x16) of version 3.x. For telling a TLS client at a plaintext server what is wrong."""
    return len(first) >= 2 and first[0] == 0x16 and first[1] == 0x03


class TLSConnection(Connection):
    """A ``multiprocessing.connection.Connection`` over an SSL socket, for the authkey
    handshake (``deliver_challenge``/``answer_challenge`` need a Connection). With a
    ``deadline`` the socket is non-blocking and every read and write waits at most until
    then (BlockingIOError after); without, it uses the socket as it is. Closing it leaves
    the SSL socket open: it goes on to serve the connection.

    CPython internal: a Connection reads through ``_recv(size)`` (returning a BytesIO),
    writes through ``_send(buf)`` and closes through ``_close()``; overriding those three is
    what puts it on an SSL socket (tests/test_cpython_internals.py checks them)."""

    def __init__(self, sock: ssl.SSLSocket, deadline: float | None = None) -> None:
        super().__init__(sock.fileno())
        self.sock, self.deadline = sock, deadline
        self._kept = False

    def keep(self) -> ssl.SSLSocket:
        """The SSL socket, which closing this connection will no longer close."""
        self._kept = True
        return self.sock

    def _do(self, operation: Callable[[], Any]) -> Any:
        if self.deadline is None:
            return operation()
        return _retrying(self.sock, self.deadline, operation)

    def _send(self, buf: Any, write: Any = None) -> None:
        view = memoryview(buf)
        while view:
            sent = self._do(lambda v=view: self.sock.send(v))
            view = view[sent:]

    def _recv(self, size: int, read: Any = None) -> BytesIO:
        buf, remaining = BytesIO(), size
        while remaining > 0:
            chunk = self._do(lambda r=remaining: self.sock.recv(r))
            if not chunk:
                if remaining == size:
                    raise EOFError
                raise OSError("got end of file during message")
            buf.write(chunk)
            remaining -= len(chunk)
        return buf

    def _close(self, _close: Any = None) -> None:
        if not self._kept:
            self.sock.close()


def accept(context: ssl.SSLContext, sock: socket.socket, deadline: float, peer: str,
           timeout: float, refused: Tally) -> TLSConnection | None:
    """The server's side of the TLS handshake with an accepted peer, without blocking past
    ``deadline``: ``do_handshake`` on the non-blocking socket, retried whenever it wants to
    read or write once the socket is ready. Returns a connection for the authkey handshake
    that follows within the same deadline; None, with a log line naming ``peer``, if the
    handshake fails (the socket is closed then, after the line is written); a failure that
    is the peer's (no handshake in time, a TLS error) counts as a ``"handshake"`` refusal in
    ``refused``, as for the authkey handshake."""
    sock.setblocking(False)
    wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        _retrying(wrapped, deadline, wrapped.do_handshake)
        return TLSConnection(wrapped, deadline)
    except BlockingIOError:
        refused.add("handshake")
        log.warning("Dropped connection from %s: no TLS handshake within %g s (a plaintext "
                    "client? this server speaks TLS only: clients need tls_ca= or "
                    "MPSTORE_TLS_CA)", peer, timeout)
    except ssl.SSLError as exc:
        refused.add("handshake")
        log.warning("Rejected connection from %s: TLS handshake failed (%s)", peer,
                    exc.reason or exc)
    except (OSError, EOFError) as exc:
        log.debug("Connection from %s closed during the TLS handshake: %s", peer, exc)
    wrapped.close()
    return None
