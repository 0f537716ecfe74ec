"""Restricted decoding: what a pickle from a peer may refer to (an allow-list).

Unpickling runs code: a pickle names globals (``os.system``, ``builtins.eval``, any class)
and calls them. The server decodes every request, and the client every reply, with
:class:`AllowList`'s ``loads``, a ``pickle.Unpickler`` whose ``find_class`` answers only
names on the list and raises :class:`Refused` for any other *before* importing or building
anything, so a key holder (or a fake server) can make the peer build only:

* mpstore's records (each pickles as one reference to its loader, ``mpstore.types.
  <Class>._unwire``, and a tuple of plain values: exactly those loaders are listed, not the
  classes), its enums' members (pickled by name, ``RolloutStatus.RUNNING``) and ``UNSET``;
* builtin containers and scalars: dict, list, tuple, str, bytes, int, float, bool and None
  need no global at all; set, frozenset, bytearray and complex are listed;
* in replies only (:func:`reply_list`): the exceptions the store sends back, i.e. every
  builtin exception class and mpstore's own, with the pieces of tblib that carry their
  tracebacks (``unpickle_exception``, ``unpickle_traceback``, ``Frame``, ``Code``,
  ``Traceback``: plain attribute holders);
* what the operator names: ``agl store --allow-class module.Name``,
  ``connect(..., allow_classes=["module.Name"])``.

Everything listed is harmless to call with any arguments (a record loader fills slots, an
exception constructor keeps its arguments); a class you add can be called with arguments a
key holder chooses, so add plain data classes only.

Cost: a pickle that names no global (the packed ``add_span``: field tuples of plain values)
never reaches ``find_class``; the price is the Unpickler object, about 0.5 µs a message.
"""

from __future__ import annotations

import builtins
import enum
import importlib
import io
import logging
import pickle
import pickletools
import socket
from collections.abc import Callable, Iterable
from typing import Any

from tblib import Code, Frame, Traceback, pickling_support

from .. import errors, types
from ..errors import InvalidArgument

__all__ = [
    "AllowList",
    "Refused",
    "method_of",
    "parse_class_names",
    "peer_name",
    "refused",
    "refused_reply",
    "refused_request",
    "reply_list",
    "request_list",
    "resolve_class",
]

log = logging.getLogger("mpstore.manager.server")
Names = dict[tuple[str, str], Any]


class Refused(pickle.UnpicklingError):
    """A pickle named a global that is not on the allow-list (nothing was built from it)."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name} is not on the allow-list")
        self.module, self.name = module, name

    @property
    def qualified(self) -> str:
        return f"{self.module}.{self.name}"


def _entry(obj: Any, name: str | None = None) -> tuple[tuple[str, str], Any]:
    return (obj.__module__, name or obj.__qualname__), obj


def _mpstore_names() -> Names:
    """Record loaders, enum members and UNSET of mpstore.types."""
    names: Names = {("mpstore.types", "UNSET"): types.UNSET}
    for public in types.__all__:
        value = getattr(types, public)
        if isinstance(value, type) and issubclass(value, enum.Enum):
            for member in value:
                names[value.__module__, f"{value.__name__}.{member.name}"] = member
        elif isinstance(value, type) and hasattr(value, "_unwire"):
            names[value.__module__, f"{value.__name__}._unwire"] = value._unwire
    return names


def _builtin_names() -> Names:
    return dict(_entry(kind) for kind in (set, frozenset, bytearray, complex))


def _exception_names() -> Names:
    """Every builtin exception class, mpstore's, and tblib's traceback carriers."""
    names: Names = {}
    for value in vars(builtins).values():
        if isinstance(value, type) and issubclass(value, BaseException):
            names["builtins", value.__name__] = value
    for public in errors.__all__:
        names[_entry(getattr(errors, public))[0]] = getattr(errors, public)
    carriers: list[Any] = [Code, Frame, Traceback]
    for name in ("unpickle_exception", "unpickle_exception_with_attrs", "unpickle_traceback"):
        if hasattr(pickling_support, name):  # (the second one is tblib 3.1's)
            carriers.append(getattr(pickling_support, name))
    for carrier in carriers:
        names[_entry(carrier)[0]] = carrier
    return names


def request_list() -> Names:
    """What requests may name without an operator's say (records, enums, UNSET, builtins)."""
    return {**_mpstore_names(), **_builtin_names()}


def reply_list() -> Names:
    """What replies may name: the request list plus the exceptions the store sends back."""
    return {**request_list(), **_exception_names()}


def resolve_class(spec: str | type) -> tuple[tuple[str, str], Any]:
    """``"module.Name"`` (or ``"module:Name"``, or the object itself) as an allow-list entry.

    Raises InvalidArgument if the name cannot be imported."""
    if not isinstance(spec, str):
        try:
            return _entry(spec)
        except AttributeError:
            raise InvalidArgument(f"cannot allow {spec!r}: not a class or function") from None
    text = spec.strip().replace(":", ".")
    parts = text.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        module_name, attrs = ".".join(parts[:cut]), parts[cut:]
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in attrs:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return (module_name, ".".join(attrs)), obj
    raise InvalidArgument(f"cannot allow {spec!r}: no importable module.Name of that name "
                          "(give it as module.Name, importable where the decoding runs)")


def parse_class_names(specs: Iterable[str | type]) -> Names:
    """Allow-list entries for ``specs`` (``--allow-class``, ``allow_classes=``)."""
    return dict(resolve_class(spec) for spec in specs)


class AllowList:
    """An allow-list and its decoder: ``loads(data)`` is ``pickle.loads`` that raises
    :class:`Refused` for a global not in ``names``."""

    def __init__(self, names: Names) -> None:
        self.names = dict(names)
        allowed = self.names

        class _Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                try:
                    return allowed[module, name]
                except KeyError:
                    raise Refused(module, name) from None

        bytes_io = io.BytesIO

        def loads(data: Any) -> Any:
            return _Restricted(bytes_io(data)).load()

        self.loads: Callable[[Any], Any] = loads

    @classmethod
    def for_requests(cls, extra: Iterable[str | type] = ()) -> AllowList:
        return cls({**request_list(), **parse_class_names(extra)})

    @classmethod
    def for_replies(cls, extra: Iterable[str | type] = ()) -> AllowList:
        return cls({**reply_list(), **parse_class_names(extra)})

    def extra(self) -> list[str]:
        """The operator's additions (for log lines)."""
        base = reply_list()
        return sorted(f"{m}.{n}" for m, n in self.names if (m, n) not in base)


_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})


def method_of(data: Any) -> str | None:
    """The method name of a request that could not be decoded, read without building
    anything (``pickletools.genops`` only parses): the second string of ``(ident, name,
    args, kwds)``. None if it cannot be found. For error messages and log lines only."""
    seen = 0
    try:
        for opcode, arg, _ in pickletools.genops(bytes(data)):
            if opcode.name in _STRING_OPS:
                seen += 1
                if seen == 2:
                    return str(arg)[:100]
            elif opcode.name not in ("PROTO", "FRAME", "MEMOIZE", "MARK"):
                return None
    except Exception:
        return None
    return None


def refused_request(exc: Refused, data: Any) -> InvalidArgument:
    """What the caller of a refused request is told (the server's side)."""
    method = method_of(data)
    return InvalidArgument(
        f"{method or 'the request'}: the arguments contain {exc.qualified}, which this server "
        "does not decode: nothing was built or run. Requests may hold builtin containers and "
        "scalars (JSON-like data), mpstore's records, enums and UNSET, and classes the "
        f"operator allows (agl store --allow-class {exc.qualified})")


def refused_reply(exc: Refused, method: str) -> InvalidArgument:
    """What the caller is told when a reply names a global it does not decode."""
    return InvalidArgument(
        f"{method}: the server's reply contains {exc.qualified}, which this client does not "
        "decode: nothing was built or run (the call itself may have been applied). Allow it "
        f"with connect(..., allow_classes=[{exc.qualified!r}]) if you trust it")


def peer_name(sock: socket.socket | int) -> str:
    """``host:port`` of a connected socket (or its descriptor), for log lines."""
    try:
        if isinstance(sock, int):
            probe = socket.socket(fileno=sock)
            try:
                address = probe.getpeername()
            finally:
                probe.detach()
        else:
            address = sock.getpeername()
    except OSError:
        return "a peer that has gone"
    return f"{address[0]}:{address[1]}"


def refused(exc: Refused, data: bytes, peer: socket.socket | int) -> InvalidArgument:
    """Log a request refused by the allow-list, naming the peer on socket (or descriptor)
    ``peer``, and say why to its caller."""
    error = refused_request(exc, data)
    log.warning("Refused a request from %s: %s", peer_name(peer), error)
    return error
