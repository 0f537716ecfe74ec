"""Authkey resolution, shared by the server and ``connect()`` (SPEC §5).

The manager's wire format is pickle, so the key is what stands between a peer and running code
in the server: it is never optional. Both sides resolve it in the same order:

1. an explicit ``authkey`` argument (bytes or str);
2. the ``MPSTORE_AUTHKEY`` environment variable;
3. an explicit key file (``--authkey-file`` / ``authkey_file=``), which must exist;
4. the key file of that host and port: ``$XDG_RUNTIME_DIR/mpstore/`` or else ``~/.mpstore/``,
   named ``authkey-HOST-PORT``, mode 0600 in a 0700 directory. A server that finds none
   generates one (once: a restarted server reuses it, so clients reconnect); a client on the
   same machine reads it.

Loopback names (``localhost``, ``127.x.y.z``, ``::1``) share the file of ``127.0.0.1``, and a
client that finds no file for its host falls back to the one of a server bound to ``0.0.0.0``
on that port, so ``connect("localhost:4747")`` finds the key of ``agl store --host 0.0.0.0``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import AuthenticationFailed

__all__ = [
    "ENV_AUTHKEY",
    "Authkey",
    "default_key_dir",
    "default_key_file",
    "is_loopback",
    "resolve_authkey",
]

ENV_AUTHKEY = "MPSTORE_AUTHKEY"
_WILDCARDS = ("0.0.0.0", "::", "")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Authkey:
    """A resolved key and where it came from (for log lines; the key itself is never logged)."""

    key: bytes
    source: str

    def __repr__(self) -> str:  # keep the secret out of reprs and tracebacks
        return f"Authkey(source={self.source!r})"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback ranges 127.0.0.0/8 and ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_key_dir() -> Path:
    """``$XDG_RUNTIME_DIR/mpstore`` (a per-user tmpfs on most Linux systems) or ``~/.mpstore``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "mpstore"
    return Path.home() / ".mpstore"


def _file_host(host: str) -> str:
    if is_loopback(host):
        return "127.0.0.1"
    if host in _WILDCARDS:
        return "0.0.0.0"
    return host.replace(":", "_").replace("/", "_")  # IPv6 literals make valid file names


def default_key_file(host: str, port: int) -> Path:
    """The per-host-and-port key file (loopback names share 127.0.0.1's)."""
    return default_key_dir() / f"authkey-{_file_host(host)}-{int(port)}"


def _as_bytes(key: bytes | str, source: str) -> bytes:
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not data:
        raise AuthenticationFailed(f"the authkey from {source} is empty")
    return data


def _read_key_file(path: Path) -> bytes:
    """The key stored in ``path`` (surrounding whitespace stripped, so ``echo KEY > F`` works).

    Raises AuthenticationFailed if the file is missing, unreadable or empty."""
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        raise AuthenticationFailed(f"authkey file {path} does not exist") from None
    except OSError as exc:
        raise AuthenticationFailed(f"cannot read authkey file {path}: {exc.strerror}") from None
    if not data:
        raise AuthenticationFailed(f"authkey file {path} is empty")
    mode = path.stat().st_mode & 0o077
    if mode:  # like ssh: a key others can read protects nothing
        log.warning("authkey file %s is readable by group or others (mode %o); chmod 600 it",
                    path, path.stat().st_mode & 0o777)
    _check_owner_and_directory(path)
    return data


def _check_owner_and_directory(path: Path) -> None:
    """Warn when someone else could have written the key: a file owned by another user, or
    in a directory others may write to (they could plant a key they know)."""
    try:
        owner, folder = path.stat().st_uid, path.parent.stat()
    except OSError:
        return
    if hasattr(os, "geteuid") and owner != os.geteuid():
        log.warning("authkey file %s belongs to another user (uid %d); whoever wrote it "
                    "knows the key", path, owner)
    if folder.st_mode & 0o022 and not folder.st_mode & 0o1000:
        log.warning("authkey file %s is in a directory writable by group or others (mode %o):"
                    " they could replace the key; chmod 700 %s", path,
                    folder.st_mode & 0o777, path.parent)


def _create_key_file(path: Path) -> bytes:
    """Write a new random key into ``path`` (0600, directory 0700), unless another process
    won the race, in which case its key is used. Raises AuthenticationFailed on I/O errors."""
    key = secrets.token_hex(32).encode("ascii")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: two servers starting at once must not overwrite each other's key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path)
    except OSError as exc:
        raise AuthenticationFailed(f"cannot create authkey file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(key + b"\n")
    log.info("Generated a new authkey in %s", path)
    _check_owner_and_directory(path)
    return key


def resolve_authkey(host: str, port: int, authkey: bytes | str | None = None,
                    authkey_file: str | os.PathLike[str] | None = None, *,
                    create: bool = False) -> Authkey:
    """The key for a server on ``host:port``, resolved in the documented order.

    ``create=True`` (the server) generates the default key file when it does not exist.
    Raises AuthenticationFailed when no key can be found (the message names the file looked
    for and how else to give a key) or a key file cannot be read or created.
    """
    if authkey is not None:
        return Authkey(_as_bytes(authkey, "the authkey argument"), "argument")
    env = os.environ.get(ENV_AUTHKEY)
    if env:
        return Authkey(_as_bytes(env, ENV_AUTHKEY), ENV_AUTHKEY)
    if authkey_file is not None:
        path = Path(authkey_file).expanduser().absolute()
        return Authkey(_read_key_file(path), f"file {path}")
    path = default_key_file(host, port)
    if create:
        if path.exists():
            return Authkey(_read_key_file(path), f"file {path}")
        return Authkey(_create_key_file(path), f"file {path}")
    candidates = [path]
    if _file_host(host) != "0.0.0.0":
        candidates.append(default_key_file("0.0.0.0", port))
    for candidate in candidates:
        if candidate.exists():
            return Authkey(_read_key_file(candidate), f"file {candidate}")
    raise AuthenticationFailed(
        f"no authkey for {host}:{port}: key file {path} does not exist (a server started on "
        f"this machine with `agl store --port {port}` creates it); pass authkey=..., set "
        f"{ENV_AUTHKEY}, or give the server's --authkey-file"
    )
