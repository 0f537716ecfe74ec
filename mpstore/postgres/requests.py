"""Request ids in the database: a write resent to *any* server is answered exactly once.

A request that changes the store carries ``(client id, sequence number)`` (see
:mod:`mpstore.replies`). On PostgreSQL its reply is a row of ``mpstore_replies``, written by
``mpstore_remember`` in the **same transaction** as the change it reports (the full path's
``Tx``, or the fast paths' single statements and claim transaction). So either both are
committed or neither: a client whose server died mid-call resends to the next server, and

* if the first commit happened, the resend's own attempt to remember the same request fails
  on the primary key (its change is rolled back with it) and the stored reply is answered;
* if not, nothing of the first attempt is left and the resend is applied once.

Two attempts of one request at once (a resend while the original still runs) are serialised
by the same key: the second waits for the first's commit, then fails and answers its reply.
No lookup precedes a call (that would cost every write a round trip); the table is read only
when the call failed, was refused, or claimed nothing (an empty claim is not remembered, as in
memory: a resend may claim), in case its request was answered before.

Memory policy, as :mod:`mpstore.replies`: per client at least the latest ``PER_CLIENT``
replies are kept, a client not heard from for ``TTL`` seconds is forgotten whole. Pruning is
in bulk, not per call: the watchdog's leader deletes, every ``PRUNE_EVERY`` seconds, the
replies of clients past their TTL, and of clients holding more than ``2 x PER_CLIENT`` all but
their latest ``PER_CLIENT``, raising the client's *floor* (``mpstore_reply_floors``) to the
highest it deleted. A resend at or below the floor is refused with ``StoreUnavailable`` (it
may have been applied), never applied again: ``mpstore_remember`` raises for it, and its
change is rolled back.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import InvalidArgument, StoreError, StoreUnavailable
from ..replies import PER_CLIENT, TTL
from .db import Tx

__all__ = ["FORGOTTEN", "PRUNE_EVERY", "SKIP", "Answered", "Requests", "forgotten", "prune"]

T = TypeVar("T")
_dumps, _loads = pickle.dumps, pickle.loads
#: The SQLSTATE ``mpstore_remember`` raises for a request whose reply was forgotten.
FORGOTTEN = "MPST2"
#: The primary key a second answer to one request violates.
ANSWERED_KEY = "mpstore_replies_pkey"
#: Seconds between two prunes (by the watchdog's leader).
PRUNE_EVERY = 10.0
REMEMBER = "SELECT mpstore_remember(%s, %s, %s, %s)"
_LOOKUP = ("SELECT (SELECT reply FROM mpstore_replies WHERE client = %s AND seq = %s), "
           "(SELECT floor >= %s FROM mpstore_reply_floors WHERE client = %s)")
_PRUNE_AGED = (
    "WITH aged AS (SELECT client FROM mpstore_replies GROUP BY client HAVING max(at) < %s), "
    "gone AS (DELETE FROM mpstore_replies WHERE client IN (SELECT client FROM aged)) "
    "DELETE FROM mpstore_reply_floors WHERE client IN (SELECT client FROM aged) "
    "OR client NOT IN (SELECT client FROM mpstore_replies)")
_PRUNE_WINDOW = (
    "WITH crowded AS (SELECT client FROM mpstore_replies GROUP BY client "
    "HAVING count(*) > %s), "
    "ranked AS (SELECT client, seq, row_number() OVER (PARTITION BY client ORDER BY seq DESC) "
    "AS n FROM mpstore_replies WHERE client IN (SELECT client FROM crowded)), "
    "gone AS (DELETE FROM mpstore_replies AS r USING ranked WHERE r.client = ranked.client "
    "AND r.seq = ranked.seq AND ranked.n > %s RETURNING r.client, r.seq) "
    "INSERT INTO mpstore_reply_floors SELECT client, max(seq) FROM gone GROUP BY client "
    "ON CONFLICT (client) DO UPDATE SET floor = GREATEST(mpstore_reply_floors.floor, "
    "EXCLUDED.floor)")


#: An ``answer`` of ``_call`` that says "not remembered" (an empty claim).
SKIP: Any = object()


class Answered(Exception):
    """This request was answered before (its reply is in the table): answer that."""


def forgotten(client: str, seq: int) -> StoreUnavailable:
    return StoreUnavailable(f"request {seq} of client {client} was sent again after its reply "
                            "was forgotten (see mpstore.replies); it may have been applied")


def prune(tx: Tx, now: float) -> None:
    """Forget the replies past the memory policy (see the module), in two statements."""
    tx.wrote = True
    tx.execute(_PRUNE_AGED, (now - TTL,))
    tx.execute(_PRUNE_WINDOW, (2 * PER_CLIENT, PER_CLIENT))


class Requests:
    """``once`` and the request context of :class:`~.store.PostgresStore` (which provides
    the attributes declared here)."""

    if TYPE_CHECKING:
        def _call(self, fn: Callable[[Tx], T], *, watchdog: bool = True) -> T: ...

    _request = threading.local()

    def _init_requests(self) -> None:
        self._request = threading.local()

    def _current(self) -> tuple[str, int] | None:
        """This thread's request id, while ``once`` runs its call; else None."""
        return getattr(self._request, "id", None)

    def _remembered(self) -> None:
        """The current request's reply was committed (with its change)."""
        self._request.remembered = True

    def once(self, request: Any, method: Callable[..., T]) -> Callable[..., T]:
        """``method`` as a call applied at most once per request id ``(client id, int)``,
        across every server of the database (see the module): a request answered before is
        answered with its stored reply; one whose reply was forgotten raises
        StoreUnavailable; InvalidArgument for a malformed id. For a server (the request id
        travels with the request, ``api.REQUEST_KEY``); not served remotely."""
        if not (isinstance(request, tuple) and len(request) == 2 and isinstance(request[0], str)
                and type(request[1]) is int):
            raise InvalidArgument(f"a request id is (client id, int), not {request!r}")
        key: tuple[str, int] = request

        def call(*args: Any, **kwargs: Any) -> T:
            self._request.id, self._request.remembered = key, False
            try:
                result = method(*args, **kwargs)
            except Answered:
                self._request.id = None
                return self._stored(key, required=True)[0]  # type: ignore[no-any-return]
            except StoreError as exc:
                self._request.id = None
                stored = self._stored(key)
                if stored is None:
                    raise exc from None
                return stored[0]  # type: ignore[no-any-return]
            finally:
                self._request.id = None
            if not self._request.remembered:  # e.g. an empty claim: was it answered before?
                stored = self._stored(key)
                if stored is not None:
                    return stored[0]  # type: ignore[no-any-return]
            return result

        return call

    def _stored(self, key: tuple[str, int], required: bool = False) -> tuple[Any] | None:
        """The stored reply of request ``key`` as a 1-tuple, or None if it has none. Raises
        StoreUnavailable if it was forgotten (or, ``required``, is not there)."""
        client, seq = key
        row = self._call(lambda tx: tx.one(_LOOKUP, (client, seq, seq, client)),
                         watchdog=False)
        if row[0] is not None:
            return (_loads(row[0]),)
        if row[1] or required:
            raise forgotten(client, seq)
        return None
