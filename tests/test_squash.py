"""What a compaction runs (``tables.plan``: squashed, spans in chunks, multi-row INSERTs)
leaves the database that running the log's statements one by one would."""

from __future__ import annotations

import pickle
import sqlite3
from contextlib import closing
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mpstore import tables

ROLLOUTS = ["ro-a", "ro-b", "ro-c"]
CLIENTS = ["c1", "c2"]


def _statement(kind: str, rid: str, client: str, n: int) -> tables.Statement:
    return {
        "rollout": (tables._PUT_ROLLOUT, (rid, 1, n, 0, n, b"r%d" % n, None)),
        "counter": (tables._PUT_COUNTER, (rid, n)),
        "span": (tables._ADD_SPAN, (rid, n, float(n), b"s%d" % n)),
        "evict": (tables._EVICT, (rid,)),
        "drop": (tables._DROP_SPANS, (rid,)),
        "reply": (tables._PUT_REPLY, (client, n, b"x%d" % n)),
        "forget": (tables._FORGET_REPLIES, (client, n)),
        "delete": (tables._DELETE[0], (rid,)),
    }[kind]


statements = st.lists(st.builds(
    _statement, st.sampled_from(["rollout", "counter", "span", "evict", "drop", "reply",
                                 "forget", "delete"]),
    st.sampled_from(ROLLOUTS), st.sampled_from(CLIENTS), st.integers(1, 12)), max_size=40)


def _one_by_one(db: sqlite3.Connection, batch: list[tables.Statement]) -> None:
    """The log's meaning: each statement on its own, a span added as a chunk of one."""
    for statement in batch:
        for sql, params in tables.chunked([statement]):
            db.execute(sql, params)


def _planned(db: sqlite3.Connection, batch: list[tables.Statement]) -> None:
    for sql, params in tables.plan(batch):
        db.execute(sql, params)


def _run(batch: list[tables.Statement], run: Any) -> dict[str, Any]:
    """The tables after ``run``; spans as each rollout's list, in order (not as chunks)."""
    with closing(sqlite3.connect(":memory:")) as db:
        db.executescript(tables.SCHEMA_SQL)
        run(db, batch)
        seen = {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                for table in ("rollouts", "counters", "evicted", "replies")}
        spans: dict[str, list[Any]] = {}
        for rid, ticket, records in db.execute(
                "SELECT rollout_id, ticket, records FROM spans ORDER BY id"):
            chunk = pickle.loads(records)
            assert ticket == max(t for t, _, _ in chunk)
            spans.setdefault(rid, []).extend(chunk)
        seen["spans"] = spans
        return seen


@settings(max_examples=300, deadline=None)
@given(statements)
def test_the_planned_batch_leaves_the_same_database(batch: list[tables.Statement]) -> None:
    assert len(tables.squash(batch)) <= len(batch)
    assert _run(batch, _planned) == _run(batch, _one_by_one)


def test_a_rollouts_spans_become_one_chunk_and_rows_one_insert() -> None:
    batch = [_statement(kind, rid, "c1", n) for n, (kind, rid) in enumerate(
        [("span", "ro-a"), ("rollout", "ro-a"), ("span", "ro-b"), ("span", "ro-a"),
         ("rollout", "ro-b"), ("drop", "ro-b"), ("span", "ro-b")], start=1)]
    planned = tables.plan(batch)
    assert [sql.split(" (")[0] for sql, _ in planned] == [
        "INSERT OR REPLACE INTO rollouts VALUES", "DELETE FROM spans WHERE rollout_id = ?",
        "INSERT INTO spans"]
    rollouts, _, chunks = planned
    assert rollouts[1][0] == "ro-a" and rollouts[1][7] == "ro-b"  # two rows, one statement
    assert chunks[1][::3] == ("ro-a", "ro-b")  # ro-b's span before the drop is gone
    assert pickle.loads(chunks[1][2]) == ((1, 1.0, b"s1"), (4, 4.0, b"s4"))
    assert pickle.loads(chunks[1][5]) == ((7, 7.0, b"s7"),)


def test_a_long_run_is_cut_to_what_sqlite_binds() -> None:
    batch = [_statement("rollout", f"ro-{n}", "c1", n) for n in range(1, 400)]
    planned = tables.plan(batch)
    assert all(len(params) <= tables._MAX_PARAMETERS for _, params in planned)
    assert sum(len(params) for _, params in planned) == 7 * 399 and len(planned) == 3


def test_rewrites_and_forgotten_replies_are_left_out() -> None:
    batch = [_statement("rollout", "ro-a", "c1", 1), _statement("reply", "ro-a", "c1", 1),
             _statement("rollout", "ro-a", "c1", 2), _statement("reply", "ro-a", "c1", 2),
             _statement("forget", "ro-a", "c1", 1), _statement("reply", "ro-a", "c1", 3)]
    assert tables.squash(batch) == [batch[2], batch[3], batch[4], batch[5]]
