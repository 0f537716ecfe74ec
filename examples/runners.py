"""A trainer and K runner processes sharing one mpstore server.

    python examples/runners.py [N_ROLLOUTS] [K_RUNNERS]

The trainer publishes the resources every runner should use (the model endpoint, a prompt),
enqueues N rollouts and consumes them from the feed of finished rollouts as they finish
(``finished_rollouts``: in the order they finished, with a cursor), deleting what it has
consumed. Each runner is a separate process (spawned,
so it would work the same with fork or forkserver): it receives the client as an argument
(a client pickles to its address and key and opens its own connection in the child), claims
rollouts with a long poll, emits spans and marks its attempt succeeded. Runners stop when
the queue stays empty for a moment.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import Counter

from mpstore import LLM, PromptTemplate, Span, StoreClient
from mpstore.testing import start_server


def runner(store: StoreClient, name: str) -> None:
    """Claim, work, report, until there is nothing left to do."""
    resources = store.get_latest_resources()
    assert resources is not None
    template = resources.resources["prompt"].template
    while (claimed := store.dequeue_rollout(worker_id=name, wait=0.5)) is not None:
        rollout_id, attempt_id = claimed.rollout_id, claimed.attempt.attempt_id
        prompt = template.format(**claimed.input)
        answer = str(claimed.input["a"] * claimed.input["b"])  # the "agent" at work
        first, second = store.get_many_span_sequence_ids([(rollout_id, attempt_id)] * 2)
        store.add_many_spans([
            Span(rollout_id, attempt_id, first, "llm.call",
                 attributes={"prompt": prompt, "completion": answer, "worker": name}),
            Span(rollout_id, attempt_id, second, "reward", attributes={"value": 1.0}),
        ])
        store.update_attempt(rollout_id, attempt_id, status="succeeded")
    store.close()


def main(n_rollouts: int = 20, k_runners: int = 3) -> None:
    with start_server() as server:
        store = server.connect()
        store.add_resources({
            "llm": LLM(endpoint="http://127.0.0.1:8000/v1", model="demo-model"),
            "prompt": PromptTemplate(template="What is {a} x {b}?", engine="f-string"),
        })
        rollouts = store.enqueue_many_rollouts(
            [{"input": {"a": i, "b": i + 1}, "mode": "train"} for i in range(n_rollouts)]
        )
        ids = [r.rollout_id for r in rollouts]
        print(f"trainer: enqueued {len(ids)} rollouts; starting {k_runners} runners")

        ctx = multiprocessing.get_context("spawn")
        workers = [ctx.Process(target=runner, args=(store, f"runner-{k}"))
                   for k in range(k_runners)]
        for worker in workers:
            worker.start()
        done, cursor, spans, by_worker = [], 0, 0, Counter()
        for _ in range(600):  # bounded: at most 60 s of 0.1 s long polls with nothing new
            if len(done) == len(ids):
                break
            page = store.finished_rollouts(after=cursor, limit=100, wait=0.1)
            for rollout in page.rollouts:  # learn from each as soon as it is finished
                spans += len(store.query_spans(rollout.rollout_id))
                by_worker[store.get_latest_attempt(rollout.rollout_id).worker_id] += 1
            done += page.rollouts
            store.delete_rollouts([r.rollout_id for r in page.rollouts])  # consumed
            cursor = page.next_after
        for worker in workers:
            worker.join(30)

        statuses = Counter(str(r.status) for r in done)
        print(f"trainer: {len(done)}/{len(ids)} finished {dict(statuses)}, {spans} spans")
        print(f"trainer: work per runner {dict(sorted(by_worker.items()))}")
        print(f"trainer: {store.statistics()['total_rollouts']} rollouts left after deleting")
        if len(done) != len(ids) or any(w.exitcode != 0 for w in workers):
            raise SystemExit("not every rollout finished")
        store.close()


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))
