"""The PostgreSQL schema, its version, and creating or migrating it.

Every table is prefixed ``mpstore_``; ``mpstore_schema`` records which schema the database
holds (``name = 'mpstore'``, ``version``). :func:`prepare` runs in one transaction under an
advisory lock (two servers starting at once do not both create it):

* an empty database gets the current schema;
* an older version is migrated (``MIGRATIONS``; 1 -> 2 adds ``mpstore_write_span``, 2 -> 3
  gives ``mpstore_insert`` and ``mpstore_write`` the index-bound check of :func:`any_due`)
  when ``migrate`` is true, or started on by default too (``agl store`` migrates on start);
* a newer version, or a database with other tables called ``mpstore_*`` but no version row,
  is a :class:`~mpstore.errors.StorageError`: ``agl store`` exits 1 with its message.

Records are stored pickled (``record`` columns), as the SQLite journal does; the columns
beside them are what the queries filter, sort and lock by, each with its index:

* ``mpstore_rollouts``: one row per rollout, its attempts inside the record (a rollout has a
  handful), ``created`` (creation order), ``status``, ``queue_pos`` (set iff queued: the
  FIFO, claimed ``FOR UPDATE SKIP LOCKED``), ``check_at`` (the watchdog's next look),
  ``span_counter`` (sequence ids);
* ``mpstore_spans``: one row per span, keyed by (rollout, attempt, span_id) (D7), read by
  (rollout, sequence_id, arrival) (D6);
* ``mpstore_counters``: span counters of ids that are not rollouts (REF allows it);
* ``mpstore_resources``: by id, and by ``updated`` for "latest".

``version`` counts a rollout row's writes. Two functions write a row in one round trip
without locking it first, if it is still at the version a server last saw (optimistic; the
server keeps recent rows: see ``mpstore.postgres.cache``): ``mpstore_write_span`` (the span and
its heartbeat) and ``mpstore_write`` (any other change of one rollout, when no rollout is due
for the watchdog); ``mpstore_insert`` enqueues a rollout if the latest resources are still
the ones the server saw. Given a request id, the write functions also store its reply with
``mpstore_remember`` (``mpstore_replies``, see ``mpstore.postgres.requests``). They hold no
rule: what to write was decided by the server, with
``transitions``, on the row as it read it; a stale version writes nothing.
"""

from __future__ import annotations

from typing import Any

from ..errors import StorageError

__all__ = ["SCHEMA_NAME", "SCHEMA_VERSION", "TABLES", "any_due", "prepare"]

SCHEMA_NAME = "mpstore"
SCHEMA_VERSION = 3
#: Taken (transaction-scoped) while the schema is checked or created: "mpst" in ASCII.
SCHEMA_LOCK = 0x6D707374
TABLES = ("mpstore_counters", "mpstore_replies", "mpstore_reply_floors", "mpstore_resources",
          "mpstore_rollouts", "mpstore_schema", "mpstore_spans", "mpstore_workers")
#: Taken (transaction-scoped) by every transaction that finishes a rollout, just before it
#: takes the feed's next number: finishes commit in the order of their numbers, so a reader
#: of the feed never sees number n+1 before n ("mpsf").
FEED_LOCK = 0x6D707366


def any_due(now: str) -> str:
    """SQL: whether a rollout is due for the watchdog at ``now`` (an SQL expression).

    ``min()`` reads the first entry of the partial index on ``check_at`` whatever the
    planner knows. ``EXISTS (... WHERE check_at <= now)``, its first form, was planned as a
    scan of the whole table while the table had no statistics yet (the first minutes of a
    run, or a run with no timeouts): a cost per call that grew with the rollouts stored."""
    return f"coalesce((SELECT min(check_at) FROM mpstore_rollouts) <= {now}, false)"


_CREATE = """
CREATE TABLE mpstore_schema (name text PRIMARY KEY, version integer NOT NULL);
CREATE TABLE mpstore_rollouts (
    rollout_id text PRIMARY KEY,
    created bigserial NOT NULL,
    status text NOT NULL,
    queue_pos bigint,
    check_at double precision,
    attempts integer NOT NULL,
    span_counter bigint NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 0,
    finished bigint,
    record bytea NOT NULL
);
CREATE UNIQUE INDEX mpstore_rollouts_finished ON mpstore_rollouts (finished)
    WHERE finished IS NOT NULL;
CREATE SEQUENCE mpstore_finish_seq;
CREATE UNIQUE INDEX mpstore_rollouts_created ON mpstore_rollouts (created);
CREATE INDEX mpstore_rollouts_status ON mpstore_rollouts (status, created);
CREATE INDEX mpstore_rollouts_queue ON mpstore_rollouts (queue_pos)
    WHERE queue_pos IS NOT NULL;
CREATE INDEX mpstore_rollouts_check ON mpstore_rollouts (check_at)
    WHERE check_at IS NOT NULL;
CREATE SEQUENCE mpstore_queue_pos;
CREATE TABLE mpstore_spans (
    rollout_id text NOT NULL,
    attempt_id text NOT NULL,
    span_id text NOT NULL,
    sequence_id bigint NOT NULL,
    arrival bigserial NOT NULL,
    size integer NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (rollout_id, attempt_id, span_id)
);
CREATE INDEX mpstore_spans_order ON mpstore_spans (rollout_id, sequence_id, arrival);
CREATE TABLE mpstore_counters (rollout_id text PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE mpstore_resources (
    resources_id text PRIMARY KEY,
    updated bigserial NOT NULL,
    added bigserial NOT NULL,
    record bytea NOT NULL
);
CREATE INDEX mpstore_resources_updated ON mpstore_resources (updated);
CREATE UNIQUE INDEX mpstore_resources_added ON mpstore_resources (added);
CREATE TABLE mpstore_workers (
    worker_id text PRIMARY KEY,
    added bigserial NOT NULL,
    record bytea NOT NULL
);
CREATE UNIQUE INDEX mpstore_workers_added ON mpstore_workers (added);
CREATE TABLE mpstore_replies (
    client text NOT NULL,
    seq bigint NOT NULL,
    at double precision NOT NULL,
    reply bytea NOT NULL,
    PRIMARY KEY (client, seq)
);
CREATE TABLE mpstore_reply_floors (client text PRIMARY KEY, floor bigint NOT NULL);
CREATE FUNCTION mpstore_remember(p_client text, p_seq bigint, p_at double precision,
        p_reply bytea)
    RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM mpstore_reply_floors WHERE client = p_client
               AND floor >= p_seq) THEN
        RAISE EXCEPTION 'the reply was forgotten' USING ERRCODE = 'MPST2';
    END IF;
    -- a second answer to the same request violates the key: its change is rolled back
    INSERT INTO mpstore_replies VALUES (p_client, p_seq, p_at, p_reply);
    RETURN 1;
END $$;
"""

#: A rollout enqueued, if nothing is due and the latest resources are the ones the server
#: saw (1; -1: the caller takes the full path).
_INSERT_FN = """
CREATE OR REPLACE FUNCTION mpstore_insert(p_rid text, p_now double precision, p_status text,
        p_check double precision, p_attempts integer, p_record bytea,
        p_check_latest boolean, p_latest text, p_client text, p_seq bigint, p_reply bytea)
    RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    IF {any_due} THEN
        RETURN -1;  -- the watchdog has work to do first: the caller takes the full path
    END IF;
    IF p_check_latest AND coalesce((SELECT resources_id FROM mpstore_resources
            ORDER BY updated DESC LIMIT 1), '') <> coalesce(p_latest, '') THEN
        RETURN -1;  -- the latest resources are not the ones the caller saw
    END IF;
    INSERT INTO mpstore_rollouts (rollout_id, status, queue_pos, check_at, attempts, record)
        VALUES (p_rid, p_status, nextval('mpstore_queue_pos'), p_check, p_attempts, p_record);
    IF p_client IS NOT NULL THEN
        PERFORM mpstore_remember(p_client, p_seq, p_now, p_reply);
    END IF;
    PERFORM pg_notify('mpstore_queued', '1');
    RETURN 1;
END $$;
"""
#: Any other change of one rollout at the version the server saw (1; -1 stale or something
#: due: the caller takes the full path).
_WRITE_FN = """
CREATE OR REPLACE FUNCTION mpstore_write(p_rid text, p_version bigint, p_now double precision,
        p_status text, p_appended boolean, p_queued boolean, p_check double precision,
        p_attempts integer, p_record bytea, p_finished boolean, p_client text, p_seq bigint,
        p_reply bytea)
    RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    IF {any_due} THEN
        RETURN -1;  -- the watchdog has work to do first: the caller takes the full path
    END IF;
    IF p_finished THEN  -- finishes commit in the order of their feed numbers
        PERFORM pg_advisory_xact_lock(1836086118);
    END IF;
    UPDATE mpstore_rollouts SET status = p_status, queue_pos = CASE WHEN p_appended
            THEN nextval('mpstore_queue_pos') WHEN p_queued THEN queue_pos END,
        check_at = p_check, attempts = p_attempts, record = p_record, version = version + 1,
        finished = CASE WHEN p_finished THEN nextval('mpstore_finish_seq')
            WHEN p_status IN ('failed', 'succeeded', 'cancelled') THEN finished END
        WHERE rollout_id = p_rid AND version = p_version;
    IF NOT FOUND THEN
        RETURN -1;  -- written meanwhile
    END IF;
    IF p_client IS NOT NULL THEN
        PERFORM mpstore_remember(p_client, p_seq, p_now, p_reply);
    END IF;
    IF p_finished THEN
        PERFORM pg_notify('mpstore_finished', p_rid);
    END IF;
    IF p_appended THEN
        PERFORM pg_notify('mpstore_queued', '1');
    END IF;
    RETURN 1;
END $$;
"""

#: A span and its heartbeat, if the rollout row is still at ``p_version``: 1 stored, 0 a
#: duplicate (D7: nothing happens), 2 stale (nothing written: the caller reads afresh). It
#: raises for nothing of its own, so that a server may send several spans in one transaction
#: (see .pipeline). Schema 1's ``mpstore_add_span`` raised for a stale row instead; a
#: database migrated from 1 keeps it, unchanged, for the older servers still running on it.
_WRITE_SPAN_FN = """
CREATE FUNCTION mpstore_write_span(p_rid text, p_aid text, p_sid text, p_seq bigint,
        p_size integer, p_span bytea, p_version bigint, p_status text, p_appended boolean,
        p_queued boolean, p_check double precision, p_attempts integer, p_record bytea)
    RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    -- Checked before the row is written: a duplicate (D7) changes nothing at all.
    PERFORM 1 FROM mpstore_spans WHERE rollout_id = p_rid AND attempt_id = p_aid
        AND span_id = p_sid;
    IF FOUND THEN
        RETURN 0;
    END IF;
    UPDATE mpstore_rollouts SET status = p_status, queue_pos = CASE WHEN p_appended
            THEN nextval('mpstore_queue_pos') WHEN p_queued THEN queue_pos END,
        check_at = p_check, attempts = p_attempts, record = p_record,
        span_counter = GREATEST(span_counter, p_seq), version = version + 1,
        finished = CASE WHEN p_status IN ('failed', 'succeeded', 'cancelled') THEN finished END
        WHERE rollout_id = p_rid AND version = p_version;
    IF NOT FOUND THEN
        RETURN 2;  -- written (or deleted) meanwhile: nothing written, the caller reads afresh
    END IF;
    -- Every writer of a rollout's spans holds its row's lock and moves its version, so a
    -- span stored since the check above made the UPDATE find nothing. Should one be there
    -- all the same, the whole transaction is undone rather than keep a heartbeat of it.
    INSERT INTO mpstore_spans (rollout_id, attempt_id, span_id, sequence_id, size, record)
        VALUES (p_rid, p_aid, p_sid, p_seq, p_size, p_span);
    RETURN 1;
END $$;
"""
_WRITE_FNS = (_INSERT_FN + _WRITE_FN).replace("{any_due}", any_due("p_now"))
_CREATE += _WRITE_FNS + _WRITE_SPAN_FN

#: version -> the statements that migrate a database of that version to version + 1.
MIGRATIONS: dict[int, str] = {
    1: _WRITE_SPAN_FN,
    # The same functions with the same results, so servers of schema 2 keep working on a 3.
    2: _WRITE_FNS,
}


def _found(conn: Any) -> tuple[int | None, list[str]]:
    """(the recorded version or None, the mpstore_* tables present)."""
    tables = [row[0] for row in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
        "AND tablename LIKE 'mpstore\\_%'")]
    if "mpstore_schema" not in tables:
        return None, tables
    row = conn.execute("SELECT version FROM mpstore_schema WHERE name = %s",
                       (SCHEMA_NAME,)).fetchone()
    return (None if row is None else int(row[0])), tables


def prepare(conn: Any, *, migrate: bool = False) -> str:
    """Check the schema of the database behind ``conn`` and create or migrate it; returns
    what was done ("created", "migrated from N", "current"). Raises StorageError for a
    newer or foreign schema, or an older one when ``migrate`` is false."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        version, tables = _found(conn)
        if version is None and not tables:
            conn.execute(_CREATE)
            conn.execute("INSERT INTO mpstore_schema VALUES (%s, %s)",
                         (SCHEMA_NAME, SCHEMA_VERSION))
            return "created"
        if version is None:
            raise StorageError(
                f"the database holds tables {sorted(tables)} but no mpstore schema version: "
                "not an mpstore database, or a damaged one (use an empty database)")
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"the database's mpstore schema is version {version}, newer than this "
                f"mpstore's {SCHEMA_VERSION}: upgrade mpstore")
        if version == SCHEMA_VERSION:
            return "current"
        if not migrate:
            raise StorageError(
                f"the database's mpstore schema is version {version}, older than "
                f"{SCHEMA_VERSION}: start with --migrate to migrate it")
        for step in range(version, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[step])
        conn.execute("UPDATE mpstore_schema SET version = %s WHERE name = %s",
                     (SCHEMA_VERSION, SCHEMA_NAME))
        return f"migrated from {version}"
