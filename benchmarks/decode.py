"""What restricted decoding (``mpstore.manager.safe_pickle``) costs per cycle, in process:
``python -m benchmarks.decode``.

The messages of one unbatched cycle (the ``cycle`` scenario's 13 calls: enqueue, dequeue,
10 packed ``add_span``, ``update_attempt``; and their replies) are pickled as the client and
server pickle them, then decoded with ``pickle.loads`` and with the allow-list decoders the
server (requests) and the client (replies) use. The difference is the decoding cost added to
a cycle; compare it with the ``server CPU us/cycle`` row of ``benchmarks.run`` (the server
decodes the requests; each client decodes its own replies).
"""

from __future__ import annotations

import argparse
import pickle
import time
from collections.abc import Callable
from typing import Any

from mpstore import Attempt, AttemptedRollout, Rollout, Span
from mpstore.manager import wire
from mpstore.manager.safe_pickle import AllowList

from .workload import SPANS_PER_CYCLE, make_span, task_input


def cycle_messages() -> tuple[list[bytes], list[bytes]]:
    """The requests and the replies of one cycle, pickled as they travel."""
    dump, protocol = pickle.dumps, wire.PROTOCOL
    rollout = Rollout("ro-0123456789ab", task_input(1, 1), time.time())
    attempt = Attempt(rollout.rollout_id, "at-01234567", 1, time.time(), worker_id="w")
    claimed = AttemptedRollout.of(rollout, attempt)
    requests = [dump((wire.STORE_IDENT, "enqueue_rollout", (task_input(1, 1),), {}), protocol),
                dump((wire.STORE_IDENT, "dequeue_rollout", (), {}), protocol)]
    for seq in range(1, SPANS_PER_CYCLE + 1):
        span = make_span(Span, rollout.rollout_id, attempt.attempt_id, seq)
        requests.append(dump((wire.PACKED_IDENT, "add_span", (span._wire(),), {}), protocol))
    requests.append(dump((wire.STORE_IDENT, "update_attempt",
                          (rollout.rollout_id, attempt.attempt_id), {"status": "succeeded"}),
                         protocol))
    replies = [wire.dump_reply(rollout), wire.dump_reply(claimed),
               *[wire.dump_result(0, (0,)) for _ in range(SPANS_PER_CYCLE)],
               wire.dump_reply(attempt)]
    return requests, replies


def per_cycle(loads: Callable[[Any], Any], messages: list[bytes], rounds: int) -> float:
    """CPU microseconds to decode ``messages`` once (best of 7 runs of ``rounds``; CPU time,
    so that other work on a shared machine skews it less than wall time would)."""
    best = float("inf")
    for _ in range(7):
        started = time.process_time()
        for _ in range(rounds):
            for data in messages:
                loads(data)
        best = min(best, (time.process_time() - started) / rounds)
    return best * 1e6


def measure(rounds: int = 2000) -> dict[str, float]:
    requests, replies = cycle_messages()
    server, client = AllowList.for_requests(), AllowList.for_replies()
    figures = {
        "requests_plain_us": per_cycle(pickle.loads, requests, rounds),
        "requests_restricted_us": per_cycle(server.loads, requests, rounds),
        "replies_plain_us": per_cycle(pickle.loads, replies, rounds),
        "replies_restricted_us": per_cycle(client.loads, replies, rounds),
    }
    figures["server_added_us"] = figures["requests_restricted_us"] - figures["requests_plain_us"]
    figures["client_added_us"] = figures["replies_restricted_us"] - figures["replies_plain_us"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    figures = measure(parser.parse_args().rounds)
    for name, value in figures.items():
        print(f"{name:28s} {value:8.2f}")


if __name__ == "__main__":
    main()
