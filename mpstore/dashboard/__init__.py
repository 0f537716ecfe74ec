"""``agl dashboard``: a read-only web view of a running store (``pip install
'mpstore[dashboard]'``).

A separate process that reaches the store with :func:`mpstore.connect`, as any client does,
and serves server-rendered pages (Starlette + Jinja2, on uvicorn) that refresh themselves by
polling fragments. See README.md, "Looking at a run".

    from mpstore.dashboard import run
    run(store="127.0.0.1:4747", host="127.0.0.1", port=4748)
"""

from __future__ import annotations

import ipaddress
import logging
import signal
from types import FrameType

from .app import LOOPBACK_NAMES, create_app
from .data import Source, StoreDown
from .history import History

__all__ = ["create_app", "is_loopback", "run"]

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(store: str = "127.0.0.1:4747", host: str = "127.0.0.1", port: int = 4748, *,
        authkey_file: str | None = None, log_level: str = "INFO") -> int:
    """Serve the dashboard in the foreground until SIGINT/SIGTERM; returns the exit code.

    Raises InvalidArgument for a malformed ``store`` address (a usage error). A store that
    does not answer, or refuses the key, is not an error here: the dashboard starts, logs
    why, and its pages say so until the store answers."""
    import uvicorn

    source = Source(store, authkey_file=authkey_file)
    history = History(source)
    try:
        stats = source.statistics()
        logger.info("Store at %s answers: %d rollouts, %d spans", source.address,
                    stats.get("total_rollouts", 0), stats.get("total_spans", 0))
    except StoreDown:
        logger.warning("The pages say so until the store answers; the dashboard keeps trying")
    allowed = None if is_loopback(host) else ["*"]
    if allowed:
        logger.warning("Dashboard listening on %s: anyone who reaches this port reads the "
                       "store (it holds the store's key). Prefer 127.0.0.1 and an SSH tunnel.",
                       host)
    app = create_app(source, history, allowed_hosts=allowed)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            log_level=log_level.lower(), lifespan="on")
    server = uvicorn.Server(config)
    logger.info("Dashboard for store %s at http://%s:%d/", source.address, host, port)
    # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again against the
    # handlers it found; with these there is nothing left to do, so a stop exits 0 as
    # `agl store` does.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    server.run()
    if server.started:
        logger.info("Dashboard stopped")
    return 0 if server.started else 1


def _stopped(signum: int, frame: FrameType | None) -> None:
    """A stop signal that arrives after uvicorn has shut down: nothing more to do."""
