"""Quick start: one rollout from enqueue to done, through a real mpstore server.

    python examples/quickstart.py

It starts its own server (`agl store` in a subprocess, on a free port, with a throw-away key).
In your own code the server usually runs on its own:

    agl store --port 4747            # terminal 1: creates its key file, mode 0600
    python -c 'import mpstore; print(mpstore.connect("127.0.0.1:4747").ping())'   # terminal 2

`connect()` on the same machine finds the server's key file by itself; elsewhere pass
`authkey=` or set MPSTORE_AUTHKEY.
"""

from __future__ import annotations

from mpstore import Span
from mpstore.testing import start_server


def main() -> None:
    with start_server() as server:
        store = server.connect()  # = mpstore.connect(server.address, server.authkey)
        info = store.ping()
        print(f"connected to {store.address}: {info['name']} {info['version']}")

        # The trainer side: put a task in the queue.
        rollout = store.enqueue_rollout({"question": "What is 6 x 7?"}, mode="train")
        print(f"enqueued  {rollout.rollout_id}  status={rollout.status}")

        # The runner side: claim it (a new attempt), report spans, finish.
        claimed = store.dequeue_rollout(worker_id="runner-1")
        assert claimed is not None
        attempt = claimed.attempt
        print(f"claimed   {claimed.rollout_id}  attempt={attempt.attempt_id}"
              f"  status={claimed.status}")
        for name, attributes in [("llm.call", {"prompt": "6 x 7 = ?", "completion": "42"}),
                                 ("reward", {"value": 1.0})]:
            sequence_id = store.get_next_span_sequence_id(claimed.rollout_id, attempt.attempt_id)
            store.add_span(Span(claimed.rollout_id, attempt.attempt_id, sequence_id, name,
                                attributes=attributes))
        store.update_attempt(claimed.rollout_id, attempt.attempt_id, status="succeeded")

        # The trainer side again: wait for the result, read the spans.
        [done] = store.wait_for_rollouts(rollout_ids=[rollout.rollout_id], timeout=10)
        print(f"finished  {done.rollout_id}  status={done.status}")
        for span in store.query_spans(done.rollout_id):
            print(f"  span {span.sequence_id}: {span.name} {span.attributes}")
        print("statistics:", {k: v for k, v in store.statistics().items()
                              if k.startswith("total_")})
        store.close()


if __name__ == "__main__":
    main()
