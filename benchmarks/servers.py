"""The servers under test, each a subprocess with a log file, a readiness check and a PID
to measure (RSS, threads) and to point a profiler at."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from .common import HOST, free_port, wait_until, write_keyfile

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class ServerFailed(RuntimeError):
    """A server exited or never became ready; the message carries its log's tail."""


class Server:
    """One server subprocess: ``start()`` waits until ``ready()`` answers, ``stop()`` sends
    SIGTERM then SIGKILL after a deadline."""

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 ready: Callable[[], Any], target: dict[str, Any]) -> None:
        self.name = name
        self.env = _child_env()
        self.argv = argv
        self.log_path = log_path
        self.ready = ready
        #: what a client needs: kind, address, authkey (and more for some kinds)
        self.target = target
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = float("nan")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def start(self, timeout: float = START_TIMEOUT) -> Server:
        """Launch and poll ``ready`` until it answers or ``timeout`` passes."""
        began = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env)

        def check() -> Any:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            return self.ready()

        try:
            wait_until(check, timeout, interval=0.05, what=f"{self.name} ready")
        except TimeoutError as exc:
            cause = exc.__cause__
            self.stop()
            if isinstance(cause, ServerFailed):
                raise cause from None
            raise ServerFailed(f"{self.name} not ready in {timeout}s ({cause!r}):\n"
                               + self.log_tail()) from exc
        self.start_seconds = time.perf_counter() - began
        return self

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def threads(self) -> int:
        """Number of OS threads of the server process."""
        return int(psutil.Process(self.pid).num_threads())

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def ctx_switches(self) -> int | None:
        """Voluntary + involuntary context switches of the server's live threads so far
        (Linux ``/proc/PID/task/*/status``; psutil counts the main thread only); None
        elsewhere."""
        total = 0
        tasks = Path(f"/proc/{self.pid}/task")
        if not tasks.is_dir():
            return None
        for status in tasks.glob("*/status"):
            try:
                lines = status.read_text().splitlines()
            except OSError:  # the thread ended meanwhile
                continue
            total += sum(int(line.split()[1]) for line in lines
                         if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))
        return total

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(STOP_TIMEOUT)


def _child_env() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH, so ``-m benchmarks...``
    resolves wherever the harness was started from."""
    root = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    # MPSTORE_* settings of the caller's shell (a key, a host) must not override ours.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPSTORE_")}
    return {**env, "PYTHONPATH": root + (os.pathsep + rest if rest else "")}


def _port_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False  # unreachable; for type checkers


def _store_ready(address: str, authkey: bytes) -> Callable[[], Any]:
    def ready() -> Any:
        _port_open(int(address.rsplit(":", 1)[1]))
        from mpstore import connect  # type: ignore[attr-defined]

        client = connect(address, authkey=authkey)
        try:
            return client.ping()
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()

    return ready


#: ``--log-level`` of the store servers (``run.py --server-log-level``)
STORE_LOG_LEVEL = ["warning"]


def store_server(workdir: Path, name: str = "store", extra: list[str] | None = None) -> Server:
    """``python -m mpstore store --port P --authkey-file F [extra]`` (not started yet)."""
    port = free_port()
    keyfile, key = write_keyfile(workdir, f"{name}.key")
    argv = [sys.executable, "-m", "mpstore", "store", "--host", HOST, "--port", str(port),
            "--authkey-file", str(keyfile), "--log-level", STORE_LOG_LEVEL[0], *(extra or [])]
    address = f"{HOST}:{port}"
    target = {"kind": "store", "address": address, "authkey": key}
    return Server(name, argv, workdir / f"{name}.log", _store_ready(address, key), target)


def echo_server(workdir: Path, kind: str) -> Server:
    """``python -m benchmarks.limits {raw,manager}`` (not started yet)."""
    from .limits import PAYLOAD, close_handle, open_manager, open_raw

    port = free_port()
    keyfile, key = write_keyfile(workdir, f"{kind}.key")
    argv = [sys.executable, "-m", "benchmarks.limits", kind, "--host", HOST, "--port",
            str(port), "--authkey-file", str(keyfile)]
    address = (HOST, port)
    opener = open_raw if kind == "raw" else open_manager

    def ready() -> bool:
        _port_open(port)
        call, handle = opener(address, key)
        try:
            return bool(call(PAYLOAD) == PAYLOAD)
        finally:
            close_handle(handle)

    target = {"kind": kind, "address": address, "authkey": key}
    return Server(f"{kind}-echo", argv, workdir / f"{kind}-echo.log", ready, target)


def store_help() -> str:
    """``python -m mpstore store --help`` output ('' if the command fails)."""
    try:
        out = subprocess.run([sys.executable, "-m", "mpstore", "store", "--help"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr


@contextlib.contextmanager
def running(server: Server, timeout: float = START_TIMEOUT) -> Iterator[Server]:
    """Start ``server``, yield it, always stop it."""
    try:
        server.start(timeout)
        yield server
    finally:
        server.stop()
