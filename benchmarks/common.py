"""Small helpers shared by the harness: ports, key files, statistics, bounded waits."""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def write_keyfile(directory: str | os.PathLike[str], name: str = "authkey") -> tuple[Path, bytes]:
    """Create a key file of random bytes (hex text, no newline) with mode 0600.

    Hex keeps the key identical whether a reader takes the file's bytes as they are or strips
    whitespace; it is still 32 random bytes of entropy. Returns the path and the key bytes.
    """
    path = Path(directory) / name
    key = secrets.token_hex(32).encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    os.chmod(path, 0o600)
    return path, key


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    """Median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def latency_summary(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p99/mean/min/max in microseconds of per-call times given in nanoseconds."""
    micros = [s / 1000.0 for s in samples_ns]
    return {
        "n": len(micros),
        "p50_us": round(percentile(micros, 50), 2),
        "p99_us": round(percentile(micros, 99), 2),
        "mean_us": round(sum(micros) / len(micros), 2) if micros else float("nan"),
        "min_us": round(min(micros), 2) if micros else float("nan"),
        "max_us": round(max(micros), 2) if micros else float("nan"),
    }


def wait_until(check: Callable[[], T | None], timeout: float, interval: float = 0.05,
               what: str = "condition") -> T:
    """Poll ``check`` until it returns something other than None/False, or raise
    ``TimeoutError`` after ``timeout`` seconds. Exceptions from ``check`` count as "not yet"
    and the last one is chained to the timeout."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value is not None and value is not False:
                return value
        except Exception as exc:  # not ready yet
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.1f}s") from last
        time.sleep(interval)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded to 3 decimals, None if either is missing/zero."""
    if numerator is None or denominator is None:
        return None
    if denominator != denominator or numerator != numerator or denominator == 0:  # NaN/zero
        return None
    return round(numerator / denominator, 3)


def round_floats(value: Any, digits: int = 3) -> Any:
    """``value`` with every float rounded, for a readable JSON file."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value
