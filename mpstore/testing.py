"""A test and example harness: run ``agl store`` in a subprocess and wait until it answers,
for examples, notebooks and tests, which want a real server without a second terminal. Not
used by the store or the transport.

    with start_server() as server:          # a free port, a fresh key in a temporary dir
        store = server.connect()
        ...
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import AuthenticationFailed, ServerStartError, StoreUnavailable
from .manager.auth import resolve_authkey
from .manager.client import StoreClient, connect
from .manager.ports import free_port

__all__ = ["ServerProcess", "start_server", "write_key_file"]

_CONFLICT = "Another process may already be using this port"


def write_key_file(path: str | os.PathLike[str]) -> Path:
    """Write a new random authkey into ``path`` with mode 0600 and return the path."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return path


class ServerProcess:
    """An ``agl store`` subprocess; as a context manager it stops the server on exit."""

    def __init__(self, popen: subprocess.Popen[bytes], host: str, port: int,
                 authkey_file: Path | None, log_path: Path,
                 tempdir: tempfile.TemporaryDirectory[str] | None = None,
                 connect_args: dict[str, Any] | None = None) -> None:
        """``authkey_file=None``: the server resolves its own key; the client side reads it
        from ``MPSTORE_AUTHKEY`` or the default key file, as ``connect()`` does.
        ``connect_args``: what :meth:`connect` passes to ``connect()`` unless told otherwise
        (``tls_ca=...`` for a TLS server, say)."""
        self.popen, self.host, self.port = popen, host, port
        self.connect_args = dict(connect_args or {})
        self.authkey_file, self.log_path = authkey_file, log_path
        self._tempdir = tempdir

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def authkey(self) -> bytes:
        """The server's key. Raises FileNotFoundError while its key file does not exist yet,
        AuthenticationFailed if there is none to find."""
        if self.authkey_file is not None:
            return self.authkey_file.read_bytes().strip()
        try:
            return resolve_authkey(self.host, self.port).key
        except AuthenticationFailed:
            if self.popen.poll() is None:
                raise FileNotFoundError("the server has not written its key file yet") from None
            raise

    def connect(self, **kwargs: Any) -> StoreClient:
        """``connect()`` to this server with its key (keyword arguments are connect's)."""
        return connect(self.address, self.authkey, **{**self.connect_args, **kwargs})

    def log(self) -> str:
        """What the server has logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 20.0, *, ping: bool = True) -> None:
        """Poll ``ping`` until the server answers (``ping=False``: until it logs that it
        listens, for a server no client can pass, e.g. one with an expired certificate).
        Raises ServerStartError (with its log) if the process exits first or ``timeout``
        seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise ServerStartError(
                    f"agl store exited with code {self.popen.returncode}:\n{self.log()}")
            try:
                if not ping:
                    if "Starting server at" not in self.log():
                        raise FileNotFoundError("not listening yet")
                    return
                try:
                    with self.connect(retry_for=0, timeout=2.0) as client:
                        client.ping()
                except AuthenticationFailed:
                    # Before it listens, whatever answers on the port is another process's
                    # server (ours then exits: the port is taken); after, it is a real error.
                    if "Starting server at" in self.log():
                        raise
                    raise FileNotFoundError("another server answers on this port") from None
                return
            except (StoreUnavailable, FileNotFoundError, AuthenticationFailed):
                # No answer, or no key file yet; or the answer of another process's server
                # that took the port first (ours then exits with the conflict, above).
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"agl store did not answer within {timeout:g} s:\n{self.log()}"
                    ) from None
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` (default SIGTERM: a graceful stop) and wait; SIGKILL after
        ``timeout`` seconds. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> int:
        """SIGKILL: the server dies without any cleanup, as in a crash."""
        return self.stop(signal.SIGKILL)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()


def start_server(port: int | None = None, *, host: str = "127.0.0.1",
                 authkey_file: str | os.PathLike[str] | None = None, default_key: bool = False,
                 args: Sequence[str] = (), log_path: str | os.PathLike[str] | None = None,
                 env: dict[str, str] | None = None, ready_timeout: float = 20.0,
                 connect_args: dict[str, Any] | None = None, ping_ready: bool = True
                 ) -> ServerProcess:
    """Start ``python -m mpstore store`` and return once it answers ``ping``.

    ``port=None`` picks a free port (retried if another process takes it first). Without
    ``authkey_file`` a fresh key is written into a temporary directory, removed on exit, and
    so is the log unless ``log_path`` is given; ``default_key=True`` lets the server resolve
    its key itself (MPSTORE_AUTHKEY or its per-host-and-port key file). ``args`` are more
    ``agl store`` options; ``connect_args`` are ``connect()``'s, for reaching it (a TLS
    server's ``tls_ca``, say); ``ping_ready=False`` waits for the log line that says it
    listens instead of a ``ping`` (see :meth:`ServerProcess.wait_ready`). Raises
    ServerStartError (with the server's log) if it does not come up."""
    tempdir = None
    if (authkey_file is None and not default_key) or log_path is None:
        tempdir = tempfile.TemporaryDirectory(prefix="mpstore-")
    key = None
    if not default_key:
        key = Path(authkey_file) if authkey_file else write_key_file(
            Path(tempdir.name) / "authkey")
    log = Path(log_path) if log_path else Path(tempdir.name) / "server.log"
    for attempt in range(5):
        chosen = port if port is not None else free_port(host)
        key_args = ["--authkey-file", str(key)] if key is not None else []
        host_args = ["--host", host] if host != "127.0.0.1" else []  # else: the default
        command = [sys.executable, "-m", "mpstore", "store", *host_args,
                   "--port", str(chosen), *key_args, *args]
        with open(log, "ab") as sink:
            popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink,
                                     stderr=subprocess.STDOUT, env=env)
        server = ServerProcess(popen, host, chosen, key, log, tempdir, connect_args)
        try:
            server.wait_ready(ready_timeout, ping=ping_ready)
            return server
        except ServerStartError as exc:
            server.stop()
            if port is None and _CONFLICT in str(exc) and attempt < 4:
                continue  # someone took the free port between our check and the bind
            if tempdir is not None:
                tempdir.cleanup()
            raise
        except BaseException:  # any other failure to reach it: the process must not outlive us
            server.stop()
            if tempdir is not None:
                tempdir.cleanup()
            raise
    raise AssertionError("unreachable")
