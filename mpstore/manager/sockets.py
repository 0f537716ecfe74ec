"""Socket options of both sides (shared): ``TCP_NODELAY``, keep-alive and the kernel's
receive/send timeouts, set once per connection so that they cost nothing per call.
"""

from __future__ import annotations

import socket
import struct

__all__ = ["set_socket_timeouts", "tune_socket"]


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval``; 0 means "no timeout" to the kernel, so None maps to it."""
    if seconds is None:
        return struct.pack("ll", 0, 0)
    seconds = max(seconds, 0.001)  # 0 would disable the timeout
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def set_socket_timeouts(fd_or_sock: int | socket.socket, recv: float | None,
                        send: float | None = -1.0) -> None:
    """Set the kernel's receive (and, unless -1, send) timeout of a blocking socket."""
    sock = fd_or_sock if isinstance(fd_or_sock, socket.socket) else socket.socket(
        fileno=fd_or_sock)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(recv))
        if send != -1.0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send))
    finally:
        if sock is not fd_or_sock:
            sock.detach()  # the fd belongs to a Connection: do not close it here


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (without it small writes wait on Nagle's algorithm against delayed ACKs:
    see :mod:`.channel`) and keep-alive, so that a peer whose host vanished without a FIN is
    noticed in about half a minute instead of hours."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
