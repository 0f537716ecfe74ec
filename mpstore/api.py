"""The store's calls as data: one row per public method of ``InMemoryStore``.

Everything the transport needs to know about a call lives here, once, instead of in the
client, the server's dispatcher, its blocking workers and its stock-proxy path separately:
whether a call may be sent again, how it blocks and how its wait is cut into slices, which
argument travels packed, whether it is served at all, and whether it changes the store.
``tests/test_api.py`` checks the table against the store (its keys are the store's public
methods; a wait's keyword and default are the store's), so a new method is one new row.

A leaf: it imports nothing from the store, its persistence or the transport, so a process
that only connects to a server never loads them (see :mod:`mpstore.manager.client`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .types import Span

__all__ = [
    "BLOCKING",
    "CALLS",
    "MUTATING",
    "PACKED",
    "REQUEST_KEY",
    "RETRIED",
    "SERVED",
    "Call",
    "Packed",
    "Wait",
    "in_slices",
    "is_seconds",
]


def is_seconds(value: Any) -> bool:
    """A real, finite-or-infinite number of seconds (not a bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass(frozen=True)
class Wait:
    """How a blocking call waits, and how to tell that a slice of its wait has the answer.

    ``keyword`` is the keyword-only argument that bounds the wait in seconds (``None``:
    unbounded), ``default`` its default in the store's signature. ``done(result, kwargs)``
    says that a slice's result is the final answer even though the slice waited its whole
    time (a slice that returns early always has it: the store only returns early when the
    wait is over)."""

    keyword: str
    default: float | None
    done: Callable[[Any, dict[str, Any]], bool]

    def of(self, kwargs: dict[str, Any]) -> Any:
        """The wait a call with ``kwargs`` asks for (unchecked: the store validates it)."""
        return kwargs.get(self.keyword, self.default)

    def longer_than(self, kwargs: dict[str, Any], seconds: float) -> bool:
        """True if the call waits more than ``seconds``: unbounded, or a real number above.
        Anything else (short, negative, not a number) is one plain call; the store rejects
        what is not a number."""
        wait = kwargs.get(self.keyword, self.default)  # inline: on every blocking call
        if wait is None:
            return True
        return isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > seconds


@dataclass(frozen=True)
class Packed:
    """The call's first argument travels packed (see :mod:`mpstore.manager.wire`): a
    ``record`` as its field tuple, or with ``many`` a list of them."""

    record: type
    many: bool


@dataclass(frozen=True)
class Call:
    """One public method of the store.

    ``mutates``: what the caller asks for changes the store (the store's change path and a
    durable store's commit apply). Reads say False even though most of them run the
    watchdog on entry (SPEC D12), which may time rollouts out: those changes are the
    watchdog's own, made and committed by it whichever call ran it.
    ``retried``: safe to send again when the connection broke after the request was sent
    (the server may have run it): reads, and writes that are idempotent (SPEC D7). Any other
    call raises StoreUnavailable rather than risk applying twice.
    ``wait``: the call may block (see :class:`Wait`).
    ``packed``: its first argument travels packed (see :class:`Packed`).
    ``served``: reachable through a server; False for the server's own business.
    """

    mutates: bool
    retried: bool = False
    wait: Wait | None = None
    packed: Packed | None = None
    served: bool = True


def _claimed_one(result: Any, kwargs: dict[str, Any]) -> bool:
    return result is not None


def _claimed_any(result: Any, kwargs: dict[str, Any]) -> bool:
    return bool(result)


def _has_rollouts(result: Any, kwargs: dict[str, Any]) -> bool:
    return bool(result.rollouts)


def _all_finished(result: Any, kwargs: dict[str, Any]) -> bool:
    # The result lists the finished rollouts among those asked for; unknown ids are omitted,
    # so a result short of them is not final here (the store then returns early instead).
    ids = kwargs.get("rollout_ids")
    if not isinstance(ids, (list, tuple)):
        return False
    return {rollout.rollout_id for rollout in result}.issuperset(ids)


_READ = Call(mutates=False, retried=True)
_WRITE = Call(mutates=True)

#: Every public method of ``InMemoryStore``, by name.
CALLS: dict[str, Call] = {
    # --- create and claim
    "start_rollout": _WRITE,
    "enqueue_rollout": _WRITE,
    "enqueue_many_rollouts": _WRITE,
    # A claim that waits for the queue; its slices end as soon as something was claimed.
    "dequeue_rollout": Call(mutates=True, wait=Wait("wait", 0.0, _claimed_one)),
    "dequeue_many_rollouts": Call(mutates=True, wait=Wait("wait", 0.0, _claimed_any)),
    "start_attempt": _WRITE,
    # Deleting is idempotent in effect (unknown ids are ignored); a resend answers a lower
    # count than the first send did.
    "delete_rollouts": Call(mutates=True, retried=True),
    # --- read
    "query_rollouts": _READ,
    "get_rollout_by_id": _READ,
    "query_attempts": _READ,
    "get_latest_attempt": _READ,
    # A read that waits (unbounded by default) until every known rollout asked for is
    # finished; sent again after a broken connection, for what is left of its wait.
    "wait_for_rollouts": Call(mutates=False, retried=True,
                              wait=Wait("timeout", None, _all_finished)),
    # The feed: a read that waits until at least one rollout finished after the cursor.
    "finished_rollouts": Call(mutates=False, retried=True,
                              wait=Wait("wait", 0.0, _has_rollouts)),
    # --- update
    "update_rollout": _WRITE,
    "update_attempt": _WRITE,
    # --- spans: sequence ids are counter steps (writes, not retried: a resend hands out
    # another id); a span with the same (rollout, attempt, sequence id) replaces itself
    # (D7), so adding is retried. Spans travel packed: add_span is the hottest call.
    "get_next_span_sequence_id": _WRITE,
    "get_many_span_sequence_ids": _WRITE,
    "add_span": Call(mutates=True, retried=True, packed=Packed(Span, many=False)),
    "add_many_spans": Call(mutates=True, retried=True, packed=Packed(Span, many=True)),
    "query_spans": _READ,
    # Converted on the client side (an OTel ReadableSpan becomes a Span before it is sent).
    # Not retried: without a sequence_id it takes a counter step, and a resend of a span
    # that was stored would answer None (a duplicate) instead of the span.
    "add_otel_span": _WRITE,
    # --- resources
    "add_resources": _WRITE,
    "update_resources": _WRITE,
    "get_resources_by_id": _READ,
    "get_latest_resources": _READ,
    "query_resources": _READ,
    # --- workers: derived from claims and attempt updates; update_worker is a heartbeat
    # (sent twice, it stamps the time twice), so it is retried.
    "query_workers": _READ,
    "get_worker_by_id": _READ,
    "update_worker": Call(mutates=True, retried=True),
    # --- operations
    "ping": _READ,
    "statistics": _READ,
    # A watchdog pass (the server's ticker runs it too). Not retried: its answer counts the
    # rollouts this pass found due, and a resend of a pass already run would answer 0.
    "run_watchdog": _WRITE,
    # --- the server's own business, not served: a client's close() closes its connections,
    # never the server's store; deferred_commits batches commits within a server thread.
    "close": Call(mutates=False, served=False),
    # The server wraps a call that carries a request id (REQUEST_KEY) with it.
    "once": Call(mutates=False, served=False),
    "deferred_commits": Call(mutates=False, served=False),
}

#: The keyword under which a request that changes the store carries its request id,
#: ``(client id, sequence number)``; the server takes it out and answers the call through
#: ``InMemoryStore.once``, so that a resend is answered with the first result (see
#: mpstore.replies). Calls the table retries anyway (reads, idempotent span adds) carry none.
REQUEST_KEY = "__mpstore_request__"

#: Views of the table for the hot paths (one dict or set lookup per call).
SERVED: tuple[str, ...] = tuple(sorted(name for name, call in CALLS.items() if call.served))
RETRIED: frozenset[str] = frozenset(name for name, call in CALLS.items() if call.retried)
MUTATING: frozenset[str] = frozenset(name for name, call in CALLS.items() if call.mutates)
BLOCKING: dict[str, Wait] = {name: call.wait for name, call in CALLS.items()
                             if call.wait is not None}
#: (record, many) as a plain tuple: unpacked on every add_span, where a tuple subclass or
#: two attribute reads measured ~70 ns slower.
PACKED: dict[str, tuple[type, bool]] = {name: (call.packed.record, call.packed.many)
                                        for name, call in CALLS.items()
                                        if call.packed is not None}


def in_slices(wait: Wait, call: Callable[[dict[str, Any]], Any], kwargs: dict[str, Any],
              longest: float | Callable[[], float], between: Callable[[], None] | None = None,
              clock: Callable[[], float] = time.monotonic) -> Any:
    """Run a blocking call whose wait is longer than ``longest`` (see
    :meth:`Wait.longer_than`) as successive calls ``call(kwargs)`` that wait at most
    ``longest`` seconds each, with the same result as one call: a slice that returns before
    its time is up, or whose result is final (``wait.done``), has the answer; the last slice
    answers at the end. ``between()`` runs between slices (it may raise to give up);
    ``longest`` may be a function, asked before every slice (the server's slices stretch as
    more calls wait); ``clock`` is for tests.

    Both sides slice: the client in slices of its reply timeout, so that a server that
    stops answering is noticed within about twice that however long the wait; the server in
    slices of a second or more (:mod:`mpstore.manager.blocking`), so that a caller that
    disconnected frees its thread (and claims nothing) instead of holding it until the wait
    ends."""
    total = wait.of(kwargs)
    end = None if total is None else clock() + total
    while True:
        step = longest() if callable(longest) else longest
        piece = step if end is None else min(step, max(end - clock(), 0.0))
        began = clock()
        result = call({**kwargs, wait.keyword: piece})
        if piece < step or clock() - began < piece or wait.done(result, kwargs):
            return result
        if between is not None:
            between()
