"""The messages on the wire (shared by the client and the server): framing, requests,
replies, the size limit and the errors about malformed requests.

They are ``multiprocessing.managers``' own: a request is ``(ident, methodname, args, kwds)``
and a reply ``(kind, payload)`` with kind ``#RETURN``, ``#ERROR`` (payload: the exception),
``#TRACEBACK`` or ``#UNSERIALIZABLE`` (payload: formatted text), each one length-prefixed pickle
message of ``multiprocessing.connection``. The served store has the fixed ident ``"store"``,
so a client needs no ``create``/``incref`` round trips before its first call (a stock
``BaseProxy`` still works, through ``StoreManager.get_store()``).

Three additions:

* a request with the ident ``"store+"`` (``PACKED_IDENT``) carries its first argument
  *packed*: a span as its field tuple (``Span._wire()``), a list of spans as a list of them,
  for the calls whose row in :data:`mpstore.api.CALLS` says ``packed``. Pickling a record
  refers to its loader by name, which costs about 1 µs to write and 1 µs to read;
  ``add_span`` is the hottest call. Anything else (a dict for a span, a subclass) is sent as
  it is, under ``"store"``;
* a ``#ERROR`` exception is pickled with its traceback (tblib), so the caller's formatted
  traceback shows the server-side frames down to the store function that raised;
* ``#ARG0`` (no payload) means "the result is your first argument, as you sent it", and
  ``#ARG0ITEMS`` "a list of the items of your first argument": a call that hands back what it
  was given (``add_span``, ``add_many_spans`` storing new spans) does not send it back, which
  halves the bytes pickled for the hottest call.
"""

from __future__ import annotations

import io
import logging
import operator
import pickle
import struct
from collections.abc import Callable
from traceback import format_exc, format_exception
from types import TracebackType
from typing import Any

from tblib.pickling_support import pickle_exception, pickle_traceback

from .._version import WIRE_VERSION, __version__
from ..api import PACKED, REQUEST_KEY
from ..errors import InvalidArgument
from .safe_pickle import reply_list

__all__ = [
    "ARG0",
    "ARG0_ITEMS",
    "ERROR",
    "HELLO",
    "MAX_MESSAGE_SIZE",
    "PACKED_IDENT",
    "PROTOCOL",
    "RETURN",
    "STORE_IDENT",
    "TRACEBACK",
    "UNSERIALIZABLE",
    "dump_error",
    "dump_reply",
    "dump_result",
    "frame",
    "hello",
    "mismatch",
    "once_call",
    "pack",
    "parse_hello",
    "too_large",
    "unpack",
    "unpickle_failure",
]

log = logging.getLogger("mpstore.manager.server")

STORE_IDENT = "store"
PACKED_IDENT = "store+"
# CPython internal: the reply kinds of multiprocessing.managers (dispatch() and
# convert_to_error() read them; tests/test_cpython_internals.py checks they still do).
RETURN, ERROR, TRACEBACK, UNSERIALIZABLE = "#RETURN", "#ERROR", "#TRACEBACK", "#UNSERIALIZABLE"
ARG0, ARG0_ITEMS = "#ARG0", "#ARG0ITEMS"
_ARG0 = pickle.dumps((ARG0, None), pickle.HIGHEST_PROTOCOL)
_ARG0_ITEMS = pickle.dumps((ARG0_ITEMS, None), pickle.HIGHEST_PROTOCOL)
PROTOCOL = pickle.HIGHEST_PROTOCOL
#: Default largest request, in bytes (``agl store --max-message-size``).
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
_HUGE = 0x7FFFFFFF  # frames this large or larger get the 8-byte length


def frame(payload: bytes) -> bytes:
    """``multiprocessing.connection``'s framing of one message: a 4-byte big-endian signed
    length, or for 2 GiB and more -1 and an 8-byte length, then the bytes."""
    size = len(payload)
    if size <= _HUGE:
        return struct.pack("!i", size) + payload
    return struct.pack("!iQ", -1, size) + payload


def too_large(size: int, limit: int) -> bytes:
    """The error reply to a request of ``size`` bytes over the server's ``limit`` (which
    discarded it unread); logs it."""
    log.warning("Refused a request of %d bytes (--max-message-size %d)", size, limit)
    return dump_error(InvalidArgument(
        f"the request is {size} bytes, larger than this server's limit of {limit} bytes "
        f"(agl store --max-message-size); send less per call (e.g. split a batch) or "
        f"raise the limit"))


def unpickle_failure(exc: BaseException) -> bytes:
    """The error reply to a request the server cannot unpickle (``exc``: why)."""
    return dump_error(InvalidArgument(
        f"the server cannot unpickle the request ({type(exc).__name__}: {exc}); "
        "arguments must be built from types it can import (builtins, mpstore's "
        "records, modules installed on the server)"))


class _ErrorPickler(pickle.Pickler):
    """Pickles exceptions with their traceback, cause and context (tblib), without installing
    tblib's reducers process-wide (``copyreg``): only error replies pay for it. An exception
    of a class clients do not decode (not builtin, not mpstore's: see :mod:`.safe_pickle`)
    travels as a RuntimeError naming it, with the same message and traceback."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException):
            if type(obj) not in _SENDABLE:
                obj = _stand_in(obj)
            return pickle_exception(obj)
        if isinstance(obj, TracebackType):
            return pickle_traceback(obj)
        return NotImplemented


#: Exception classes every client decodes (see .safe_pickle.reply_list).
_SENDABLE = frozenset(v for v in reply_list().values()
                      if isinstance(v, type) and issubclass(v, BaseException))


def _stand_in(exc: BaseException) -> RuntimeError:
    cls = type(exc)
    new = RuntimeError(f"{cls.__module__}.{cls.__qualname__}: {exc}")
    new.__cause__, new.__context__ = exc.__cause__, exc.__context__
    new.__suppress_context__ = exc.__suppress_context__
    return new.with_traceback(exc.__traceback__)


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


def pack(name: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``args`` with the first one packed (see the module docstring), or None if this call's
    arguments are sent as they are (not ``packed`` in the call table, or not exactly its
    records)."""
    spec = PACKED.get(name)
    if spec is None or not args:
        return None
    cls, many = spec
    first = args[0]
    if many:
        if type(first) is not list or not all(type(r) is cls for r in first):
            return None
        return ([r._wire() for r in first], *args[1:])  # type: ignore[attr-defined]
    if type(first) is not cls:
        return None
    return (first._wire(), *args[1:])  # type: ignore[attr-defined]


def unpack(name: str, args: Any) -> tuple[Any, ...]:
    """The inverse of :func:`pack`, for the server. Raises InvalidArgument if ``args`` are
    not what ``pack`` makes (only a client that is not mpstore's sends that)."""
    spec = PACKED.get(name)
    if spec is None or not isinstance(args, tuple) or not args:
        raise InvalidArgument(f"{name}: the server cannot unpack these arguments")
    cls, many = spec
    size = len(cls._fields)  # type: ignore[attr-defined]
    packed = args[0] if many else [args[0]]
    if not isinstance(packed, list) or not all(
            type(v) is tuple and len(v) == size for v in packed):
        raise InvalidArgument(f"{name}: malformed packed {cls.__name__} (expected tuples of "
                              f"{size} fields)")
    records = [cls._unwire(v) for v in packed]  # type: ignore[attr-defined]
    return (records if many else records[0], *args[1:])


def once_call(once: Callable[[Any, Callable[..., Any]], Callable[..., Any]] | None,
              kwds: dict[str, Any], func: Callable[..., Any]) -> Callable[..., Any]:
    """For the server: take the request id out of a request's keywords (api.REQUEST_KEY)
    and answer it through the store's ``once``, so that a resend gets the first answer.
    Raises InvalidArgument if the store cannot (``once`` is None)."""
    request = kwds.pop(REQUEST_KEY)
    if once is None:
        raise InvalidArgument("this server cannot answer requests exactly once")
    return once(request, func)


# ---------------------------------------------------------------------- the wire version
#: How a client says its wire version right after the handshake, and how the server
#: answers with its own: plain bytes, so that any version reads them (a pickle might not).
HELLO = b"MPSTORE-WIRE "


def hello() -> bytes:
    """This side's hello: the wire version and, for the messages, the mpstore version."""
    return HELLO + f"{WIRE_VERSION} {__version__}".encode()


def parse_hello(data: bytes | memoryview) -> tuple[int, str] | None:
    """(wire version, mpstore version) of a hello; None if ``data`` is not one."""
    data = bytes(data)
    if not data.startswith(HELLO):
        return None
    try:
        wire, version = data[len(HELLO):].decode("ascii").split(" ", 1)
        return int(wire), version
    except (UnicodeDecodeError, ValueError):
        return None


def mismatch(client: tuple[int, str] | None, server: tuple[int, str] | None) -> str:
    """The message of a VersionMismatch: both sides' versions and what to do."""
    def side(name: str, said: tuple[int, str] | None) -> str:
        if said is None:
            return f"the {name} says no wire version (mpstore 0.1.0, wire version 1)"
        return f"the {name} runs mpstore {said[1]} (wire version {said[0]})"

    return (f"{side('client', client)} and {side('server', server)}: client and server must "
            "speak the same wire version; install the same mpstore on both sides")
