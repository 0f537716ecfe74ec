"""Shared fixtures.

``store`` is the fixture the contract suite runs on: once in process and once through a real
``agl store`` server reached with ``connect()`` (see ``tests/remote.py``). Tests written against
it must only use the public API.
"""

from __future__ import annotations

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


STORE_KINDS = ["memory", "remote", "tls"]


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Certificates for TLS servers and clients, made for this session (tests/certs.py)."""
    from tests.certs import make_tls_files

    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    """The same API in process, over the wire, and over the wire through TLS
    (``agl store --tls-cert``); each test gets a fresh, empty store."""
    if request.param == "memory":
        yield InMemoryStore()
        return
    from tests import remote

    tls = request.getfixturevalue("tls_files") if request.param == "tls" else None
    with remote.fresh_remote_store(tmp_path, tls=tls) as client:
        yield client


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Long stress runs only when asked for; CI runs their short versions.
    if os.environ.get("MPSTORE_STRESS") == "1":
        return
    skip = pytest.mark.skip(reason="stress test: set MPSTORE_STRESS=1 to run")
    for item in items:
        if "stress" in item.keywords:
            item.add_marker(skip)
