"""The Hypothesis state machine of tests/test_state_machine.py on the PostgreSQL backend.

Two ``PostgresStore`` s on one database (as two servers would be), with the machine's fake
clock, on a database of their own; a rule switches which one the next steps use, and a
switch must change nothing that can be observed: the state lives in the database only.
Each example starts on an emptied database. Fewer examples than in memory: every step is
a few database round trips.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule

from tests import pg
from tests.conftest import FakeClock
from tests.test_state_machine import StoreMachine


class PostgresStoreMachine(StoreMachine):
    url = ""  # set per test by the fixture below

    def make_store(self, clock: FakeClock) -> Any:
        from mpstore.postgres import PostgresStore

        pg.reset(self.url)
        self.stores = [PostgresStore(self.url, clock=clock, pool_size=2) for _ in range(2)]
        return self.stores[0]

    def queue_order(self) -> list[str] | None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            return [row[0] for row in conn.execute(
                "SELECT rollout_id FROM mpstore_rollouts WHERE queue_pos IS NOT NULL "
                "ORDER BY queue_pos")]

    def snapshot(self) -> Any:
        stats, *rest = super().snapshot()
        stats.pop("watchdog_leader")  # which of the two leads: not part of the state
        return (stats, *rest)

    @rule()
    def switch_server(self) -> None:
        before = self.snapshot()
        self.store = self.stores[1] if self.store is self.stores[0] else self.stores[0]
        assert self.snapshot() == before

    def teardown(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture(autouse=True)
def _database(postgres_server: str, postgres_shared: str) -> Iterator[None]:
    """A database of its own: the shared one has servers whose watchdog runs on the real
    clock, which would judge this machine's fake-clock attempts."""
    with pg.fresh_database(postgres_server) as url:
        PostgresStoreMachine.url = url
        yield


PostgresStoreMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TestPostgresStoreMachine = PostgresStoreMachine.TestCase
