"""The ``agl`` command (also ``mpstore`` and ``python -m mpstore``): ``store``, ``health``,
``stats`` (SPEC §6), ``dashboard``, ``top``; any other command is agent-lightning's, handed
to its ``agl`` when it is installed.

This module only parses options and hands over: ``agl store`` to
:func:`mpstore.startup.run`, ``agl top`` to :func:`mpstore.top.run_top`, the others to
:func:`mpstore.connect`. Exit codes: 0 success, 1 failure (server could not start, server
unhealthy), 2 usage error (click's).
Every option can also come from an environment variable, named in ``--help``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from typing import Any

import click

from ._version import __version__
from .errors import InvalidArgument, MpstoreError
from .log import configure_logging

__all__ = ["ByteSize", "Threshold", "main"]

_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


class Threshold(click.ParamType):
    """A memory threshold: ``0.7`` (with a decimal point) is a ratio of RAM; ``1073741824``
    or ``512MiB`` (an integer, optionally with KiB/MiB/GiB) is a number of bytes."""

    name = "threshold"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float | int:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        text = str(value).strip()
        if re.fullmatch(r"\d*\.\d+|\d+\.\d*", text):
            return float(text)
        match = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", text)
        if match and match.group(2).lower() in _UNITS:
            return int(match.group(1)) * _UNITS[match.group(2).lower()]
        self.fail(f"{value!r} is neither a ratio like 0.7 nor bytes like 1073741824 or 512MiB",
                  param, ctx)


class ByteSize(Threshold):
    """A number of bytes: ``67108864`` or ``64MiB`` (an integer, optionally KiB/MiB/GiB)."""

    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        size = super().convert(value, param, ctx)
        if isinstance(size, float) or size < 1:
            self.fail(f"{value!r} is not a number of bytes like 67108864 or 64MiB", param, ctx)
        return int(size)


def _address_options(func: Any) -> Any:
    """--host, --port and --authkey-file, shared by every command."""
    for option in reversed((
        click.option("--host", default="127.0.0.1", show_default=True, envvar="MPSTORE_HOST",
                     show_envvar=True, help="Address of the server."),
        click.option("--port", type=click.IntRange(1, 65535), default=4747, show_default=True,
                     envvar="MPSTORE_PORT", show_envvar=True, help="TCP port of the server."),
        click.option("--authkey-file", type=click.Path(dir_okay=False), default=None,
                     envvar="MPSTORE_AUTHKEY_FILE", show_envvar=True,
                     help="File holding the authkey. Default: MPSTORE_AUTHKEY, else the key "
                          "file of this host and port under $XDG_RUNTIME_DIR/mpstore or "
                          "~/.mpstore (the server creates it, mode 0600)."),
    )):
        func = option(func)
    return func


def _hand_to_agentlightning(name: str, args: tuple[str, ...]) -> None:
    """Run agent-lightning's ``agl NAME ARGS...`` in this process and exit with its code."""
    if importlib.util.find_spec("agentlightning") is None:
        raise click.UsageError(
            f"No such command {name!r}. mpstore's agl runs store, health, stats and "
            f"dashboard; other agl commands (vllm, prometheus, agentops ...) are "
            f"agent-lightning's: pip install agentlightning, and this agl hands them over.")
    from agentlightning.cli import main as agentlightning_main

    sys.exit(agentlightning_main([name, *args]))


class _Group(click.Group):
    """mpstore's commands; any other name goes to agent-lightning's ``agl`` (both packages
    install an ``agl`` script, and the one installed last replaces the other: mpstore's
    must not take agent-lightning's commands away)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        return click.Command(
            cmd_name, callback=lambda args: _hand_to_agentlightning(cmd_name, args),
            params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                              "help_option_names": []},
            help="agent-lightning's command (handed over).")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpstore")
def main() -> None:
    """mpstore: a shared store of rollouts, attempts, spans and resources for multi-process
    agent-RL workloads. `agl store` serves it; Python processes reach it with
    mpstore.connect("HOST:PORT").

    Any other command (vllm, prometheus, agentops ...) is handed to agent-lightning's agl
    when agentlightning is installed."""


def _require(module: str, extra: str, feature: str) -> None:
    """Exit 1 with what to install if ``feature`` needs ``module`` and it is missing."""
    if importlib.util.find_spec(module) is None:
        raise click.ClickException(
            f"{feature} needs {module}, which is not installed: pip install 'mpstore[{extra}]'")


@main.command("store")
@_address_options
@click.option("--log-level", type=click.Choice(_LEVELS, case_sensitive=False), default="INFO",
              show_default=True, envvar="MPSTORE_LOG_LEVEL", show_envvar=True,
              help="Log level (log lines go to stderr).")
@click.option("--watchdog-interval", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, envvar="MPSTORE_WATCHDOG_INTERVAL", show_envvar=True,
              help="Seconds between background watchdog passes (timeouts, unresponsive "
                   "runners).")
@click.option("--eviction-threshold", type=Threshold(), default=None,
              envvar="MPSTORE_EVICTION_THRESHOLD", show_envvar=True,
              help="Span memory above which spans are evicted: a ratio of RAM (0.7, the "
                   "default) or bytes (1073741824, 512MiB).")
@click.option("--safe-threshold", type=Threshold(), default=None,
              envvar="MPSTORE_SAFE_THRESHOLD", show_envvar=True,
              help="Eviction stops below this: ratio or bytes (default 0.8 x eviction).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              envvar="MPSTORE_DATA_DIR", show_envvar=True,
              help="Keep the state in SQLite in this directory and restore it on start "
                   "(default: in memory only).")
@click.option("--synchronous", type=click.Choice(["normal", "full"], case_sensitive=False),
              default="normal", show_default=True, envvar="MPSTORE_SYNCHRONOUS",
              show_envvar=True,
              help="With --data-dir: normal survives a killed server, full also a power loss "
                   "(an fsync per commit).")
@click.option("--handshake-timeout", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, envvar="MPSTORE_HANDSHAKE_TIMEOUT", show_envvar=True,
              help="Seconds a new connection has to authenticate before it is dropped.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1024,
              show_default=True, envvar="MPSTORE_MAX_CONNECTIONS", show_envvar=True,
              help="Connections served at once; more are closed at once and logged.")
@click.option("--max-message-size", type=ByteSize(), default="64MiB", show_default=True,
              envvar="MPSTORE_MAX_MESSAGE_SIZE", show_envvar=True,
              help="Largest request in bytes (67108864, 64MiB); a larger one is discarded "
                   "unread and its caller gets InvalidArgument.")
@click.option("--busy-poll", type=click.IntRange(0, 1_000_000), default=100,
              show_default=True, envvar="MPSTORE_BUSY_POLL", show_envvar=True,
              help="Microseconds to poll for the next request without sleeping, while "
                   "requests come less than this apart: ~13 us less latency per call, for up "
                   "to one core spent polling at such rates (0: never poll).")
@click.option("--allow-class", "allow_classes", multiple=True, metavar="MODULE.NAME",
              envvar="MPSTORE_ALLOW_CLASS", show_envvar=True,
              help="A class (or function) that requests may contain beyond builtin "
                   "containers and scalars and mpstore's records; repeatable (the variable: "
                   "names separated by spaces). Anything else in a request is refused before "
                   "it is built, and its caller gets InvalidArgument. A key holder can call "
                   "what you allow with any arguments: allow plain data classes only.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              envvar="MPSTORE_METRICS_PORT", show_envvar=True,
              help="Also serve Prometheus metrics at http://METRICS-HOST:PORT/metrics (needs "
                   "pip install 'mpstore[metrics]'). Default: no metrics endpoint.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              envvar="MPSTORE_METRICS_HOST", show_envvar=True,
              help="Address of the metrics endpoint. It serves only metric names and numbers "
                   "(never payloads), to anyone who can reach it: no key.")
@click.option("--call-stats/--no-call-stats", default=True, show_default=True,
              envvar="MPSTORE_CALL_STATS", show_envvar=True,
              help="Count and time every call by method, for agl top, agl stats and the "
                   "metrics (a few increments per call).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), default=None,
              envvar="MPSTORE_TLS_CERT", show_envvar=True,
              help="Speak TLS on every connection, with this certificate (PEM, the chain "
                   "after it). Clients then connect with tls_ca= (or MPSTORE_TLS_CA) and "
                   "check that it names the host they connect to.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), default=None,
              envvar="MPSTORE_TLS_KEY", show_envvar=True,
              help="The certificate's private key (PEM). Default: in the --tls-cert file.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False, exists=True), default=None,
              envvar="MPSTORE_TLS_CLIENT_CA", show_envvar=True,
              help="Mutual TLS: clients must show a certificate signed by this CA (PEM); "
                   "they give it with tls_cert= and tls_key= (or MPSTORE_TLS_CERT/_KEY).")
@click.option("--backend", default=None, metavar="postgresql://USER@HOST:PORT/DB",
              envvar="MPSTORE_BACKEND", show_envvar=True,
              help="Keep the state in this PostgreSQL database instead of memory; any number "
                   "of servers may share it (needs mpstore[postgres]). Each server holds 11 "
                   "connections to it. An empty database is given mpstore's schema; a newer "
                   "or foreign one is refused (exit 1).")
@click.option("--migrate", is_flag=True, default=False, envvar="MPSTORE_MIGRATE",
              show_envvar=True,
              help="With --backend: migrate a database of an older mpstore schema (without "
                   "it, such a database is refused).")
def store_command(host: str, port: int, authkey_file: str | None, log_level: str,
                  watchdog_interval: float, eviction_threshold: float | int | None,
                  safe_threshold: float | int | None, data_dir: str | None, synchronous: str,
                  handshake_timeout: float, max_connections: int, max_message_size: int,
                  busy_poll: int, allow_classes: tuple[str, ...], metrics_port: int | None,
                  metrics_host: str, call_stats: bool, tls_cert: str | None,
                  tls_key: str | None, tls_client_ca: str | None, backend: str | None,
                  migrate: bool) -> None:
    """Run the store server in the foreground until SIGINT or SIGTERM.

    It listens on 127.0.0.1 unless --host says otherwise. Clients need its authkey, which
    gives full access to the store: keep it secret. Requests are decoded with an allow-list
    (see --allow-class), so a key holder cannot make the server run code. Exits 0 after a graceful
    stop, 1 if the server cannot start (e.g. the port is taken: the holder is named)."""
    if metrics_port is not None:
        _require("prometheus_client", "metrics", "--metrics-port")
    configure_logging(log_level)
    if tls_cert is None and (tls_key is not None or tls_client_ca is not None):
        raise click.UsageError("--tls-key and --tls-client-ca need --tls-cert")
    from .startup import run

    try:
        code = run(host, port, authkey_file=authkey_file, watchdog_interval=watchdog_interval,
                   eviction_threshold=eviction_threshold, safe_threshold=safe_threshold,
                   handshake_timeout=handshake_timeout, data_dir=data_dir,
                   synchronous=synchronous.lower(), max_connections=max_connections,
                   max_message_size=max_message_size, busy_poll=busy_poll / 1e6,
                   allow_classes=allow_classes, call_stats=call_stats,
                   metrics_host=metrics_host, metrics_port=metrics_port, tls_cert=tls_cert,
                   tls_key=tls_key, tls_client_ca=tls_client_ca, backend=backend,
                   migrate=migrate)
    except InvalidArgument as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(code)


#: --timeout of the commands that ask a running server.
_TIMEOUT = click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0,
                        show_default=True, help="Seconds to wait for the answer.")


def _ask(host: str, port: int, authkey_file: str | None, timeout: float, method: str,
         failure: str) -> Any:
    """The answer of one call to the server; exit 1, with ``failure: reason`` on stderr, if
    it does not come (no server, wrong key, timeout)."""
    from .manager.client import connect

    try:
        with connect((host, port), authkey_file=authkey_file, timeout=timeout,
                     retry_for=0) as client:
            return getattr(client, method)()
    except (MpstoreError, OSError) as exc:
        click.echo(f"{failure}: {host}:{port}: {exc}", err=True)
        sys.exit(1)


@main.command("health")
@_address_options
@_TIMEOUT
def health_command(host: str, port: int, authkey_file: str | None, timeout: float) -> None:
    """Exit 0 if a server answers ping with the right key and takes writes; 3 if it answers
    but is read-only (its data directory could not be written, e.g. a full disk; it retries
    on its own); 1 if it does not answer (the reason on stderr)."""
    info = _ask(host, port, authkey_file, timeout, "ping", "unhealthy")
    where = f"mpstore {info.get('version')} at {host}:{port} (pid {info.get('pid')})"
    if info.get("writable", True):
        click.echo(f"ok: {where}, writable")
        return
    click.echo(f"read-only: {where} answers, but its data directory cannot be written now "
               f"(see `agl stats`: storage)")
    sys.exit(3)


@main.command("stats")
@_address_options
@_TIMEOUT
def stats_command(host: str, port: int, authkey_file: str | None, timeout: float) -> None:
    """Print the server's statistics() as JSON; exit 1 if it does not answer."""
    stats = _ask(host, port, authkey_file, timeout, "statistics", "error")
    click.echo(json.dumps(stats, indent=2, sort_keys=True, default=str))


@main.command("dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="MPSTORE_DASHBOARD_HOST",
              show_envvar=True, help="Address the dashboard listens on. Whoever reaches it "
                                     "reads the whole store: keep it on loopback.")
@click.option("--port", type=click.IntRange(1, 65535), default=4748, show_default=True,
              envvar="MPSTORE_DASHBOARD_PORT", show_envvar=True, help="Its TCP port.")
@click.option("--store", "store_address", default="127.0.0.1:4747", show_default=True,
              envvar="MPSTORE_DASHBOARD_STORE", show_envvar=True,
              help="HOST:PORT of the agl store server to show.")
@click.option("--authkey-file", type=click.Path(dir_okay=False), default=None,
              envvar="MPSTORE_AUTHKEY_FILE", show_envvar=True,
              help="File holding the store's authkey. Default: MPSTORE_AUTHKEY, else the key "
                   "file the server wrote for that host and port.")
@click.option("--log-level", type=click.Choice(_LEVELS, case_sensitive=False), default="INFO",
              show_default=True, envvar="MPSTORE_LOG_LEVEL", show_envvar=True,
              help="Log level (log lines go to stderr).")
def dashboard_command(host: str, port: int, store_address: str, authkey_file: str | None,
                      log_level: str) -> None:
    """Serve a read-only web dashboard of a running store (needs mpstore[dashboard]).

    Open http://HOST:PORT/ in a browser: rollouts, traces, resources and runners, refreshed
    live. It starts even when the store does not answer (the pages say why). Exits 0 after
    SIGINT/SIGTERM, 1 if it cannot serve (port taken, extra not installed), 2 for a usage
    error."""
    configure_logging(log_level)
    try:
        from .dashboard import run
    except ImportError as exc:
        click.echo(f"agl dashboard needs its extra: pip install 'mpstore[dashboard]' ({exc})",
                   err=True)
        sys.exit(1)
    try:
        code = run(store_address, host, port, authkey_file=authkey_file, log_level=log_level)
    except InvalidArgument as exc:
        raise click.UsageError(f"--store: {exc}") from None
    sys.exit(code)
@main.command("top")
@_address_options
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              envvar="MPSTORE_TOP_INTERVAL", show_envvar=True,
              help="Seconds between frames; rates and latencies are over this interval.")
@click.option("--once", is_flag=True, default=False,
              help="Print one frame (from two samples --interval apart) and exit: 0, or 1 if "
                   "no server answers.")
@_TIMEOUT
def top_command(host: str, port: int, authkey_file: str | None, interval: float, once: bool,
                timeout: float) -> None:
    """A live view of a running server: queue, rollouts by status, throughput, latency,
    runners, connections, storage. Refreshes in place; q or Ctrl-C quits. While the server
    cannot be reached it says so and keeps trying. Needs pip install 'mpstore[top]'."""
    _require("rich", "top", "agl top")
    from .top import run_top

    sys.exit(run_top(host, port, authkey_file=authkey_file, interval=interval, once=once,
                     timeout=timeout))
