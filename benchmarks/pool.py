"""Client processes started once per run and driven by messages over pipes.

Starting 8 interpreters per measurement would cost more than the measurement on 2 cores, so
the harness starts ``max(K)`` workers once and sends each a task: a module-level function
and its keyword arguments. A worker keeps its connections between tasks (see
:mod:`benchmarks.workload`), so a measurement never includes connecting unless it means to.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any


class WorkerError(RuntimeError):
    """A task raised in a worker; the message carries the worker's traceback."""


def _worker_main(conn: Connection, index: int) -> None:
    """Run tasks until the parent sends None or goes away."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message is None:
            return
        fn, kwargs = message
        try:
            reply: tuple[str, Any] = ("ok", fn(**kwargs))
        except BaseException:  # report everything, the parent decides
            reply = ("error", f"worker {index}:\n{traceback.format_exc()}")
        try:
            conn.send(reply)
        except (OSError, EOFError):
            return


class WorkerPool:
    """``size`` client processes; ``run(fn, kwargs_list)`` runs one task per worker."""

    def __init__(self, size: int, start_method: str = "spawn") -> None:
        ctx = multiprocessing.get_context(start_method)
        self.size = size
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for index in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, index), daemon=True,
                               name=f"bench-client-{index}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def submit(self, fn: Callable[..., Any], kwargs_list: Sequence[dict[str, Any]]) -> int:
        """Send ``fn(**kwargs_list[i])`` to worker ``i``; collect with :meth:`collect`."""
        if len(kwargs_list) > self.size:
            raise ValueError(f"{len(kwargs_list)} tasks for {self.size} workers")
        for conn, kwargs in zip(self._conns, kwargs_list, strict=False):
            conn.send((fn, kwargs))
        return len(kwargs_list)

    def collect(self, count: int, timeout: float, what: str = "task") -> list[Any]:
        """The results of the first ``count`` workers' tasks, in order; raise
        ``WorkerError`` if any failed, ``TimeoutError`` after ``timeout`` seconds."""
        conns = self._conns[:count]
        deadline = time.monotonic() + timeout
        results: list[Any] = []
        errors: list[str] = []
        for conn in conns:
            remaining = max(0.0, deadline - time.monotonic())
            if not conn.poll(remaining):
                raise TimeoutError(f"{what} did not finish within {timeout:.0f}s")
            status, value = conn.recv()
            if status == "ok":
                results.append(value)
            else:
                errors.append(value)
        if errors:
            raise WorkerError("\n".join(errors))
        return results

    def run(self, fn: Callable[..., Any], kwargs_list: Sequence[dict[str, Any]],
            timeout: float) -> list[Any]:
        """:meth:`submit` then :meth:`collect`."""
        count = self.submit(fn, kwargs_list)
        return self.collect(count, timeout, getattr(fn, "__name__", "task"))

    def run_same(self, fn: Callable[..., Any], count: int, timeout: float,
                 **kwargs: Any) -> list[Any]:
        """``fn(worker=i, **kwargs)`` on the first ``count`` workers."""
        return self.run(fn, [{**kwargs, "worker": i} for i in range(count)], timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Ask every worker to stop; terminate the ones that do not within ``timeout``."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, EOFError):
                pass
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
