"""The ``agl`` command (SPEC §6): real processes for what users run (port conflicts, signals,
health, stats, help, the console scripts), click's CliRunner for option parsing."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mpstore import startup
from mpstore.cli import main
from mpstore.manager import ports
from mpstore.manager.ports import free_port
from mpstore.testing import write_key_file
from tests.remote import running_server

AGL = [sys.executable, "-m", "mpstore"]
LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[%s\] \(Process-\d+ mpstore\.manager\.server\)   %s"


def agl(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGL, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """CliRunner runs configure_logging() in this process; undo it afterwards."""
    logger = logging.getLogger("mpstore")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A plain listener on a free loopback port, held by this (test) process."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


# --------------------------------------------------------------------------- real processes
@pytest.mark.parametrize("script", ["agl", "mpstore", "-m"])
def test_console_scripts_and_module_show_help(script: str) -> None:
    if script == "-m":
        command = AGL
    else:
        path = Path(sys.executable).with_name(script)
        if not path.exists():
            pytest.skip(f"{script} console script not installed next to {sys.executable}")
        command = [str(path)]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name in ("store", "health", "stats"):
        assert name in result.stdout


def test_store_help_lists_options_and_defaults() -> None:
    result = agl("store", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for expected in ("--host", "default: 127.0.0.1", "--port", "default: 4747",
                     "--authkey-file", "--log-level", "--watchdog-interval", "default: 1.0",
                     "--eviction-threshold", "--safe-threshold", "env var: MPSTORE_PORT"):
        assert expected in text, expected


def test_port_conflict_names_the_holder(tmp_path: Path) -> None:
    with running_server(tmp_path) as first:
        result = agl("store", "--port", str(first.port),
                     "--authkey-file", str(tmp_path / "authkey"))
        assert result.returncode == 1
        expected = (f"mpstore server failed to start on 127.0.0.1:{first.port}. Another process "
                    f"may already be using this port. (held by PID {first.pid}: ")
        assert expected in result.stderr
        line = next(x for x in result.stderr.splitlines() if expected in x)
        assert "-m mpstore store" in line  # the holder's command line
        assert re.search(LINE % ("ERROR", "mpstore server failed"), line)
        assert first.connect().ping()["pid"] == first.pid  # the first one is unharmed


def test_port_held_by_another_program(tmp_path: Path, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    key = write_key_file(tmp_path / "k")
    result = agl("store", "--port", str(port), "--authkey-file", str(key))
    assert result.returncode == 1
    assert f"(held by PID {os.getpid()}: " in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_the_server_gracefully(tmp_path: Path, sig: signal.Signals) -> None:
    with running_server(tmp_path) as srv:
        srv.connect().enqueue_rollout({"q": 1})
        assert srv.stop(sig) == 0
        log = srv.log()
    where = rf"127\.0\.0\.1:{srv.port}"
    for message in (f"Starting server at {where}", rf"Stopping server at {where} \({sig.name}\)",
                    "Server stopped"):
        assert re.search(LINE % ("INFO", message + "$"), log, re.MULTILINE), (message, log)
    assert "Traceback" not in log


def test_durable_server_keeps_its_state_and_locks_its_directory(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    with running_server(tmp_path, "--data-dir", data) as srv:
        rollout = srv.connect().enqueue_rollout({"q": 1})
        second = agl("store", "--port", str(free_port()), "--authkey-file",
                     str(srv.authkey_file), "--data-dir", data)
        assert second.returncode == 1 and "mpstore server failed to start" in second.stderr
        assert "Traceback" not in second.stderr
    with running_server(tmp_path, "--data-dir", data, "--synchronous", "full") as srv:
        assert srv.connect().get_rollout_by_id(rollout.rollout_id) == rollout


def test_health_exit_codes(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        key = str(srv.authkey_file)
        ok = agl("health", "--port", str(srv.port), "--authkey-file", key)
        assert ok.returncode == 0 and ok.stdout.startswith("ok:")
        wrong = agl("health", "--port", str(srv.port), "--authkey-file",
                    str(write_key_file(tmp_path / "wrong")))
        assert wrong.returncode == 1 and "authkey" in wrong.stderr
    down = agl("health", "--port", str(free_port()), "--authkey-file", key, "--timeout", "1")
    assert down.returncode == 1 and "unhealthy" in down.stderr


def test_stats_prints_json(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        srv.connect().enqueue_rollout({"q": 1})
        env = {**os.environ, "MPSTORE_PORT": str(srv.port),
               "MPSTORE_AUTHKEY_FILE": str(srv.authkey_file)}
        result = agl("stats", env=env)  # options from environment variables
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["total_rollouts"] == 1 and stats["queue_length"] == 1


def test_usage_errors_exit_2() -> None:
    assert agl("store", "--port", "notaport").returncode == 2
    assert agl("store", "--eviction-threshold", "lots").returncode == 2
    assert agl("nonsense").returncode == 2


# --------------------------------------------------------------------------- option parsing
@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the server's run() and record what the CLI hands over."""
    seen: dict[str, Any] = {}

    def fake_run(host: str, port: int, **options: Any) -> int:
        seen.update(options, host=host, port=port)
        return 0

    monkeypatch.setattr(startup, "run", fake_run)
    return seen


def test_store_defaults_are_handed_over(captured: dict[str, Any]) -> None:
    result = CliRunner().invoke(main, ["store"], env={"MPSTORE_PORT": None})
    assert result.exit_code == 0, result.output
    assert captured == {"host": "127.0.0.1", "port": 4747, "authkey_file": None,
                        "watchdog_interval": 1.0, "eviction_threshold": None,
                        "safe_threshold": None, "handshake_timeout": 5.0, "data_dir": None,
                        "synchronous": "normal", "max_connections": 1024,
                        "max_message_size": 64 * 2**20, "busy_poll": 100e-6,
                        "allow_classes": (), "call_stats": True, "metrics_host": "127.0.0.1",
                        "metrics_port": None, "tls_cert": None, "tls_key": None,
                        "tls_client_ca": None, "backend": None, "migrate": False}


def test_allow_class_is_repeatable_and_read_from_the_environment(
        captured: dict[str, Any]) -> None:
    result = CliRunner().invoke(main, ["store", "--allow-class", "datetime.datetime",
                                       "--allow-class", "decimal.Decimal"])
    assert result.exit_code == 0, result.output
    assert captured["allow_classes"] == ("datetime.datetime", "decimal.Decimal")
    result = CliRunner().invoke(main, ["store"],
                                env={"MPSTORE_ALLOW_CLASS": "uuid.UUID datetime.date"})
    assert result.exit_code == 0, result.output
    assert captured["allow_classes"] == ("uuid.UUID", "datetime.date")


def test_busy_poll_is_given_in_microseconds(captured: dict[str, Any]) -> None:
    result = CliRunner().invoke(main, ["store", "--busy-poll", "0"])
    assert result.exit_code == 0, result.output
    assert captured["busy_poll"] == 0.0
    result = CliRunner().invoke(main, ["store"], env={"MPSTORE_BUSY_POLL": "250"})
    assert result.exit_code == 0, result.output
    assert captured["busy_poll"] == 250e-6
    for bad in ("-1", "0.5", "lots", "2000000"):
        assert CliRunner().invoke(main, ["store", "--busy-poll", bad]).exit_code == 2, bad


def test_connection_and_message_limits(captured: dict[str, Any]) -> None:
    result = CliRunner().invoke(main, ["store", "--max-connections", "16",
                                       "--max-message-size", "1GiB"])
    assert result.exit_code == 0, result.output
    assert (captured["max_connections"], captured["max_message_size"]) == (16, 2**30)
    for bad in (["--max-connections", "0"], ["--max-message-size", "0.5"],
                ["--max-message-size", "0"], ["--max-message-size", "lots"]):
        assert CliRunner().invoke(main, ["store", *bad]).exit_code == 2, bad


@pytest.mark.parametrize(("text", "value"), [
    ("0.5", 0.5), (".25", 0.25), ("1.", 1.0), ("1073741824", 1073741824),
    ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("64kib", 64 * 1024), ("100B", 100),
])
def test_threshold_values(captured: dict[str, Any], text: str, value: float | int) -> None:
    result = CliRunner().invoke(main, ["store", "--eviction-threshold", text,
                                       "--safe-threshold", text])
    assert result.exit_code == 0, result.output
    assert captured["eviction_threshold"] == value
    assert type(captured["eviction_threshold"]) is type(value)


@pytest.mark.parametrize("text", ["1.5GiB", "lots", "-1", "1e9", "12 parsecs"])
def test_bad_threshold_is_a_usage_error(captured: dict[str, Any], text: str) -> None:
    result = CliRunner().invoke(main, ["store", "--eviction-threshold", text])
    assert result.exit_code == 2 and "threshold" in result.output


def test_options_from_environment(captured: dict[str, Any]) -> None:
    env = {"MPSTORE_PORT": "5001", "MPSTORE_HOST": "127.0.0.2", "MPSTORE_LOG_LEVEL": "debug",
           "MPSTORE_WATCHDOG_INTERVAL": "0.25"}
    result = CliRunner().invoke(main, ["store"], env=env)
    assert result.exit_code == 0, result.output
    assert (captured["port"], captured["host"], captured["watchdog_interval"]) == (
        5001, "127.0.0.2", 0.25)


@pytest.mark.parametrize("args", [["--port", "0"], ["--port", "70000"],
                                  ["--watchdog-interval", "0"], ["--log-level", "LOUD"]])
def test_out_of_range_options_exit_2(captured: dict[str, Any], args: list[str]) -> None:
    assert CliRunner().invoke(main, ["store", *args]).exit_code == 2


def test_thresholds_the_store_rejects_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["store", "--eviction-threshold", "1000",
                                       "--safe-threshold", "2000"])
    assert result.exit_code == 2 and "safe_threshold" in result.output


def test_bind_race_gives_the_message_without_pid(tmp_path: Path, listener: socket.socket,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # psutil sees nobody (as if the port was taken just after the check); the bind fails.
    monkeypatch.setattr(ports, "find_listener", lambda host, port: None)
    port = listener.getsockname()[1]
    key = write_key_file(tmp_path / "k")
    result = CliRunner().invoke(main, ["store", "--port", str(port), "--authkey-file", str(key)])
    assert result.exit_code == 1
    assert result.stderr.rstrip().endswith(
        f"mpstore server failed to start on 127.0.0.1:{port}. "
        "Another process may already be using this port.")


def test_other_start_failures_exit_1_with_the_reason(tmp_path: Path) -> None:
    key = write_key_file(tmp_path / "k")
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the bind fails, nothing listens.
    result = CliRunner().invoke(main, ["store", "--host", "192.0.2.1", "--port", "4747",
                                       "--authkey-file", str(key)])
    assert result.exit_code == 1
    assert "mpstore server failed to start on 192.0.2.1:4747. Cannot assign requested" \
        in result.stderr


def test_non_loopback_host_is_warned_about(tmp_path: Path, listener: socket.socket) -> None:
    # The port is taken on loopback, so the wildcard bind never happens: only the warning.
    port = listener.getsockname()[1]
    result = CliRunner().invoke(main, ["store", "--host", "0.0.0.0", "--port", str(port),
                                       "--authkey-file", str(write_key_file(tmp_path / "k"))])
    assert result.exit_code == 1
    assert "[WARNING]" in result.stderr
    assert "anyone who can reach it and holds the authkey has full access" in " ".join(
        result.stderr.split())


def test_other_commands_say_to_install_agentlightning_when_it_is_not() -> None:
    # With agentlightning installed they are handed over (tests/agentlightning/test_cli.py).
    import importlib.util

    if importlib.util.find_spec("agentlightning") is not None:
        pytest.skip("agentlightning is installed here")
    result = subprocess.run([sys.executable, "-m", "mpstore", "vllm", "serve", "--port", "1"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "pip install agentlightning" in result.stderr and "'vllm'" in result.stderr
