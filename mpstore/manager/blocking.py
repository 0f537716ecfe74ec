"""Blocking calls in the server: which calls may wait, and how a waiting call notices that its
caller has gone.

A blocking call (``wait_for_rollouts``, ``dequeue_rollout`` with a ``wait``) runs in a worker
thread of the dispatcher, as successive waits of at most ``BLOCKING_SLICE`` seconds; between
them the worker checks that its caller is still connected, so a caller that died frees its
worker instead of holding it, or claiming rollouts, until the wait ends.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["BLOCKING", "BLOCKING_SLICE", "Abandoned", "blocks", "hung_up", "sliced"]

log = logging.getLogger("mpstore.manager.server")

#: Longest time a blocking call waits in the store before its caller is checked: a caller
#: that vanished is noticed within this, and 1,000 idle waiters cost 1,000 cheap wake-ups a second.
BLOCKING_SLICE = 1.0
#: Blocking store calls and the keyword argument that bounds their wait (None: no bound).
BLOCKING = {"dequeue_many_rollouts": "wait", "dequeue_rollout": "wait",
            "wait_for_rollouts": "timeout"}


class Abandoned(Exception):
    """The caller of a blocking call has disconnected: nobody is left to answer."""


def _wait_of(name: str, kwds: dict[str, Any]) -> Any:
    return kwds.get(BLOCKING[name], None if name == "wait_for_rollouts" else 0.0)


def blocks(name: str, kwds: dict[str, Any]) -> bool:
    """True if the call may wait: a blocking method with a wait that is None or > 0."""
    if name not in BLOCKING:
        return False
    wait = _wait_of(name, kwds)
    if wait is None:
        return True
    return isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0


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
    """Run a blocking call as successive waits of at most BLOCKING_SLICE seconds, checking
    between them that the caller on ``fd`` is still connected (raises Abandoned if not). Same
    result as one call: a slice that returns before its time is up has its answer (something
    was claimed, or every rollout waited for is finished); the last slice answers at the end."""
    key = BLOCKING[name]
    total = _wait_of(name, kwds)
    if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float))
                              or not total > BLOCKING_SLICE):
        return func(*args, **kwds)  # short, or not a number (the store rejects it)
    deadline = None if total is None else time.monotonic() + total
    while True:
        remaining = BLOCKING_SLICE if deadline is None else deadline - time.monotonic()
        step = min(BLOCKING_SLICE, max(remaining, 0.0))
        started = time.monotonic()
        result = func(*args, **{**kwds, key: step})
        if (step < BLOCKING_SLICE or time.monotonic() - started < step
                or (result and name != "wait_for_rollouts")):
            return result
        if hung_up(fd):
            log.info("A caller of %s disconnected while it waited; call abandoned", name)
            raise Abandoned
