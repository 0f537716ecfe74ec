"""Calls a store answers without a worker thread: the interface the server loop drives.

A store whose calls wait on a database runs each call in a worker thread (the loop's
``offload``), and a call's hand-offs (loop -> worker -> loop) measured at about 80 µs of CPU
on this project's 2-core VM: more than the call itself. A store may also offer a
:class:`Pipeline` (its ``pipeline`` attribute) for its hottest calls: the loop hands a call
to :meth:`Pipeline.submit` in its own thread, which sends the call's statement without
waiting and returns; the pipeline's descriptor sits in the loop's epoll beside the clients',
and when its results arrive the loop calls back and the pipeline answers with ``done``, still
in the loop's thread. No thread is woken for the call.

The loop knows nothing of what a pipeline talks to; it only

* calls ``attach(register, unregister)`` once, before serving;
* offers each call named in ``names`` to ``submit`` (False: not taken, served as usual);
* calls back what the pipeline ``register`` s when its descriptor is ready (the mask);
* calls ``flush()`` after each round of ready events: what was submitted in the round may
  travel (and commit) together;
* turns ``done(kind, value)`` into the reply: :data:`RESULT` (the call's result), or
  :data:`FALLBACK` (the pipeline could not decide: the call runs as it would have without a
  pipeline, in a worker, and its errors are raised there).

Everything here runs in the loop's thread: ``register``, ``unregister``, ``submit``,
``flush``, the ready callbacks and ``done``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["FALLBACK", "RESULT", "Done", "Pipeline", "Register"]

RESULT, FALLBACK = "result", "fallback"
#: ``done(kind, value)``: one of the two kinds above, and the result (None: FALLBACK).
Done = Callable[[str, Any], None]
#: ``register(fd, ready)``: watch ``fd`` for reading; ``ready(mask)`` when it is.
Register = Callable[[int, Callable[[int], None]], None]


class Pipeline(Protocol):
    """See the module docstring."""

    names: frozenset[str]

    def attach(self, register: Register, unregister: Callable[[int], None]) -> None:
        """The loop's calls for watching descriptors (only in its thread)."""

    def submit(self, name: str, args: tuple[Any, ...], kwds: dict[str, Any], request: Any,
               done: Done) -> bool:
        """Take call ``name`` (``done`` is called exactly once, later), or return False.
        ``request`` is the call's request id (``api.REQUEST_KEY``; None without one): the
        pipeline answers the call in its stead, exactly once, or falls back."""

    def flush(self) -> None:
        """A round of the loop ended: send what was submitted in it."""
