"""``tables.squash``: a compaction runs fewer statements, and leaves the same database."""

from __future__ import annotations

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


def _run(batch: list[tables.Statement]) -> dict[str, Any]:
    with closing(sqlite3.connect(":memory:")) as db:
        db.executescript(tables.SCHEMA_SQL)
        for sql, params in batch:
            db.execute(sql, params)
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                for table in ("rollouts", "counters", "spans", "evicted", "replies")}


@settings(max_examples=300, deadline=None)
@given(statements)
def test_the_squashed_batch_leaves_the_same_database(batch: list[tables.Statement]) -> None:
    squashed = tables.squash(batch)
    assert len(squashed) <= len(batch)
    assert _run(squashed) == _run(batch)


def test_rewrites_and_forgotten_replies_are_left_out() -> None:
    batch = [_statement("rollout", "ro-a", "c1", 1), _statement("reply", "ro-a", "c1", 1),
             _statement("rollout", "ro-a", "c1", 2), _statement("reply", "ro-a", "c1", 2),
             _statement("forget", "ro-a", "c1", 1), _statement("reply", "ro-a", "c1", 3)]
    assert tables.squash(batch) == [batch[2], batch[3], batch[4], batch[5]]
