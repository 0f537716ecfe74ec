"""Shared fixtures.

``store`` is the fixture the contract suite runs on: once in process and once through a real
``agl store`` server reached with ``connect()`` (see ``tests/remote.py``). Tests written against
it must only use the public API.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from mpstore import InMemoryStore


class FakeClock:
    """An injectable clock: time moves only when a test says so."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def memory_store(clock: FakeClock) -> InMemoryStore:
    """An in-process store on a fake clock."""
    return InMemoryStore(clock=clock)


STORE_KINDS = ["memory", "remote", "tls", "postgres", "postgres-remote", "postgres-2servers"]


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Certificates for TLS servers and clients, made for this session (tests/certs.py)."""
    from tests.certs import make_tls_files

    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server's admin database for this session (a throwaway cluster,
    or MPSTORE_TEST_POSTGRES_URL), with the template database the tests copy; skips, with
    the reason, where neither can be had. See tests/pg.py."""
    from tests import pg

    reason = pg.unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster, url = pg.cluster_or_reason()
    try:
        yield url
    finally:
        if cluster is not None:
            cluster.remove()


@pytest.fixture(scope="session")
def postgres_shared(postgres_server: str) -> str:
    """The URL of the database the PostgreSQL tests share (emptied before each)."""
    from tests import pg

    return pg.prepare_template(postgres_server)


@pytest.fixture
def postgres_url(postgres_shared: str) -> str:
    """An empty mpstore database for one test (the shared one, emptied)."""
    from tests import pg

    pg.reset(postgres_shared)
    return postgres_shared


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    """The same API in process, over the wire, over the wire through TLS (``agl store
    --tls-cert``), and on PostgreSQL (in process, and through one or two ``agl store
    --backend`` servers); each test gets a fresh, empty store."""
    from tests import remote

    if request.param == "memory":
        yield InMemoryStore()
        return
    if request.param in ("remote", "tls"):
        tls = request.getfixturevalue("tls_files") if request.param == "tls" else None
        with remote.fresh_remote_store(tmp_path, tls=tls) as client:
            yield client
        return
    url = request.getfixturevalue("postgres_url")
    if request.param == "postgres":
        from mpstore.postgres import PostgresStore

        pg_store = PostgresStore(url)
        try:
            yield pg_store
        finally:
            pg_store.close()
        return
    servers = request.getfixturevalue("postgres_servers")
    clients = [server.connect() for server in servers]
    try:
        yield clients[0] if request.param == "postgres-remote" else Alternating(clients)
    finally:
        for client in clients:
            client.close()


def _calls(function: Any, method: str) -> bool:
    """True if the test (or a helper of its module it calls) mentions ``method``."""
    if method in inspect.getsource(function):
        return True
    helpers = (function.__globals__.get(name) for name in function.__code__.co_names)
    return any(inspect.isfunction(h) and method in inspect.getsource(h) for h in helpers)


@pytest.fixture(scope="session")
def postgres_servers(postgres_shared: str, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[list[Any]]:
    """Two ``agl store --backend`` servers on the shared database, for the whole session:
    they keep no state of their own, so emptying the database gives the next test an empty
    store (starting two servers per test would cost seconds each)."""
    from tests import remote

    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(remote.running_server(
            tmp_path_factory.mktemp(f"pg-server-{i}"), "--backend", postgres_shared))
            for i in range(2)]


class Alternating:
    """A client that sends each call to the next of several servers in turn: every read
    on one server must see what the others acknowledged."""

    def __init__(self, clients: list[Any]) -> None:
        self._clients = clients
        self._turn = itertools.count()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clients[next(self._turn) % len(self._clients)], name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Long stress runs only when asked for; CI runs their short versions.
    if os.environ.get("MPSTORE_STRESS") == "1":
        return
    skip = pytest.mark.skip(reason="stress test: set MPSTORE_STRESS=1 to run")
    for item in items:
        if "stress" in item.keywords:
            item.add_marker(skip)
