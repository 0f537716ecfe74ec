"""A data directory whose file system is full (SPEC §9, D1): a refused write changes nothing,
in memory as on disk, reads keep working, and writes resume once there is room again.

The full disk is real: a small tmpfs mounted for the test (root only; CI runs as root).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mpstore.durable
from mpstore import InMemoryStore, Span, StorageError
from tests.remote import running_server

BIG = "x" * 60_000  # a rollout input that needs pages the full disk does not have


@contextlib.contextmanager
def small_disk(path: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Take all but about ``leave`` bytes of ``disk`` with a filler file."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as out:
        out.write(b"\0" * max(free - leave, 0))
    return filler


def enqueue_until_full(store: Any) -> list[str]:
    """Enqueue big rollouts until one is refused with StorageError; the acknowledged ids."""
    acknowledged = []
    for n in range(200):  # bounded: the disk is a few hundred KB
        try:
            acknowledged.append(store.enqueue_rollout({"n": n, "blob": BIG}).rollout_id)
        except StorageError:
            return acknowledged
    raise AssertionError("the disk never filled up")


def visible(store: Any) -> tuple[list[str], int, int]:
    stats = store.statistics()
    ids = [r.rollout_id for r in store.query_rollouts()]
    return ids, stats["total_rollouts"], stats["queue_length"]


def test_refused_write_changes_nothing_in_memory(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Read-only for the whole test (raising=False: the test also runs against older code).
    monkeypatch.setattr(mpstore.durable, "RETRY_AFTER", 3600.0, raising=False)
    with small_disk(tmp_path / "disk") as disk:
        store = InMemoryStore(data_dir=disk / "data")
        try:
            kept = store.start_rollout("kept")
            store.add_span(Span(kept.rollout_id, kept.attempt.attempt_id, 1, "s"))
            fill(disk, leave=200_000)
            acknowledged = [kept.rollout_id, *enqueue_until_full(store)]
            # What readers see is exactly what was acknowledged: the refused rollout is not
            # there, in any index.
            assert visible(store) == (acknowledged, len(acknowledged), len(acknowledged) - 1)
            assert [s.name for s in store.query_spans(kept.rollout_id)] == ["s"]
            # Read-only until the retry time: writes are refused at once, reads go on.
            storage = store.statistics()["storage"]
            assert storage["writable"] is False and "full" in storage["last_error"]
            assert store.ping()["writable"] is False
            with pytest.raises(StorageError, match="refused"):
                store.update_attempt(kept.rollout_id, "latest", status="succeeded")
            with pytest.raises(StorageError, match="refused"):
                store.get_next_span_sequence_id(kept.rollout_id, "latest")
            assert store.get_latest_attempt(kept.rollout_id).status == "running"  # type: ignore[union-attr]
            assert visible(store)[0] == acknowledged
        finally:
            with contextlib.suppress(StorageError):
                store.close()
        reopened = InMemoryStore(data_dir=disk / "data")
        assert visible(reopened)[0] == acknowledged
        reopened.close()


def test_writes_resume_when_there_is_room_again(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpstore.durable, "RETRY_AFTER", 0.0, raising=False)  # retry at once
    with small_disk(tmp_path / "disk") as disk:
        store = InMemoryStore(data_dir=disk / "data")
        filler = fill(disk, leave=200_000)
        acknowledged = enqueue_until_full(store)
        assert store.statistics()["storage"]["consecutive_failures"] == 1
        filler.unlink()
        more = store.enqueue_rollout({"after": "room"})
        storage = store.statistics()["storage"]
        assert storage["writable"] is True and storage["last_error"] is None
        assert visible(store)[0] == [*acknowledged, more.rollout_id]
        store.close()
        reopened = InMemoryStore(data_dir=disk / "data")
        assert visible(reopened)[0] == [*acknowledged, more.rollout_id]
        reopened.close()


def _health(server: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpstore", "health", "--port", str(server.port),
         "--authkey-file", str(server.authkey_file)],
        capture_output=True, text=True, timeout=30,
    )


def test_full_disk_through_a_server(tmp_path: Path) -> None:
    """The same through ``agl store --data-dir``: the refused rollout is invisible to every
    client, ``agl health`` says the store is read-only (exit 3), and the state after a
    restart is what was acknowledged."""
    with small_disk(tmp_path / "disk") as disk:
        data = str(disk / "data")
        with running_server(tmp_path, "--data-dir", data) as server:
            store = server.connect()
            store.enqueue_rollout("first")
            filler = fill(disk, leave=200_000)
            acknowledged = [r.rollout_id for r in store.query_rollouts()]
            acknowledged += enqueue_until_full(store)
            other = server.connect()  # another client sees the same
            assert visible(other) == (acknowledged, len(acknowledged), len(acknowledged))
            health = _health(server)
            if health.returncode == 0:  # the retry time passed meanwhile: writable again
                assert "writable" in health.stdout
            else:
                assert health.returncode == 3, health.stdout + health.stderr
                assert "read-only" in health.stdout + health.stderr
            filler.unlink()
            deadline = time.monotonic() + 30
            while True:  # the server retries the disk on its own schedule (RETRY_AFTER)
                try:
                    later = store.enqueue_rollout("after")
                    break
                except StorageError:
                    assert time.monotonic() < deadline, "writes never resumed"
                    time.sleep(0.1)  # waiting for the server's retry time, not for a result
            acknowledged.append(later.rollout_id)
            store.close()
            other.close()
        with running_server(tmp_path, "--data-dir", data) as server, server.connect() as store:
            assert visible(store)[0] == acknowledged
