"""Who holds a port, and the start-failure messages of SPEC §6.

Before binding, the server asks psutil for any TCP listener on its port whose address overlaps
its own (the same address, or a wildcard on either side), so that the error can name the
process in the way: ``... (held by PID 1234: python -m http.server 4747)``. If the port is taken
between that check and the bind (a race), the message is the same without the holder.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

import psutil

from ..errors import ServerStartError

__all__ = [
    "PortHolder",
    "bind_failure",
    "check_port_free",
    "find_listener",
    "free_port",
    "start_failure_message",
]

_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True)
class PortHolder:
    """A process listening on the port; ``pid`` is None when the OS does not tell us."""

    pid: int | None
    cmdline: str


def _overlaps(ip_a: str, ip_b: str) -> bool:
    return ip_a == ip_b or ip_a in _WILDCARDS or ip_b in _WILDCARDS


def _describe(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return " ".join(proc.cmdline()) or proc.name()
    except (psutil.Error, OSError):
        return "?"


def find_listener(host: str, port: int) -> PortHolder | None:
    """The first TCP listener on ``port`` whose address overlaps ``host``, or None.

    Never raises: where the OS refuses to list sockets (psutil.AccessDenied, e.g. on macOS
    without root) it answers None and the bind decides."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for conn in connections:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if _overlaps(conn.laddr.ip, host):
            if conn.pid is None:
                return PortHolder(None, "?")
            return PortHolder(conn.pid, _describe(conn.pid))
    return None


def start_failure_message(host: str, port: int, holder: PortHolder | None = None,
                          reason: str | None = None) -> str:
    """SPEC §6's wording: the port-conflict message (with the holder when known), or
    ``... failed to start on H:P. <reason>.`` for any other cause."""
    base = f"mpstore server failed to start on {host}:{port}."
    if reason is not None:
        return f"{base} {reason.rstrip('.')}."
    message = f"{base} Another process may already be using this port."
    if holder is not None and holder.pid is not None:
        message += f" (held by PID {holder.pid}: {holder.cmdline})"
    return message


def check_port_free(host: str, port: int) -> None:
    """Raise ServerStartError naming the holder if a listener already owns ``host:port``."""
    holder = find_listener(host, port)
    if holder is not None:
        raise ServerStartError(start_failure_message(host, port, holder))


def bind_failure(host: str, port: int, exc: OSError) -> ServerStartError:
    """The ServerStartError for a failed bind: the conflict message for EADDRINUSE (a race
    with the check above: no holder), else the OS's reason."""
    if exc.errno == errno.EADDRINUSE:
        return ServerStartError(start_failure_message(host, port))
    return ServerStartError(start_failure_message(host, port, reason=exc.strerror or str(exc)))


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it); racy by nature, so callers that
    start a server on it must handle a conflict."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
