"""The PostgreSQL backend beyond the contract suite: several stores (servers) on one
database, the schema's version checks, failures in the database, client failover.

Each test has a database of its own (the shared one has servers running on it).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpstore import RolloutNotFound, Span, StorageError, StoreUnavailable, connect
from mpstore.manager.ports import free_port
from tests import pg
from tests.remote import running_server


@pytest.fixture
def url(postgres_server: str, postgres_shared: str) -> Iterator[str]:
    with pg.fresh_database(postgres_server) as own:
        yield own


@pytest.fixture
def two(url: str) -> Iterator[list[Any]]:
    from mpstore.postgres import PostgresStore

    stores = [PostgresStore(url) for _ in range(2)]
    try:
        yield stores
    finally:
        for store in stores:
            store.close()


def _sql(url: str, *statements: str) -> list[Any]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows: list[Any] = []
        for statement in statements:
            cursor = conn.execute(statement)
            rows = cursor.fetchall() if cursor.description else []
        return rows


# ------------------------------------------------------------------ several stores
def test_a_write_on_one_store_is_read_on_the_other(two: list[Any]) -> None:
    a, b = two
    rollout = a.enqueue_rollout({"q": 1})
    claimed = b.dequeue_rollout(worker_id="w")
    assert claimed is not None and claimed.rollout_id == rollout.rollout_id
    assert a.dequeue_rollout() is None  # claimed once, whichever store asks
    assert a.get_rollout_by_id(rollout.rollout_id).status == "preparing"
    assert [b.get_next_span_sequence_id(rollout.rollout_id, "x") for _ in range(2)] == [1, 2]
    assert a.get_next_span_sequence_id(rollout.rollout_id, "x") == 3


def test_a_claim_waiting_on_one_store_is_woken_by_an_enqueue_on_the_other(
        two: list[Any]) -> None:
    a, b = two
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(b.dequeue_rollout(wait=30.0)))
    waiter.start()
    while not b._listener._claimers:  # the waiter is registered (before it looks)
        threading.Event().wait(0.01)
    rollout = a.enqueue_rollout("x")
    waiter.join(30.0)
    assert not waiter.is_alive() and got[0].rollout_id == rollout.rollout_id


def test_a_wait_on_one_store_is_woken_by_a_finish_on_the_other(two: list[Any]) -> None:
    a, b = two
    started = a.start_rollout("x")
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(
        b.wait_for_rollouts(rollout_ids=[started.rollout_id], timeout=30.0)))
    waiter.start()
    while started.rollout_id not in b._listener._finishers:
        threading.Event().wait(0.01)
    a.update_attempt(started.rollout_id, "latest", status="succeeded")
    waiter.join(30.0)
    assert not waiter.is_alive()
    assert [r.status for r in got[0]] == ["succeeded"]


def test_the_watchdog_runs_on_one_store_at_a_time_and_is_taken_over(url: str) -> None:
    from mpstore.postgres import PostgresStore

    a, b = PostgresStore(url), PostgresStore(url)
    try:
        a.enqueue_rollout("x", config={"timeout_seconds": -1.0})
        claimed = a.dequeue_rollout()
        assert claimed is not None
        # The next call on any store would see the timeout; only the leader's pass runs it.
        first = a.run_watchdog(), b.run_watchdog()
        assert first == (1, 0)
        assert a.statistics()["watchdog_leader"] and not b.statistics()["watchdog_leader"]
        a.close()  # the leader goes (as when its server dies: its connection closes)
        _until_released(url)
        b.enqueue_rollout("y", config={"timeout_seconds": -1.0})
        assert b.dequeue_rollout() is not None
        assert b.run_watchdog() == 1
        assert b.statistics()["watchdog_leader"]
    finally:
        for store in (a, b):
            store.close()


def _until_released(url: str) -> None:
    """Wait (bounded) until the closed leader's backend has ended and released the lock: the
    server side of a closed connection exits on its own time, under load a moment later."""
    from mpstore.postgres.ops import WATCHDOG_LOCK

    deadline = time.monotonic() + 30.0
    while _sql(url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
                    f"objid = {WATCHDOG_LOCK} AND database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())")[0][0]:
        assert time.monotonic() < deadline, "the closed leader still holds the lock"
        threading.Event().wait(0.05)


# ------------------------------------------------------------------ request ids
def test_a_request_resent_to_another_store_is_answered_from_the_database(
        url: str, two: list[Any]) -> None:
    a, b = two
    first = a.once(("c", 1), a.enqueue_rollout)("x")  # the one-statement enqueue
    assert b.once(("c", 1), b.enqueue_rollout)("x") == first
    assert [r.rollout_id for r in a.query_rollouts()] == [first.rollout_id]  # applied once
    a.enqueue_rollout("y")
    claim = a.once(("c", 2), a.dequeue_rollout)()
    resent = b.once(("c", 2), b.dequeue_rollout)()  # the same claim, nothing else claimed
    assert resent is not None and resent.attempt == claim.attempt
    other = b.dequeue_rollout()
    assert other is not None and other.input == "y" and b.dequeue_rollout() is None
    rid, aid = claim.rollout_id, claim.attempt.attempt_id
    done = a.once(("c", 3), a.update_attempt)(rid, aid, status="succeeded")  # from a's cache
    assert b.once(("c", 3), b.update_attempt)(rid, aid, status="failed") == done
    assert a.get_rollout_by_id(rid).status == "succeeded"
    number = a.once(("c", 4), a.get_next_span_sequence_id)(rid, aid)
    assert b.once(("c", 4), b.get_next_span_sequence_id)(rid, aid) == number
    assert a.get_next_span_sequence_id(rid, aid) == number + 1
    # A resend whose call would now fail (its rollout is gone) still gets its first answer.
    updated = a.once(("c", 5), a.update_rollout)(other.rollout_id, metadata={"k": 1})
    a.delete_rollouts([other.rollout_id])
    assert b.once(("c", 5), b.update_rollout)(other.rollout_id, metadata={"k": 2}) == updated
    assert _sql(url, "SELECT count(*) FROM mpstore_replies")[0][0] == 5


def test_an_empty_claim_is_not_remembered(two: list[Any]) -> None:
    a, b = two
    assert a.once(("c", 1), a.dequeue_rollout)() is None
    rollout = a.enqueue_rollout("x")
    claimed = b.once(("c", 1), b.dequeue_rollout)()  # a resend may claim
    assert claimed is not None and claimed.rollout_id == rollout.rollout_id


def test_replies_are_pruned_in_bulk_and_a_forgotten_one_is_refused(
        url: str, two: list[Any]) -> None:
    from mpstore.postgres.requests import prune
    from mpstore.replies import PER_CLIENT, TTL

    a, b = two
    count = 2 * PER_CLIENT + 1
    for seq in range(1, count + 1):
        a.once(("c", seq), a.enqueue_rollout)(seq)
    a.once(("d", 1), a.enqueue_rollout)(0)
    a._call(lambda tx: prune(tx, tx.now))  # what the watchdog's leader runs now and then
    assert _sql(url, "SELECT count(*) FROM mpstore_replies")[0][0] == PER_CLIENT + 1
    with pytest.raises(StoreUnavailable, match="forgotten"):
        b.once(("c", 1), b.enqueue_rollout)(1)
    assert b.query_rollouts().total == count + 1  # refused, not applied again
    kept = b.once(("c", count), b.enqueue_rollout)(count)  # the latest are answered
    assert kept.input == count and b.query_rollouts().total == count + 1
    a._call(lambda tx: prune(tx, tx.now + TTL + 1))  # clients not heard from: forgotten whole
    assert _sql(url, "SELECT count(*) FROM mpstore_replies")[0][0] == 0
    assert _sql(url, "SELECT count(*) FROM mpstore_reply_floors")[0][0] == 0


# ------------------------------------------------------------------ failures
def test_a_failing_statement_leaves_nothing_half_written(url: str, two: list[Any]) -> None:
    store = two[0]
    _sql(url, "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
              "IF NEW.span_id = 'boom' THEN RAISE EXCEPTION 'no boom'; END IF; "
              "RETURN NEW; END $$",
         "CREATE TRIGGER boom BEFORE INSERT ON mpstore_spans FOR EACH ROW "
         "EXECUTE FUNCTION boom()")
    claimed = store.start_rollout("x")
    rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
    before = (store.query_attempts(rid), store.get_rollout_by_id(rid), store.statistics())
    with pytest.raises(StorageError, match="no boom"):
        store.add_many_spans([Span(rid, aid, 1, "ok"), Span(rid, aid, 2, "b", span_id="boom")])
    with pytest.raises(StorageError, match="no boom"):
        store.add_span(Span(rid, aid, 3, "b", span_id="boom"))
    after = (store.query_attempts(rid), store.get_rollout_by_id(rid), store.statistics())
    assert store.query_spans(rid) == []
    assert after[0] == before[0] and after[1] == before[1]  # no heartbeat, no revival
    assert after[2]["total_spans"] == 0
    store.add_span(Span(rid, aid, 4, "fine"))  # and the store goes on
    assert [s.name for s in store.query_spans(rid)] == ["fine"]


def test_a_refused_batch_of_rollouts_writes_none(url: str, two: list[Any]) -> None:
    store = two[0]
    _sql(url, "CREATE FUNCTION third() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
              "IF (SELECT count(*) FROM mpstore_rollouts) >= 2 THEN "
              "RAISE EXCEPTION 'table full'; END IF; RETURN NEW; END $$",
         "CREATE TRIGGER third BEFORE INSERT ON mpstore_rollouts FOR EACH ROW "
         "EXECUTE FUNCTION third()")
    with pytest.raises(StorageError, match="table full"):
        store.enqueue_many_rollouts([{"input": i} for i in range(3)])
    assert store.query_rollouts() == [] and store.statistics()["queue_length"] == 0
    with pytest.raises(RolloutNotFound):
        store.update_rollout("ro-nope", status="failed")


def test_a_newer_or_foreign_schema_is_refused(url: str, postgres_server: str,
                                              tmp_path: Path) -> None:
    from mpstore.postgres import SCHEMA_VERSION, PostgresStore

    _sql(url, f"UPDATE mpstore_schema SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StorageError, match="newer"):
        PostgresStore(url)
    with pg.fresh_database(postgres_server) as other:
        _sql(other, "DELETE FROM mpstore_schema")
        with pytest.raises(StorageError, match="not an mpstore database"):
            PostgresStore(other)
    result = subprocess.run(
        [sys.executable, "-m", "mpstore", "store", "--port", str(free_port()), "--authkey-file",
         str(tmp_path / "key"), "--backend", url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "newer" in result.stderr


def test_an_empty_database_gets_the_schema(postgres_server: str) -> None:
    import psycopg

    from mpstore.postgres import SCHEMA_VERSION, PostgresStore

    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS mpstore_empty WITH (FORCE)")
        conn.execute("CREATE DATABASE mpstore_empty")
    url = pg.with_database(postgres_server, "mpstore_empty")
    store = PostgresStore(url)
    try:
        assert store.schema == "created"
        assert _sql(url, "SELECT version FROM mpstore_schema") == [(SCHEMA_VERSION,)]
    finally:
        store.close()
    again = PostgresStore(url)
    assert again.schema == "current"
    again.close()


# ------------------------------------------------------------------ failover
def test_a_client_of_two_servers_moves_on_when_one_dies(url: str, tmp_path: Path) -> None:
    pg.two_keys(tmp_path)
    with running_server(tmp_path / "a", "--backend", url) as a, \
            running_server(tmp_path / "b", "--backend", url) as b:
        client = connect(f"{a.address},{b.address}", a.authkey, retry_for=10.0)
        try:
            rollout = client.enqueue_rollout("x")
            assert client.ping()["pid"] == a.pid  # in order: the first one first
            a.kill()
            # A read is retried on the next server; a write on a fresh connection is sent.
            assert client.get_rollout_by_id(rollout.rollout_id) == rollout
            assert client.ping()["pid"] == b.pid
            assert client.dequeue_rollout().rollout_id == rollout.rollout_id
        finally:
            client.close()


def test_claims_racing_on_two_servers_take_each_rollout_once(url: str, tmp_path: Path
                                                             ) -> None:
    """Plain claims (the servers' pipelines take them) from six clients on two servers at
    once: a claim that loses a race to the other server goes to the full path; none is
    handed out twice and none is lost."""
    pg.two_keys(tmp_path)
    with running_server(tmp_path / "a", "--backend", url) as a, \
            running_server(tmp_path / "b", "--backend", url) as b:
        trainer = connect(a.address, a.authkey)
        ids = {r.rollout_id for r in trainer.enqueue_many_rollouts(
            [{"input": i} for i in range(300)])}
        claims: list[list[Any]] = [[] for _ in range(6)]

        def claim(mine: list[Any], address: str) -> None:
            with connect(address, a.authkey) as client:
                while (claimed := client.dequeue_rollout()) is not None:
                    mine.append(claimed)

        threads = [threading.Thread(target=claim, args=(claims[i], (a, b)[i % 2].address))
                   for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        claim(claims[0], a.address)  # any left while the last ones were locked
        got = [c.rollout_id for mine in claims for c in mine]
        assert len(got) == len(set(got)) == len(ids) and set(got) == ids
        assert sum(len(mine) > 0 for mine in claims[1::2]) > 0  # both servers claimed
        attempts = {c.attempt.attempt_id for mine in claims for c in mine}
        stored = {attempt.attempt_id for r in trainer.query_rollouts()
                  for attempt in trainer.query_attempts(r.rollout_id)}
        assert attempts == stored  # one attempt each: no claim overwrote another
        trainer.close()


def test_the_same_methods_with_the_same_signatures() -> None:
    import inspect

    from mpstore import InMemoryStore
    from mpstore.api import CALLS
    from mpstore.postgres import PostgresStore

    def public(cls: type) -> dict[str, str]:
        return {name: str(inspect.signature(getattr(cls, name))) for name in dir(cls)
                if not name.startswith("_") and callable(getattr(cls, name))}

    memory, postgres = public(InMemoryStore), public(PostgresStore)
    memory.pop("deferred_commits")  # a durable in-memory store's batching: not served
    assert postgres == memory
    assert {name for name, call in CALLS.items() if call.served} <= set(postgres)


def test_a_version_1_database_is_migrated(url: str) -> None:
    from mpstore.postgres import SCHEMA_VERSION, PostgresStore

    PostgresStore(url).close()
    # Schema 1 is schema 2 without mpstore_write_span.
    _sql(url, "DROP FUNCTION mpstore_write_span", "UPDATE mpstore_schema SET version = 1")
    with pytest.raises(StorageError, match="older"):
        PostgresStore(url)
    store = PostgresStore(url, migrate=True)
    try:
        assert store.schema == "migrated from 1"
        assert _sql(url, "SELECT version FROM mpstore_schema") == [(SCHEMA_VERSION,)]
        rollout = store.enqueue_rollout("x")
        claimed = store.dequeue_rollout()
        assert claimed is not None
        span = Span(rollout_id=rollout.rollout_id, attempt_id=claimed.attempt.attempt_id,
                    sequence_id=1, name="n")
        assert store.add_span(span) == span
        assert [s.span_id for s in store.query_spans(rollout.rollout_id)] == [span.span_id]
    finally:
        store.close()


def _scans(url: str, query: str, *params: Any) -> list[str]:
    """The scans of mpstore_rollouts that ``query`` ran (EXPLAIN ANALYZE's plan lines)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        plan = [row[0] for row in conn.execute(f"EXPLAIN ANALYZE {query}", params)]
    return [line for line in plan
            if "Seq Scan on mpstore_rollouts" in line and "never executed" not in line]


def test_the_watchdogs_check_does_not_scan_the_rollouts(url: str) -> None:
    """Every call asks whether a rollout is due: with thousands stored, and no statistics
    yet (a new run), that must read the index, not every row."""
    from mpstore.postgres import PostgresStore
    from mpstore.postgres.db import DUE
    from mpstore.postgres.schema import any_due

    store = PostgresStore(url)
    try:
        store.enqueue_many_rollouts([{"input": i} for i in range(3000)])
        claimed = store.dequeue_rollout()  # one claim: one row with a check_at
        assert claimed is not None
    finally:
        store.close()
    now = time.time()
    assert _scans(url, "SELECT " + any_due("%s"), now) == []
    assert _scans(url, DUE, now, now) == []
    # the functions of the write paths ask the same (their plans are not EXPLAIN's to show)
    bodies = _sql(url, "SELECT prosrc FROM pg_proc WHERE proname IN "
                       "('mpstore_insert', 'mpstore_write')")
    assert len(bodies) == 2 and all(any_due("p_now") in body for (body,) in bodies)


def test_a_batch_stops_at_its_first_error_and_a_lost_link_is_an_error(url: str) -> None:
    """Session.batch (a claim's two round trips): the statements after a failing one are not
    run, the error is the first one's; a connection killed meanwhile raises, never hangs."""
    import psycopg

    from mpstore.postgres.pq import DbError, Session

    _sql(url, "CREATE TABLE batch_t (v integer)")
    with psycopg.connect(url, autocommit=True) as conn:
        db = Session(conn)
        assert db.batch([("BEGIN", ()), ("SELECT %s::int + 1", (1,)), ("COMMIT", ())]) == [
            [], [(2,)], []]
        with pytest.raises(DbError) as failed:
            db.batch([("BEGIN", ()), ("INSERT INTO batch_t VALUES (%s)", (1,)),
                      ("SELECT 1 / %s::int", (0,)), ("INSERT INTO batch_t VALUES (%s)", (2,)),
                      ("COMMIT", ())])
        assert failed.value.sqlstate == "22012" and not failed.value.broken
        db.script("ROLLBACK")
        assert _sql(url, "SELECT count(*) FROM batch_t") == [(0,)]
        pid = conn.pgconn.backend_pid
        _sql(url, f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(DbError) as lost:
            db.batch([("SELECT %s::int", (1,))])
        assert lost.value.broken
