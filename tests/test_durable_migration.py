"""The on-disk schema (mpstore.schema): explicit layouts, and older databases migrated.

``tests/data/v1/`` was written by mpstore at 278f169 (schema version 1, records pickled as
objects) and ``tests/data/v1.json`` is what its public API read back then
(tests/data/make_v1_database.py made both). ``tests/data/v4/`` and ``v4.json`` likewise, by
5c04481 (schema version 4: a row per span, and commits still in the log file;
tests/data/make_v4_database.py).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from mpstore import InMemoryStore, StorageError
from mpstore.compactor import LOG_NAME
from mpstore.durable import DB_NAME, SCHEMA_VERSION
from mpstore.schema import CLASSES, LAYOUTS
from tests.conftest import FakeClock
from tests.data.make_v1_database import public

DATA = Path(__file__).parent / "data"


def test_layouts_name_every_field_of_their_records() -> None:
    for kind, cls in CLASSES.items():
        assert LAYOUTS[kind] == tuple(f.name for f in dataclasses.fields(cls)), kind


def copy_v1(tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(DATA / "v1", target)
    return target


def open_v1(data_dir: Path) -> InMemoryStore:
    # At the time the database was written: its running attempt is not timed out yet.
    return InMemoryStore(data_dir=data_dir, eviction_threshold=20_000, safe_threshold=12_000,
                         clock=FakeClock(1_700_000_001.0))


def comparable(seen: dict) -> dict:
    seen = json.loads(json.dumps(seen))  # the same JSON shapes as the file
    # The keys version 1 reported (later versions report more), less this machine's RAM.
    old = json.loads((DATA / "v1.json").read_text())["statistics"]
    seen["statistics"] = {k: v for k, v in seen["statistics"].items()
                          if k in old and k != "memory_capacity_bytes"}
    return seen


def test_a_version_1_database_opens_with_everything_in_it(tmp_path: Path) -> None:
    data_dir = copy_v1(tmp_path)
    expected = json.loads((DATA / "v1.json").read_text())
    handed_out = expected.pop("handed_out")
    expected["statistics"].pop("memory_capacity_bytes")
    store = open_v1(data_dir)
    assert comparable(public(store)) == expected
    # The counter goes on past every id handed out and every span's sequence id.
    for rid, last in handed_out.items():
        top = max([last, *(s["sequence_id"] for s in expected["spans"][rid])])
        assert store.get_next_span_sequence_id(rid, "latest") > top
    store.close()
    with closing(sqlite3.connect(data_dir / DB_NAME)) as db, db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    again = open_v1(data_dir)  # migrated once; now it is a current database
    assert comparable(public(again))["rollouts"] == expected["rollouts"]
    again.close()


def open_v4(tmp_path: Path, log: bool = True) -> tuple[Path, InMemoryStore]:
    data_dir = tmp_path / "data"
    shutil.copytree(DATA / "v4", data_dir)
    if not log:
        (data_dir / LOG_NAME).unlink()
    return data_dir, InMemoryStore(data_dir=data_dir, eviction_threshold=20_000,
                                   safe_threshold=12_000, clock=FakeClock(1_700_000_001.0))


#: What statistics() says of the records (not of this machine, the run or its commits; nor
#: of workers, which a restart does not keep: README, "Workers are not kept").
_COUNTS = ("attempts_in_flight", "evicted_rollouts", "queue_length", "runners", "span_bytes",
           "total_attempts", "total_resources", "total_rollouts", "total_spans")


def _records(seen: dict) -> dict:
    seen = json.loads(json.dumps(seen))
    seen["statistics"] = {k: seen["statistics"][k] for k in _COUNTS}
    return seen


def test_a_version_4_directory_opens_with_its_log_applied(tmp_path: Path) -> None:
    expected = _records(json.loads((DATA / "v4.json").read_text()))
    data_dir, store = open_v4(tmp_path)
    assert _records(public(store)) == expected  # the database's spans and the log's
    store.close()
    with closing(sqlite3.connect(data_dir / DB_NAME)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        chunks = db.execute("SELECT rollout_id, records FROM spans ORDER BY id").fetchall()
    # The three compacted spans of version 4 became one chunk; the log's spans, theirs.
    sizes = [len(pickle.loads(records)) for _, records in chunks]
    assert sizes[0] == 3 and sum(sizes) == 6
    again = InMemoryStore(data_dir=data_dir, eviction_threshold=20_000, safe_threshold=12_000,
                          clock=FakeClock(1_700_000_001.0))  # now a current database
    assert _records(public(again)) == expected
    again.close()


def test_a_version_3_database_opens_and_is_migrated(tmp_path: Path) -> None:
    """Version 3 had no log: version 4's database less its log and compacted ticket."""
    data_dir = tmp_path / "data"
    shutil.copytree(DATA / "v4", data_dir)
    (data_dir / LOG_NAME).unlink()
    with closing(sqlite3.connect(data_dir / DB_NAME)) as db, db:
        db.execute("DELETE FROM meta WHERE key = 'compacted_ticket'")
        db.execute("PRAGMA user_version=3")
    store = InMemoryStore(data_dir=data_dir)
    (rollout,) = store.query_rollouts()
    assert rollout.input == "compacted one" and rollout.status == "succeeded"
    assert [s.name for s in store.query_spans(rollout.rollout_id)] == [
        "early-1", "early-2", "early-3"]
    store.close()
    with closing(sqlite3.connect(data_dir / DB_NAME)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    data_dir = copy_v1(tmp_path)
    with closing(sqlite3.connect(data_dir / DB_NAME)) as db, db:  # one record no version can read
        db.execute("UPDATE resources SET record = x'00' WHERE resources_id = 'rs-fixed'")
    before = _rows(data_dir)
    with pytest.raises(StorageError, match="damaged"):
        open_v1(data_dir)
    with closing(sqlite3.connect(data_dir / DB_NAME)) as db, db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    # Every row as it was. (Not the file's bytes: closing may checkpoint the write-ahead
    # log, which some SQLite versions do by rewriting pages with what they held.)
    assert _rows(data_dir) == before


def _rows(data_dir: Path) -> dict[str, list[tuple[object, ...]]]:
    with closing(sqlite3.connect(data_dir / DB_NAME)) as db, db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    InMemoryStore(data_dir=tmp_path).close()
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as db, db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StorageError, match="upgrade mpstore"):
        InMemoryStore(data_dir=tmp_path)


def test_a_field_this_version_does_not_know_is_refused(tmp_path: Path) -> None:
    store = InMemoryStore(data_dir=tmp_path)
    store.enqueue_rollout("a")
    store.close()
    layouts = {**LAYOUTS, "rollout": (*LAYOUTS["rollout"], "priority")}
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as db, db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'layouts'", (json.dumps(layouts),))
    with pytest.raises(StorageError, match="priority"):
        InMemoryStore(data_dir=tmp_path)


def test_a_field_the_database_lacks_takes_its_default(tmp_path: Path) -> None:
    """What adding a field to a record costs: nothing, for databases written before it."""
    store = InMemoryStore(data_dir=tmp_path)
    rid = store.start_rollout("a", worker_id="w").rollout_id
    store.close()
    older = {**LAYOUTS, "attempt": tuple(n for n in LAYOUTS["attempt"] if n != "worker_id")}
    index = LAYOUTS["attempt"].index("worker_id")
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as db, db:
        (record,) = db.execute("SELECT record FROM rollouts").fetchone()
        rollout, attempts = pickle.loads(record)
        attempts = [a[:index] + a[index + 1:] for a in attempts]
        db.execute("UPDATE rollouts SET record = ?", (pickle.dumps((rollout, attempts)),))
        db.execute("UPDATE meta SET value = ? WHERE key = 'layouts'", (json.dumps(older),))
    reopened = InMemoryStore(data_dir=tmp_path)
    attempt = reopened.get_latest_attempt(rid)
    assert attempt is not None and attempt.worker_id is None and attempt.sequence_id == 1
    reopened.close()
