"""An unmodified agent-lightning program on an ``agl store`` server.

agent-lightning's ``Trainer`` runs an algorithm and 2 runner processes in client-server mode;
the only mpstore-specific lines are the two that build the store (search for "mpstore").
The agent needs no LLM: its reward is a deterministic function of its task, and each rollout
emits ``STEPS`` message spans before the reward span agent-lightning records for it.

    pip install 'mpstore[agentlightning]'
    agl store --port 4747 &
    python examples/agentlightning_trainer.py --address 127.0.0.1:4747 --tasks 8

Prints one JSON object: every rollout's status, reward and span count, as the algorithm read
them back from the store (tests/agentlightning/test_example.py checks them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network for litellm here

import agentlightning as agl
from agentlightning.execution.client_server import ClientServerExecutionStrategy

from mpstore import connect
from mpstore.agentlightning import MpstoreLightningStore

STEPS = 3  # message spans per rollout, before the reward span


def reward_of(task: dict[str, int]) -> float:
    """The agent's reward: deterministic, from the task alone."""
    return (task["a"] * task["b"]) % 7 / 7


class Multiplier(agl.LitAgent):  # type: ignore[misc]
    """An agent that "thinks" in STEPS messages and is rewarded by reward_of."""

    def rollout(self, task: dict[str, int], resources: Any, rollout: Any) -> float:
        for step in range(STEPS):
            agl.emit_message(f"step {step}: {task['a']} x {task['b']}")
        return reward_of(task)


class EnqueueAndRead(agl.Algorithm):  # type: ignore[misc]
    """Enqueues every task, waits for the rollouts, reads their spans and rewards back."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    async def run(self, train_dataset: Any = None, val_dataset: Any = None) -> None:
        store = self.get_store()
        # Runners fetch the rollout's resources before running it: the latest ones.
        await store.add_resources({"prompt": agl.PromptTemplate(template="{a} x {b}",
                                                                engine="f-string")})
        rollouts = [await store.enqueue_rollout(task, mode="train") for task in train_dataset]
        ids = [r.rollout_id for r in rollouts]
        done = await store.wait_for_rollouts(rollout_ids=ids, timeout=self.timeout)
        finished = {r.rollout_id: r for r in done}
        report = []
        for rollout in rollouts:
            spans = list(await store.query_spans(rollout.rollout_id))
            final = finished.get(rollout.rollout_id)
            attempt = await store.get_latest_attempt(rollout.rollout_id)
            report.append({
                "rollout_id": rollout.rollout_id, "input": rollout.input,
                "status": final.status if final else "unfinished",
                "reward": agl.find_final_reward(spans), "spans": len(spans),
                "span_names": sorted({s.name for s in spans}),
                "worker_id": attempt.worker_id if attempt else None,
            })
        print(json.dumps({"rollouts": report}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:4747", help="the agl store server")
    parser.add_argument("--authkey-file", default=None, help="its key file (default: found)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--runners", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    # agent-lightning's client-server strategy starts its runners with the default start
    # method and a local function as target, which only "fork" can start. Each forked runner
    # opens its own connections to the server (mpstore's client is fork-safe).
    multiprocessing.set_start_method("fork", force=True)

    # mpstore: agent-lightning's store, on the agl store server at --address.
    store = MpstoreLightningStore(connect(args.address, authkey_file=args.authkey_file))

    trainer = agl.Trainer(
        store=store, algorithm=EnqueueAndRead(args.timeout), tracer=agl.OtelTracer(),
        strategy=ClientServerExecutionStrategy(role="both", n_runners=args.runners,
                                               managed_store=False),
    )
    tasks = [{"a": i + 1, "b": 2 * i + 3} for i in range(args.tasks)]
    trainer.fit(Multiplier(), train_dataset=tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
