"""A real PostgreSQL for the tests of the PostgreSQL backend.

:func:`cluster_or_reason` gives the URL of a server's ``postgres`` database, once per test
session:

* ``MPSTORE_TEST_POSTGRES_URL`` set: that server (it must let this user create databases);
* else a throwaway cluster (:mod:`mpstore.postgres.cluster`: ``initdb`` + ``pg_ctl`` of
  PostgreSQL 15 in a temp directory, on a free 127.0.0.1 port, trust authentication on
  loopback only, run as the ``postgres`` user when the tests run as root), stopped and
  removed at the end of the session;
* neither possible: the tests that need it skip, saying why.

:func:`reset` empties the one database the tests share before each test (a TRUNCATE:
milliseconds, where a database per test cost 0.3-3 s on a loaded machine);
:func:`fresh_database` makes a database of its own, copied from a template that already holds
the schema, for the tests that need one (several stores, schema checks).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["cluster_or_reason", "fresh_database", "prepare_template", "reset", "two_keys",
           "unavailable", "with_database"]

ENV_URL = "MPSTORE_TEST_POSTGRES_URL"
TEMPLATE = "mpstore_template"
_names = itertools.count(1)


def unavailable() -> str | None:
    """Why the PostgreSQL tests cannot run here (None: they can)."""
    try:
        from mpstore.postgres import cluster
    except ImportError:
        return "psycopg/psycopg-pool are not installed: pip install -e '.[postgres]'"
    if os.environ.get(ENV_URL):
        return None
    reason = cluster.unavailable()
    return None if reason is None else f"{reason}, and no {ENV_URL}"


def cluster_or_reason() -> tuple[Any, str]:
    """A started throwaway cluster and its URL, or (None, MPSTORE_TEST_POSTGRES_URL)."""
    url = os.environ.get(ENV_URL)
    if url:
        return None, url
    from mpstore.postgres.cluster import Cluster

    cluster = Cluster()
    return cluster, cluster.url


def _admin(url: str):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(url, autocommit=True)


def prepare_template(url: str) -> str:
    """(Re)create the template database holding the current schema, and the database most
    tests share (emptied before each: :func:`reset`); returns the latter's URL."""
    from mpstore.postgres import PostgresStore

    shared = f"mpstore_shared_{os.getpid()}"
    with _admin(url) as conn:
        for name in (TEMPLATE, shared):
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
    for name in (TEMPLATE, shared):
        PostgresStore(with_database(url, name)).close()
    return with_database(url, shared)


def with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + name
    return base + ("?" + query if query else "")


def reset(url: str) -> None:
    """Empty every mpstore table of the database at ``url`` (a new test's store)."""
    with _admin(url) as conn:
        conn.execute("TRUNCATE mpstore_rollouts, mpstore_spans, mpstore_counters, "
                     "mpstore_resources, mpstore_workers RESTART IDENTITY")
        conn.execute("ALTER SEQUENCE mpstore_queue_pos RESTART")
        conn.execute("ALTER SEQUENCE mpstore_finish_seq RESTART")


@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """The URL of a new database with the current schema, dropped afterwards."""
    name = f"mpstore_test_{os.getpid()}_{next(_names)}"
    with _admin(url) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
    try:
        yield with_database(url, name)
    finally:
        with _admin(url) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def two_keys(tmp_path: Path) -> None:
    """Directories ``a`` and ``b`` for two servers on one database, with one key between
    them (a client of several servers has one)."""
    from mpstore.testing import write_key_file

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    write_key_file(tmp_path / "a" / "authkey")
    shutil.copy(tmp_path / "a" / "authkey", tmp_path / "b" / "authkey")
