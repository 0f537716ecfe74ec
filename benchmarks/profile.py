"""Optional sampling profiles of the server (and one client) during a measurement window,
with py-spy (``pip install py-spy``; ``--profile`` on the command line).

py-spy runs ``--nonblocking`` (it does not pause the target, so the figures stay close to an
unprofiled run) and ``--gil`` (only the thread holding the GIL is sampled: a thread blocked in
``recv`` is not "busy"; so the samples show where the interpreter's time goes, and their
count against rate x seconds is how much of the window the GIL was held) and writes
collapsed stacks (``--format raw``: one ``frame;frame;... count``
line per stack; feed them to flamegraph.pl or speedscope). The harness keeps each file in the
scratch directory and summarises it: the functions with the most samples on top of the stack
("self") and anywhere in it ("inclusive"), in percent of the sampled time.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RATE = 200  # samples per second
#: entry frames every stack has; left out of the inclusive ranking
BOILERPLATE = {"Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run",
               "BaseProcess._bootstrap", "BaseProcess.run", "<module>", "spawn_main", "_main",
               "_worker_main", "_run_module_as_main", "_run_code"}


def py_spy() -> str | None:
    """The py-spy executable (next to this interpreter or on PATH), or None."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def _short(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py:123)``."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    return f"{name} ({Path(where.rstrip(')')).name})"


def summarize(path: Path, seconds: float, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares of the collapsed stacks in ``path`` (sampled for
    ``seconds``)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            if frame.partition(" (")[0] not in BOILERPLATE:
                inclusive[frame] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[f, round(100.0 * c / total, 1)] for f, c in counter.most_common(top)]

    return {"samples": total, "file": str(path),
            "gil_held_pct": round(100.0 * total / (RATE * seconds), 1),
            "self_pct": share(own) if total else [],
            "inclusive_pct": share(inclusive) if total else []}


@contextlib.contextmanager
def profiling(pids: dict[str, int], seconds: float, directory: Path, label: str,
              sink: dict[str, Any]) -> Iterator[None]:
    """Sample every ``role -> pid`` for ``seconds`` while the body runs; put each summary in
    ``sink[label][role]``. Does nothing if py-spy is missing (``sink`` says so)."""
    exe = py_spy()
    if exe is None:
        sink[label] = {"skipped": "py-spy not found (pip install py-spy)"}
        yield
        return
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for role, pid in pids.items():
        out = directory / f"profile-{label.replace(':', '-')}-{role}.txt"
        argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                "--rate", str(RATE), "--nonblocking", "--gil", "--format", "raw", "--output",
                str(out)]
        procs[role] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE), out)
    try:
        yield
    finally:
        entry: dict[str, Any] = sink.setdefault(label, {})
        for role, (proc, out) in procs.items():
            try:
                _, err = proc.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            entry[role] = (summarize(out, max(1, round(seconds))) if out.exists() else
                           {"error": err.decode(errors="replace")[-500:]})
