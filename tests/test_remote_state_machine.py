"""The Hypothesis state machine of tests/test_state_machine.py, through the manager.

Every step goes over the wire to the real server code (``mpstore.manager.server.serve``) in a
child process, whose store reads its time from a shared double that the machine advances
(:class:`tests.remote.ClockedServer`), so end times and timeouts are exact, as in process.
The queue order is not visible remotely; the dequeue rule still checks the head.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

from tests.conftest import FakeClock
from tests.remote import ClockedServer, ValueClock
from tests.test_state_machine import StoreMachine


class RemoteStoreMachine(StoreMachine):
    def make_store(self, clock: FakeClock) -> Any:
        self._tmp = tempfile.TemporaryDirectory(prefix="mpstore-sm-")
        self.server = ClockedServer(Path(self._tmp.name), ValueClock(clock.now))
        self.clock = self.server.clock  # the machine advances the server's clock from now on
        return self.server.client

    def queue_order(self) -> list[str] | None:
        return None

    def teardown(self) -> None:
        try:
            assert self.server.stop() == 0
        finally:
            self._tmp.cleanup()


RemoteStoreMachine.TestCase.settings = settings(
    max_examples=100,  # each example starts a server: ~15 ms with forkserver
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRemoteStoreMachine = RemoteStoreMachine.TestCase
