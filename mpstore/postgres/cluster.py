"""A throwaway PostgreSQL cluster on this machine, for tests, benchmarks and trying the
backend out: ``initdb`` + ``pg_ctl`` (the server binaries, found on PATH or under
``/usr/lib/postgresql/*/bin``) in a temp directory, on a free 127.0.0.1 port, trust
authentication (initdb's default: local socket and loopback only; it listens on 127.0.0.1
only), its unix socket in that directory. Run as the ``postgres`` user when this process is
root (PostgreSQL refuses to run as root). :meth:`Cluster.remove` stops it and deletes it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["Cluster", "unavailable"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "pg_ctl").exists() and Path(candidate, "initdb").exists():
            return Path(candidate)
    return None


def unavailable() -> str | None:
    """Why no throwaway cluster can be started here (None: one can)."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg/psycopg-pool are not installed: pip install -e '.[postgres]'"
    if _bindir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


class Cluster:
    """A throwaway PostgreSQL cluster; :attr:`url` is its ``postgres`` database."""

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        bindir = _bindir()
        assert bindir is not None
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="mpstore-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.user = "postgres"
        self._run("initdb", "-D", str(self.data), "-U", self.user, "-A", "trust",
                  "--no-sync", "-E", "UTF8", "--no-instructions")
        self.start()
        self.url = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as, str(self.bindir / tool), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.dir)

    def start(self) -> None:
        # Not durable (tests): crash safety traded for speed. Durable (benchmarks): fsync on,
        # but commits not waited for (synchronous_commit=off: a PostgreSQL crash may lose
        # the last ~0.6 s of commits; a killed mpstore server loses nothing).
        unsafe = "" if self.durable else "-c fsync=off -c full_page_writes=off "
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.dir} {unsafe}"
                   "-c synchronous_commit=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l",
                  str(self.dir / "postgres.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
