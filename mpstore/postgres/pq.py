"""The hot statements, run through libpq directly (``psycopg.pq``, psycopg's own binding).

psycopg's ``Connection.execute`` spends about 100 µs of Python per statement (adapting,
its cursor, its wait loop); ``PGconn.exec_prepared`` spends about 15 and releases the GIL
while it waits. So the calls of the benchmark cycle (``add_span``, updates, claims,
enqueues) run their statements here: prepared once per connection, parameters as text (or
raw bytes for ``bytea``), results in binary, decoded by column type. Everything else goes
through psycopg proper. Errors raise :class:`DbError` with the SQLSTATE.
"""

from __future__ import annotations

import re
import select
import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DbError", "Session", "encode", "numbered", "rows", "text_array"]

_INT8, _INT4, _FLOAT8 = struct.Struct(">q"), struct.Struct(">i"), struct.Struct(">d")
#: Binary result decoders by type OID: bool, bytea, int8, int4, text, varchar, float8.
_DECODE: dict[int, Callable[[bytes], Any]] = {
    16: lambda b: b == b"\x01",
    17: bytes,
    20: lambda b: _INT8.unpack(b)[0],
    23: lambda b: _INT4.unpack(b)[0],
    25: lambda b: b.decode(),
    1043: lambda b: b.decode(),
    701: lambda b: _FLOAT8.unpack(b)[0],
}
_PLACEHOLDER = re.compile(r"%s")
#: Statements Session.batch sends as they are (no parameters, nothing to prepare).
_CONTROL = frozenset({"BEGIN", "COMMIT", "ROLLBACK"})
#: Prepared statement names per connection (a connection's prepared statements die with it).
_prepared: weakref.WeakKeyDictionary[Any, dict[str, bytes]] = weakref.WeakKeyDictionary()


class DbError(Exception):
    """A statement failed in the database; ``sqlstate`` says why (e.g. 40P01: deadlock)."""

    def __init__(self, message: str, sqlstate: str | None, broken: bool) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.broken = broken  # the connection is lost: nothing more is known


def _param(value: Any) -> bytes | None:
    if value is None:
        return None
    if value is True:
        return b"t"
    if value is False:
        return b"f"
    kind = type(value)
    if kind is str:
        return value.encode()
    if kind is float:
        if value != value:
            return b"NaN"
        if value in (float("inf"), float("-inf")):
            return b"Infinity" if value > 0 else b"-Infinity"
        return repr(value).encode()
    return str(value).encode()  # int


def numbered(sql: str) -> bytes:
    """``sql`` with its ``%s`` placeholders numbered as PostgreSQL's ``$1, $2 ...``."""
    count = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(count)}", sql).encode()


def encode(params: Sequence[Any]) -> tuple[list[bytes | None], list[int]]:
    """Parameter values and formats for libpq: raw bytes as binary (``bytea``), the rest as
    text."""
    values: list[bytes | None] = []
    formats: list[int] = []
    for value in params:
        if type(value) is bytes:
            values.append(value)
            formats.append(1)
        else:
            values.append(_param(value))
            formats.append(0)
    return values, formats


def rows(result: Any) -> list[tuple[Any, ...]]:
    """A binary TUPLES_OK result's rows, decoded by column type."""
    decoders = [_DECODE[result.ftype(i)] for i in range(result.nfields)]
    return [tuple(None if (v := result.get_value(row, i)) is None else decode(v)
                  for i, decode in enumerate(decoders))
            for row in range(result.ntuples)]


def text_array(items: Sequence[str]) -> str:
    """A text[] literal (for ``= ANY($1)``)."""
    quoted = ('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items)
    return "{" + ",".join(quoted) + "}"


def _next_result(pgconn: Any) -> Any:
    """``pgconn.get_result()``, waited for without the GIL (psycopg's binding holds it in a
    get_result that blocks, which would stop every other thread of the server)."""
    while pgconn.is_busy():
        select.select([pgconn.socket], [], [])
        pgconn.consume_input()
    return pgconn.get_result()


class Session:
    """One pooled psycopg connection, driven through its ``pgconn``."""

    __slots__ = ("_names", "pgconn")

    def __init__(self, conn: Any) -> None:
        self.pgconn = conn.pgconn
        names = _prepared.get(conn)
        if names is None:
            names = _prepared[conn] = {}
        self._names = names

    def _fail(self, result: Any) -> DbError:
        from psycopg import pq

        message = (result.error_message or self.pgconn.error_message or b"").decode(
            errors="replace").strip()
        state = result.error_field(pq.DiagnosticField.SQLSTATE)
        broken = self.pgconn.status != pq.ConnStatus.OK
        return DbError(message or "statement failed", state.decode() if state else None,
                       broken)

    def _name(self, sql: str) -> bytes:
        """The name ``sql`` is prepared under on this connection (prepared on first use)."""
        from psycopg import pq

        name = self._names.get(sql)
        if name is None:
            name = f"mpstore_{len(self._names)}".encode()
            result = self.pgconn.prepare(name, numbered(sql))
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise self._fail(result)
            self._names[sql] = name
        return name

    def _rows(self, result: Any) -> list[tuple[Any, ...]]:
        from psycopg import pq

        status = result.status
        if status == pq.ExecStatus.COMMAND_OK:
            return []
        if status != pq.ExecStatus.TUPLES_OK:
            raise self._fail(result)
        return rows(result)

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one statement (``%s`` placeholders), prepared on first use."""
        return self._rows(self.pgconn.exec_prepared(self._name(sql), *encode(params), 1))

    def batch(self, statements: Sequence[tuple[str, Sequence[Any]]]
              ) -> list[list[tuple[Any, ...]]]:
        """The rows of each statement, all sent in one round trip (libpq's pipeline mode).
        ``BEGIN``, ``COMMIT`` and ``ROLLBACK`` may be among them (no parameters). If one
        fails, the rest are not run (a transaction they are in is aborted) and its error
        is raised once every result is read."""
        from psycopg import pq

        pgconn = self.pgconn
        names = [None if sql in _CONTROL else self._name(sql) for sql, _ in statements]
        results = []
        try:
            pgconn.enter_pipeline_mode()
            for (sql, params), name in zip(statements, names, strict=True):
                if name is None:
                    pgconn.send_query_params(sql.encode(), None)
                else:
                    pgconn.send_query_prepared(name, *encode(params), 1)
            pgconn.pipeline_sync()
            last = None
            while (result := _next_result(pgconn)) is None or \
                    result.status != pq.ExecStatus.PIPELINE_SYNC:
                if result is not None:
                    results.append(result)
                elif last is None:  # a statement's end follows a result, never another end
                    raise DbError("the connection was lost", None, True)
                last = result
            pgconn.exit_pipeline_mode()
        except DbError:
            raise
        except Exception as exc:  # libpq refused to send or read: the link is gone
            raise DbError(str(exc), None, True) from None
        return [self._rows(result) for result in results]

    def script(self, sql: str) -> None:
        """A statement without parameters or results (BEGIN, COMMIT, ROLLBACK)."""
        from psycopg import pq

        result = self.pgconn.exec_(sql.encode())
        if result.status != pq.ExecStatus.COMMAND_OK:
            raise self._fail(result)
