"""``agl top``: ``--once`` against a real server shows the numbers the test created; the live
view runs in a real terminal (tmux), refreshes in place, says when the server is gone, picks
it up again when it is back, and quits on q."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mpstore import Span, __version__
from mpstore.manager.ports import free_port
from mpstore.testing import ServerProcess
from tests.conftest import FakeClock
from tests.remote import running_server


def top(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpstore", "top", "--port", str(server.port),
         "--authkey-file", str(server.authkey_file), *args],
        capture_output=True, text=True, timeout=60)


def test_once_shows_what_the_test_created(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv, srv.connect() as client:
        for i in range(6):
            client.enqueue_rollout({"i": i})
        a, b, c = (client.dequeue_rollout(worker_id=w) for w in ("runner-a", "runner-b",
                                                                   "runner-c"))
        assert a is not None and b is not None and c is not None
        for seq in (1, 2, 3):
            client.add_span(Span(a.rollout_id, a.attempt.attempt_id, seq, "step"))
        client.update_attempt(a.rollout_id, "latest", status="succeeded")
        for seq in (1, 2):
            client.add_span(Span(b.rollout_id, b.attempt.attempt_id, seq, "step"))
        result = top(srv, "--once", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"queue\s+3 waiting", out), out
    assert "6: 3 queuing, 0 requeuing, 1 preparing, 1 running" in out
    assert re.search(r"finished\s+1 succeeded, 0 failed, 0 cancelled", out), out
    assert re.search(r"attempts\s+3 started · 0 retried · 0 timed out · 0 unresponsive", out)
    assert re.search(r"spans\s+5 held", out)
    assert "1 rollouts finished" not in out  # the finish came before both samples
    runners = {line.split()[0]: line.split()[1:4] for line in out.splitlines()
               if line.strip().startswith("runner-")}
    assert runners == {"runner-b": ["running", b.rollout_id, "#1"],
                       "runner-c": ["preparing", c.rollout_id, "#1"]}
    totals = {line.split()[0]: int(line.split()[4].replace(",", ""))
              for line in out.splitlines()
              if line.split()[:1] and line.split()[0] in ("add_span", "enqueue_rollout",
                                                          "dequeue_rollout", "update_attempt")}
    assert totals == {"add_span": 5, "enqueue_rollout": 6, "dequeue_rollout": 3,
                      "update_attempt": 1}
    assert re.search(r"storage\s+in memory", out)


def test_once_rates_are_over_the_interval(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv, srv.connect() as client:
        claimed = client.start_rollout({"busy": True})
        stop = threading.Event()

        def emit() -> None:
            seq = 0
            while not stop.is_set():
                seq += 1
                client.add_span(Span(claimed.rollout_id, claimed.attempt.attempt_id, seq, "s"))

        emitter = threading.Thread(target=emit, daemon=True)
        emitter.start()
        try:
            result = top(srv, "--once", "--interval", "0.5")
        finally:
            stop.set()
            emitter.join(10)
    assert result.returncode == 0, result.stderr
    spans = re.search(r"([\d,.]+) spans/s", result.stdout)
    calls = re.search(r"([\d,.]+) calls/s", result.stdout)
    assert spans and calls, result.stdout
    assert float(spans.group(1).replace(",", "")) > 0
    assert float(calls.group(1).replace(",", "")) >= float(spans.group(1).replace(",", ""))
    assert re.search(r"latency\s+p50 \d+ µs", result.stdout), result.stdout


def test_once_without_a_server_says_so(tmp_path: Path) -> None:
    port = free_port()
    key = tmp_path / "key"
    key.write_text("k" * 32)
    key.chmod(0o600)
    result = subprocess.run(
        [sys.executable, "-m", "mpstore", "top", "--once", "--port", str(port),
         "--authkey-file", str(key), "--timeout", "2"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"server unreachable at 127.0.0.1:{port}" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# ------------------------------------------------------------------ the live view
class Terminal:
    """A tmux server of its own (``-L``), one 120x45 window running ``command``, with its
    stderr in ``err``."""

    def __init__(self, command: str, err: Path) -> None:
        self.socket = f"mpstore-test-{uuid.uuid4().hex[:8]}"
        self.err = err
        # The exit status goes to a file: tmux's pane_dead_status was seen empty for a pane
        # that had exited (tmux 3.3, under load).
        self.status = err.with_name(err.name + ".status")
        # pytest exports COLUMNS=80 and LINES=24, which rich would trust over the terminal.
        command = (f"env -u COLUMNS -u LINES PYTHONFAULTHANDLER=1 {command} 2> {err}; "
                   f"echo $? > {self.status}")
        self._tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "45", command,
                   ";", "set-option", "-t", "top", "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, check=True, timeout=30).stdout

    def err_log(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "top")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "top", *keys)

    def exit_status(self, timeout: float = 20.0) -> int:
        """The command's exit status, once it has exited."""
        deadline = time.monotonic() + timeout
        while True:
            written = self.status.read_text().strip() if self.status.exists() else ""
            if written:
                return int(written)  # as the shell reports it (128 + n: killed by signal n)
            dead, status, signal_, pid = self._tmux(
                "list-panes", "-t", "top", "-F",
                "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}:#{pane_pid}",
            ).strip().split(":")
            if time.monotonic() >= deadline:
                self._fail(f"still running (pane {dead}:{status}:{signal_})", int(pid))
            time.sleep(0.05)

    def _fail(self, what: str, pid: int) -> None:
        """Fail with the screen and, from PYTHONFAULTHANDLER, where the process is stuck."""
        screen = self.screen()
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGABRT)  # faulthandler dumps every thread's stack to stderr
        time.sleep(1.0)  # only on the way to a failure: let the dump be written
        raise AssertionError(f"{what}:\n{screen}\nstderr:\n{self.err_log()}")

    def wait_for(self, condition: Callable[[str], bool], what: str, timeout: float = 20.0
                 ) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if condition(screen):
                return screen
            assert time.monotonic() < deadline, (
                f"no {what} on the screen:\n{screen}\nstderr:\n{self.err_log()}")
            time.sleep(0.05)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=30)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Callable[[str], Terminal]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (.ci/setup.d/40-top.sh installs it)")
    opened: list[Terminal] = []

    def open_terminal(command: str) -> Terminal:
        opened.append(Terminal(command, tmp_path / f"stderr-{len(opened)}.log"))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()


def test_live_view_refreshes_survives_the_server_and_quits_on_q(
        tmp_path: Path, terminal: Callable[[str], Terminal]) -> None:
    with running_server(tmp_path) as srv:
        port = srv.port
        command = (f"{sys.executable} -m mpstore top --port {port} --authkey-file "
                   f"{srv.authkey_file} --interval 0.2 --timeout 2")
        term = terminal(command)
        first = term.wait_for(lambda s: re.search(r"queue\s+0 waiting", s) is not None,
                              "first frame")
        assert first.count(f"mpstore {__version__} at") == 1
        with srv.connect() as client:
            for i in range(4):
                client.enqueue_rollout({"i": i})
        screen = term.wait_for(lambda s: re.search(r"queue\s+4 waiting", s) is not None,
                               "the new queue length")
        assert screen.count(f"mpstore {__version__} at") == 1  # redrawn in place, not appended
        assert "4: 4 queuing" in screen
        with srv.connect() as client:  # a runner claims one, is seen, then finishes it
            claimed = client.dequeue_rollout(worker_id="runner-x")
            assert claimed is not None
            term.wait_for(lambda s: re.search(r"runner-x\s+preparing\s+" + claimed.rollout_id,
                                              s) is not None, "the runner at work")
            client.update_attempt(claimed.rollout_id, "latest", status="succeeded")
            term.wait_for(lambda s: re.search(r"runner-x\s+idle\s+\(last: "
                                              + claimed.rollout_id, s) is not None,
                          "the runner idle")
    gone = term.wait_for(lambda s: "server unreachable, retrying" in s, "the outage")
    assert "Traceback" not in gone
    with running_server(tmp_path, port=port):  # back on the same port, same key
        back = term.wait_for(lambda s: re.search(r"queue\s+0 waiting", s) is not None,
                             "the restarted server")
        assert "server unreachable" not in back
        term.keys("q")
        assert term.exit_status() == 0
    assert term.err_log() == ""


def test_live_view_quits_on_ctrl_c(tmp_path: Path,
                                   terminal: Callable[[str], Terminal]) -> None:
    with running_server(tmp_path) as srv:
        command = (f"{sys.executable} -m mpstore top --port {srv.port} --authkey-file "
                   f"{srv.authkey_file} --interval 0.2")
        term = terminal(command)
        term.wait_for(lambda s: "waiting" in s, "first frame")
        term.keys("C-c")
        assert term.exit_status() == 0
    assert term.err_log() == ""  # no traceback, no KeyboardInterrupt


# ------------------------------------------------------------------ the frame itself
def test_a_frame_fits_the_terminal_and_says_what_it_left_out() -> None:
    import io

    from rich.console import Console

    from mpstore import InMemoryStore
    from mpstore.accounting import LATENCY_BUCKETS, CallStats
    from mpstore.top import Sample, frame

    store = InMemoryStore(clock=FakeClock())  # all heard at once: listed in creation order
    for i in range(40):
        store.start_rollout({"i": i}, worker_id=f"runner-{i}")
    calls = CallStats(f"method_{i}" for i in range(25))
    for i in range(25):
        calls.record(f"method_{i}", 0, 20e-6)
    stats = {**store.statistics(), "server": {
        "connections": 1, "connections_accepted": 1, "connections_refused": {},
        "calls": calls.snapshot(), "latency_bounds": list(LATENCY_BUCKETS),
        "process": {"rss_bytes": 1, "cpu_seconds": 0.0, "threads": 1}}}
    for height, shown in ((30, False), (200, True)):
        out = io.StringIO()
        console = Console(file=out, width=120, height=height, color_system=None)
        console.print(frame("127.0.0.1:1", Sample(stats, {"version": "x", "pid": 1}), None,
                            1.0, height=height))
        lines = out.getvalue().splitlines()
        assert len(lines) <= height
        assert ("runner-39" in out.getvalue()) is shown  # the last of each table
        assert ("method_9 " in out.getvalue()) is shown
        assert ("more" in out.getvalue()) is not shown
