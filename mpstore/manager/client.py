"""``connect()`` and ``StoreClient``: the store API of a server in another process.

``StoreClient`` has exactly the served methods of the call table (:data:`mpstore.api.CALLS`,
which a test holds equal to ``InMemoryStore``'s public methods): each forwards its arguments
as given (defaults, ``UNSET`` and keyword-only arguments are applied by the server's real
method) and ``inspect.signature`` shows the store's signature. One request is one server-side
method call (SPEC §5). The client depends on the table, not on the store: a process that only
connects never imports ``mpstore.store`` (nor SQLite); ``inspect.signature`` and ``help()``
import it when asked.

Connections (see :class:`~mpstore.manager.channel.Channel`): one per thread, opened on the
thread's first call and closed when the thread ends; a forked child never uses its parent's
(it opens its own); a pickled client (e.g. a ``spawn`` child's argument) reconnects lazily.

Failures, per call:

* The connection was found dead before the request was sent (the server restarted), or it
  could not be opened: reconnect and send, retrying for up to ``retry_for`` seconds.
* The connection broke after the request was sent: the server may have run it. The calls
  the table marks ``retried`` (reads, ``wait_for_rollouts``, ``ping``, ``statistics`` and the
  idempotent ``add_span`` / ``add_many_spans``, D7) are sent again, within ``retry_for`` seconds
  of the failure; any other write raises ``StoreUnavailable`` at once rather than risk applying
  twice.
* No reply within ``timeout`` seconds (beyond a blocking call's own wait) counts as broken:
  a stopped or unreachable server cannot hold a call forever. A wait longer than ``timeout``
  (or unbounded: ``wait_for_rollouts(timeout=None)``) is sent as successive waits of at most
  ``timeout`` seconds (:func:`mpstore.api.in_slices`), so it too ends within about twice
  ``timeout`` of the server stopping.

So after a server dies, no call lasts longer than ``retry_for`` (a ``wait_for_rollouts`` with a
shorter remaining ``timeout``: that), then raises ``StoreUnavailable``. A wrong key raises
``AuthenticationFailed`` at once; errors raised by the store arrive as themselves, with the
server-side frames in their traceback.
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.managers import RemoteError
from typing import TYPE_CHECKING, Any

from ..api import (
    BLOCKING,
    MUTATING,
    PACKED,
    REQUEST_KEY,
    RETRIED,
    SERVED,
    Wait,
    in_slices,
    is_seconds,
)
from ..errors import InvalidArgument, StoreUnavailable
from ..otel import to_span
from ..types import Span
from .auth import resolve_authkey
from .channel import Channel, TransportError, fork_epoch
from .safe_pickle import AllowList, Refused, refused_reply, resolve_class
from .tls import ClientTLS, client_tls
from .wire import (
    ARG0,
    ARG0_ITEMS,
    ERROR,
    PACKED_IDENT,
    PROTOCOL,
    RETURN,
    STORE_IDENT,
    pack,
)

if TYPE_CHECKING:  # type checkers see the store's methods on the client
    from ..store import InMemoryStore

    _Base = InMemoryStore
else:
    _Base = object

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_PORT",
    "StoreClient",
    "connect",
    "parse_address",
    "parse_addresses",
]

DEFAULT_PORT = 4747
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"

_dumps = pickle.dumps
#: The decoder of replies for clients that allow nothing beyond the default (most of them).
_DEFAULT_REPLIES: list[AllowList] = []
#: Calls sent with a request id, so that the server answers a resend with the first answer
#: (see mpstore.replies): every write but the span adds, which are idempotent by span id
#: (D7) and too hot for the extra work.
_ONCE = MUTATING - set(PACKED)
#: The longest reply timeout given to the kernel (a year).
_LONGEST = 365 * 24 * 3600.0


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"host"`` (port 4747), ``"[::1]:4747"`` or ``(host, port)``.

    Raises InvalidArgument for anything else."""
    if isinstance(address, tuple) and len(address) == 2:
        host, port = address
    elif isinstance(address, str) and address.strip():
        text = address.strip()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest.lstrip(":") or DEFAULT_PORT
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:  # a bare host name or IPv6 literal
            host, port = text, DEFAULT_PORT
    else:
        raise InvalidArgument(f"address must be 'host:port' or (host, port), not {address!r}")
    try:
        number = int(port)
    except (TypeError, ValueError):
        number = -1
    if not host or not 0 < number < 65536:
        raise InvalidArgument(f"address must be 'host:port' with a port 1-65535, not {address!r}")
    return str(host), number


def _request(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """The pickled request; records of the hottest calls packed (see :mod:`.wire`)."""
    packed = pack(name, args)
    if packed is not None:
        return _dumps((PACKED_IDENT, name, packed, kwargs), PROTOCOL)
    return _dumps((STORE_IDENT, name, args, kwargs), PROTOCOL)


def _replies(allow_classes: tuple[str, ...]) -> AllowList:
    """The allow-list a client decodes replies with (see :mod:`.safe_pickle`)."""
    if allow_classes:
        return AllowList.for_replies(allow_classes)
    if not _DEFAULT_REPLIES:
        _DEFAULT_REPLIES.append(AllowList.for_replies())
    return _DEFAULT_REPLIES[0]


def _unpack(data: bytes, args: tuple[Any, ...], loads: Callable[[Any], Any], name: str) -> Any:
    """The result of a reply to ``name`` called with positional ``args``, or raise what the
    server raised (with its traceback). A reply naming a global that is not on the client's
    allow-list raises InvalidArgument (nothing of it was built)."""
    try:
        kind, result = loads(data)
    except Refused as exc:
        raise refused_reply(exc, name) from None
    if kind == RETURN:
        return result
    if kind == ARG0:  # the server stored what we sent and says so instead of sending it back
        return args[0]
    if kind == ARG0_ITEMS:
        return list(args[0])
    if kind == ERROR:
        raise result
    raise RemoteError(result)  # #TRACEBACK / #UNSERIALIZABLE: text only, as BaseProxy does


class StoreClient(_Base):
    """The store API over the wire; build it with :func:`connect`. Thread-safe and fork-safe;
    see the module docstring for connections, retries and timeouts."""

    def __init__(self, host: str, port: int, authkey: bytes, *, timeout: float = 30.0,
                 retry_for: float = 5.0, allow_classes: Iterable[str | type] = (),
                 tls: ClientTLS | None = None,
                 fallbacks: tuple[tuple[str, int], ...] = ()) -> None:
        if not timeout > 0 or not retry_for >= 0:
            raise InvalidArgument(
                f"timeout must be > 0 and retry_for >= 0, not {timeout!r}, {retry_for!r}")
        self._host, self._port, self._authkey = host, int(port), bytes(authkey)
        # Failover: the servers in order (the first is host:port); a connection that cannot
        # be opened, or breaks, moves this client on to the next one.
        self._servers = ((host, int(port)), *((h, int(p)) for h, p in fallbacks))
        self._timeout, self._retry_for = float(timeout), float(retry_for)
        # As names, so that a pickled client (a spawned child's) allows the same.
        self._allow_classes = tuple(".".join(resolve_class(c)[0]) for c in allow_classes)
        self._loads = _replies(self._allow_classes).loads
        self._tls, self._tls_context = tls, None if tls is None else tls.context()
        self._local = threading.local()
        self._channels: weakref.WeakSet[Channel] = weakref.WeakSet()  # for close()
        self._channels_lock = threading.Lock()
        self._epoch = fork_epoch()
        self._ids_epoch = -1  # request ids are made anew in a forked child (see _request_id)
        self._client_id = ""
        self._sequence = itertools.count(1)

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def __repr__(self) -> str:
        return f"<StoreClient {self.address}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # The key travels with the client (to a spawned child, say), like the address: the
        # child needs both to connect. Connections do not travel; the copy opens its own.
        return (StoreClient, (*self._servers[0], self._authkey),
                {"timeout": self._timeout, "retry_for": self._retry_for,
                 "allow_classes": self._allow_classes, "tls": self._tls,
                 "servers": self._servers})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._timeout, self._retry_for = state["timeout"], state["retry_for"]
        self._allow_classes = tuple(state.get("allow_classes", ()))
        self._loads = _replies(self._allow_classes).loads
        self._tls = state.get("tls")
        self._tls_context = None if self._tls is None else self._tls.context()
        self._servers = state.get("servers", self._servers)

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this client's connections in this process (every thread's). A later call
        opens a new one, so closing is about releasing sockets, not about validity."""
        with self._channels_lock:
            channels = list(self._channels)
        for channel in channels:
            channel.close()
        self._local.channel = None

    # ------------------------------------------------------------------ calls
    def _request_id(self) -> tuple[str, int]:
        """The next request id: this client's random id in this process, and a number that
        only grows. (A forked child makes its own id: its requests are not its parent's.)"""
        epoch = fork_epoch()
        if self._ids_epoch != epoch:
            self._client_id, self._sequence = os.urandom(8).hex(), itertools.count(1)
            self._ids_epoch = epoch
        return self._client_id, next(self._sequence)

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``name(*args, **kwargs)`` on the server: the fast path, one round trip on this
        thread's connection; anything unusual goes to :meth:`_recover`."""
        started = time.monotonic()
        timeout = self._timeout
        if name in BLOCKING:
            wait = BLOCKING[name]
            if wait.longer_than(kwargs, timeout):  # or unbounded: sent in slices
                return in_slices(wait, lambda kw: self._call(name, args, kw), kwargs, timeout)
            timeout = self._reply_timeout(wait, kwargs)
        if name in _ONCE and REQUEST_KEY not in kwargs:  # the same id on every resend (_recover)
            kwargs = {**kwargs, REQUEST_KEY: self._request_id()}
        try:
            payload = _request(name, args, kwargs)
        except Exception as exc:  # a lock, a lambda, a generator ...: nothing was sent
            raise InvalidArgument(
                f"{name}: the arguments cannot be pickled ({type(exc).__name__}: {exc}); they "
                "must be plain data or mpstore's records to reach the server") from None
        channel = getattr(self._local, "channel", None)
        if channel is None or channel.epoch != fork_epoch():
            return self._recover(name, args, kwargs, started, None)
        try:
            data = channel.request(payload, timeout)
        except TransportError as failure:
            self._discard(channel)
            return self._recover(name, args, kwargs, started, failure)
        return _unpack(data, args, self._loads, name)

    def _reply_timeout(self, wait: Wait, kwargs: dict[str, Any]) -> float:
        """How long a blocking call whose wait is at most ``timeout`` may take: its own wait
        plus ``timeout`` (just ``timeout`` for a wait that is not a number: the server
        rejects it at once)."""
        try:
            seconds = max(float(wait.of(kwargs)), 0.0)
        except (TypeError, ValueError):
            return self._timeout
        if seconds != seconds:
            return self._timeout  # NaN
        return min(seconds + self._timeout, _LONGEST)  # (a str like "1e300": rejected too)

    def _recover(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 started: float, failure: TransportError | None) -> Any:
        """Reconnect and (re)send as the policy allows, until ``retry_for`` seconds after the
        first failure, or the end of a wait that began at ``started``. Raises
        StoreUnavailable, or what the server raised."""
        once = REQUEST_KEY in kwargs  # answered once however often it is sent
        if failure is not None and failure.delivered and not (once or name in RETRIED):
            raise self._unsafe(name, failure)
        if failure is not None:
            self._move_on()
        deadline, own_end = time.monotonic() + self._retry_for, None
        wait = BLOCKING.get(name)
        if wait is not None and name in RETRIED and is_seconds(wait.of(kwargs)):
            # A wait that is sent again (wait_for_rollouts) keeps its caller's time limit: it
            # waits for what is left of it and gives up at its end. (A claim is never sent
            # again once delivered; before that it is retried like any write.)
            own_end = started + max(float(wait.of(kwargs)), 0.0)
            deadline = min(deadline, own_end)
        delay, first = 0.01, True
        while True:
            channel = self._open(deadline, first, failure)
            first = False
            timeout = self._timeout
            if wait is not None:
                if own_end is not None:
                    kwargs = {**kwargs, wait.keyword: max(own_end - time.monotonic(), 0.0)}
                timeout = self._reply_timeout(wait, kwargs)
            try:
                data = channel.request(_request(name, args, kwargs), timeout)
            except TransportError as exc:
                self._discard(channel)
                if exc.delivered and not (once or name in RETRIED):
                    raise self._unsafe(name, exc) from None
                failure = exc
                self._move_on()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._unavailable(failure) from None
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.25)
                continue
            return _unpack(data, args, self._loads, name)

    def _open(self, deadline: float, first: bool, failure: TransportError | None) -> Channel:
        """This thread's new connection, retried until ``deadline``. Raises
        AuthenticationFailed at once, StoreUnavailable when the deadline passes."""
        delay, tried = 0.01, 0
        last: BaseException | None = failure.cause if failure is not None else None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not first:
                raise self._unavailable(last) from None
            # The first attempt at each server gets the full timeout even with retry_for=0.
            step = self._timeout if first else min(self._timeout, max(remaining, 0.05))
            tried += 1
            first = tried < len(self._servers)
            try:
                channel = Channel(self._host, self._port, self._authkey, step, fork_epoch(),
                                  self._tls_context)
            except (OSError, EOFError) as exc:
                last = exc
                self._move_on()
                remaining = deadline - time.monotonic()
                if remaining > 0 and tried % len(self._servers) == 0:
                    time.sleep(min(delay, remaining))  # after a round of every server
                    delay = min(delay * 2, 0.25)
                continue
            self._local.channel = channel
            if self._epoch != channel.epoch:
                # The first connection in a forked child: the parent's lock may have been held
                # by a thread that does not exist here, and its channels are not ours.
                self._channels_lock, self._channels = threading.Lock(), weakref.WeakSet()
                self._epoch = channel.epoch
            with self._channels_lock:
                self._channels.add(channel)
            return channel

    def _move_on(self) -> None:
        """Point this client at the next of its servers (no-op with one)."""
        if len(self._servers) > 1:
            at = self._servers.index((self._host, self._port))
            self._host, self._port = self._servers[(at + 1) % len(self._servers)]

    def _discard(self, channel: Channel) -> None:
        channel.close()
        if getattr(self._local, "channel", None) is channel:
            self._local.channel = None

    def _unavailable(self, cause: BaseException | TransportError | None) -> StoreUnavailable:
        if isinstance(cause, TransportError):
            cause = cause.cause
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else "no answer"
        return StoreUnavailable(
            f"mpstore server at {self.address} is unavailable ({reason}; "
            f"retried for {self._retry_for:g} s)"
        )

    def _unsafe(self, name: str, failure: TransportError) -> StoreUnavailable:
        cause = failure.cause
        return StoreUnavailable(
            f"{name}: the connection to the mpstore server at {self.address} broke after the "
            f"request was sent ({type(cause).__name__}: {cause}); it may or may not have been "
            "applied, so it was not repeated"
        )

    def _connect_now(self) -> None:
        """Open this thread's connection now (connect() is eager so that a wrong address or
        key shows at once). Raises StoreUnavailable or AuthenticationFailed."""
        channel = getattr(self._local, "channel", None)
        if channel is None or channel.epoch != fork_epoch():
            self._open(time.monotonic() + self._retry_for, True, None)


class _StoreSignature:
    """The ``__wrapped__`` of a client method: ``inspect.signature`` (and so ``help()``)
    follows it and finds the store method's signature, importing the store only then."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def __signature__(self) -> Any:
        import inspect

        from ..store import InMemoryStore

        return inspect.signature(getattr(InMemoryStore, self._name))


def _remote_method(name: str) -> Callable[..., Any]:
    """A method forwarding to the server's ``name``, with the store method's signature for
    ``inspect``/``help()`` and named ``name`` in tracebacks."""

    def method(self: StoreClient, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, args, kwargs)

    code = method.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):  # 3.11+: tracebacks print the qualified name
        code = code.replace(co_qualname=f"StoreClient.{name}")
    method.__code__ = code
    method.__name__, method.__qualname__ = name, f"StoreClient.{name}"
    method.__doc__ = f"``InMemoryStore.{name}`` run by the server (see its documentation)."
    method.__wrapped__ = _StoreSignature(name)  # type: ignore[attr-defined]
    return method


def _otel_arguments(rollout_id: Any, attempt_id: Any, readable_span: Any,
                    sequence_id: Any = None) -> tuple[Any, ...]:
    return rollout_id, attempt_id, readable_span, sequence_id


def _add_otel_span(self: StoreClient, *args: Any, **kwargs: Any) -> Any:
    # Converted here, so that no OpenTelemetry object crosses the wire: the server gets a Span.
    # Arguments that do not fit the signature go as they are: the server refuses them.
    try:
        rollout_id, attempt_id, readable_span, sequence_id = _otel_arguments(*args, **kwargs)
    except TypeError:
        return self._call("add_otel_span", args, kwargs)
    if not isinstance(readable_span, Span):
        readable_span = to_span(readable_span, rollout_id, attempt_id, sequence_id or 0)
    return self._call("add_otel_span", (rollout_id, attempt_id, readable_span, sequence_id), {})


#: Methods whose client side does more than forward its arguments (same name and signature).
CLIENT_SIDE: dict[str, Callable[..., Any]] = {"add_otel_span": _add_otel_span}

for _name in SERVED:
    _method = _remote_method(_name)
    if _name in CLIENT_SIDE:
        _own = CLIENT_SIDE[_name]
        for _attr in ("__name__", "__qualname__", "__doc__", "__wrapped__"):
            setattr(_own, _attr, getattr(_method, _attr))
        _method = _own
    setattr(StoreClient, _name, _method)
del _name, _method, _own, _attr


def parse_addresses(address: Any) -> list[tuple[str, int]]:
    """One address, ``"h1:4747,h2:4747"``, or a list of addresses, in order."""
    if isinstance(address, str) and "," in address:
        items: list[Any] = [a for a in address.split(",") if a.strip()]
    elif isinstance(address, list) or (isinstance(address, tuple) and address
                                       and isinstance(address[0], (tuple, list))):
        items = list(address)
    else:
        items = [address]
    if not items:
        raise InvalidArgument(f"no server address in {address!r}")
    return [parse_address(item) for item in items]


def connect(address: str | tuple[str, int] | list[Any] = DEFAULT_ADDRESS,
            authkey: bytes | str | None = None, *, timeout: float = 30.0,
            retry_for: float = 5.0, authkey_file: str | None = None,
            allow_classes: Iterable[str | type] = (), tls_ca: str | None = None,
            tls_cert: str | None = None, tls_key: str | None = None) -> StoreClient:
    """A client of the ``agl store`` server at ``address`` (``"host:port"``).

    Several servers sharing one database (``agl store --backend``): ``"h1:4747,h2:4747"`` or
    a list of addresses. The client tries them in order and moves on to the next whenever a
    connection cannot be opened or breaks (the retry rules below apply across them); they
    must share one authkey (found for the first address).

    ``authkey``: explicit key; else ``MPSTORE_AUTHKEY``, ``authkey_file``, or the key file a
    server on this machine wrote for that host and port (see :mod:`mpstore.manager.auth`).
    ``timeout``: seconds for connecting and for each reply (beyond a blocking call's own
    wait). ``retry_for``: seconds to keep retrying when the server cannot be reached.
    ``allow_classes``: classes (``"module.Name"`` or the objects) that replies may contain
    beyond builtin containers and scalars, mpstore's records and the store's exceptions
    (see :mod:`~mpstore.manager.safe_pickle`); a reply with anything else raises
    InvalidArgument, and nothing of it is built.
    ``tls_ca``: speak TLS and verify the server's certificate with this CA file (default
    ``MPSTORE_TLS_CA``; neither: plaintext); the certificate must name ``address``'s host.
    ``tls_cert``, ``tls_key``: this client's certificate and key, for a server that requires
    one (``agl store --tls-client-ca``; default ``MPSTORE_TLS_CERT``, ``MPSTORE_TLS_KEY``).

    The connection is opened now: raises StoreUnavailable if no server answers within
    ``retry_for`` seconds, AuthenticationFailed for a wrong or missing key, InvalidArgument
    for a malformed address.
    """
    (host, port), *fallbacks = parse_addresses(address)
    key = resolve_authkey(host, port, authkey, authkey_file).key
    client = StoreClient(host, port, key, timeout=timeout, retry_for=retry_for,
                         allow_classes=allow_classes, tls=client_tls(tls_ca, tls_cert, tls_key),
                         fallbacks=tuple(fallbacks))
    client._connect_now()
    return client
