"""The messages on the wire, shared by the server and the client.

They are ``multiprocessing.managers``' own: a request is ``(ident, methodname, args, kwds)``
and a reply ``(kind, payload)`` with kind ``#RETURN``, ``#ERROR`` (payload: the exception),
``#TRACEBACK`` or ``#UNSERIALIZABLE`` (payload: formatted text), each one length-prefixed pickle
message of ``multiprocessing.connection``. The served store has the fixed ident ``"store"``,
so a client needs no ``create``/``incref`` round trips before its first call (a stock
``BaseProxy`` still works, through ``StoreManager.get_store()``).

Two additions:

* a ``#ERROR`` exception is pickled with its traceback (tblib), so the caller's formatted
  traceback shows the server-side frames down to the store function that raised;
* ``#ARG0`` (no payload) means "the result is your first argument, as you sent it", and
  ``#ARG0ITEMS`` "a list of the items of your first argument": a call that hands back what it
  was given (``add_span``, ``add_many_spans`` storing new spans) does not send it back, which
  halves the bytes pickled for the hottest call.
"""

from __future__ import annotations

import io
import operator
import pickle
from traceback import format_exc, format_exception
from types import TracebackType
from typing import Any

from tblib.pickling_support import pickle_exception, pickle_traceback

__all__ = [
    "ARG0",
    "ARG0_ITEMS",
    "ERROR",
    "NOT_SERVED",
    "PROTOCOL",
    "RETURN",
    "STORE_IDENT",
    "TRACEBACK",
    "UNSERIALIZABLE",
    "dump_error",
    "dump_reply",
    "dump_result",
    "remote_methods",
]

STORE_IDENT = "store"
RETURN, ERROR, TRACEBACK, UNSERIALIZABLE = "#RETURN", "#ERROR", "#TRACEBACK", "#UNSERIALIZABLE"
ARG0, ARG0_ITEMS = "#ARG0", "#ARG0ITEMS"
_ARG0 = pickle.dumps((ARG0, None), pickle.HIGHEST_PROTOCOL)
_ARG0_ITEMS = pickle.dumps((ARG0_ITEMS, None), pickle.HIGHEST_PROTOCOL)
PROTOCOL = pickle.HIGHEST_PROTOCOL


class _ErrorPickler(pickle.Pickler):
    """Pickles exceptions with their traceback, cause and context (tblib), without installing
    tblib's reducers process-wide (``copyreg``): only error replies pay for it."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException):
            return pickle_exception(obj)
        if isinstance(obj, TracebackType):
            return pickle_traceback(obj)
        return NotImplemented


def dump_error(exc: BaseException) -> bytes:
    """``(#ERROR, exc)`` with ``exc``'s traceback; ``#UNSERIALIZABLE`` with the formatted
    traceback if the exception (or something it holds) cannot be pickled. Never raises."""
    buffer = io.BytesIO()
    try:
        _ErrorPickler(buffer, PROTOCOL).dump((ERROR, exc))
        return buffer.getvalue()
    except Exception:
        pass
    try:  # the exception pickles, but something on its chain does not: drop the traceback
        return pickle.dumps((ERROR, exc.with_traceback(None)), PROTOCOL)
    except Exception:
        return pickle.dumps((UNSERIALIZABLE, "".join(format_exception(exc))), PROTOCOL)


def remote_methods(cls: type) -> tuple[str, ...]:
    """The methods of a store class that are served: its public methods except those that
    are the server's own business (``close``, ``deferred_commits``)."""
    return tuple(sorted(
        name for name in dir(cls)
        if not name.startswith("_") and name not in NOT_SERVED and callable(getattr(cls, name))
    ))


#: Store methods that are the server's own business: ``close`` releases its store (a client's
#: ``close`` closes the client's connections instead); ``deferred_commits`` batches commits
#: within one thread of the server.
NOT_SERVED = frozenset({"close", "deferred_commits"})


def dump_result(result: Any, args: tuple[Any, ...]) -> bytes:
    """The reply to a call with positional ``args`` that returned ``result``: ``#ARG0`` or
    ``#ARG0ITEMS`` when the result is (made of) what the caller sent, else ``dump_reply``."""
    if args:
        first = args[0]
        if result is first:
            return _ARG0
        if (type(result) is list and type(first) is list and len(result) == len(first)
                and all(map(operator.is_, result, first))):
            return _ARG0_ITEMS
    return dump_reply(result)


def dump_reply(result: Any) -> bytes:
    """``(#RETURN, result)``; ``#UNSERIALIZABLE`` if the result cannot be pickled."""
    try:
        return pickle.dumps((RETURN, result), PROTOCOL)
    except Exception:
        return pickle.dumps((UNSERIALIZABLE, format_exc()), PROTOCOL)
