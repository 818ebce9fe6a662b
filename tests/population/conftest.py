"""In-process federations for the population tests: the real server loop (``run_federation``, Flower's
``Strategy.start``, the user grid, the recorder) over a pool whose node answers every cohort message with
the real ClientApp in this process (no Ray: the population's wiring is what is tested; the simulation on
Ray is tests/simulations'), and a pair file of many small users (cheap to evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict


class PoolGrid:
    """The pool side of a simulation in process: each pushed cohort message is answered at once by the real
    ClientApp of a one-node pool (node 1)."""

    def __init__(self) -> None:
        self.replies: dict[str, object] = {}
        self.pushed = 0

    def get_node_ids(self) -> list[int]:
        return [1]

    def set_run(self, run_id: int) -> None:
        pass

    def push_messages(self, messages):
        from fedpersona.client.app import app as client_app

        ids = []
        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.pushed}"
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={}, state=RecordDict(),
                              run_config={})
            self.replies[msg.metadata.message_id] = client_app(msg, context)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.fixture
def pool_grid():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    return PoolGrid


@pytest.fixture(scope="session")
def many_small_users(tmp_path_factory: pytest.TempPathFactory):
    """``many_small_users(n)``: a pair file of ``n`` users with 4 training pairs and 1 test pair each (synthetic
    users' pairs handed out in turn, so each user's preferences are one synthetic user's), built once per n."""
    from fedpersona.data.synthetic import PreferenceSimulator

    made: dict[int, Path] = {}

    def make(n: int) -> Path:
        if n not in made:
            simulator = PreferenceSimulator("conflicting", 8, 0)
            sources = [simulator.user_data(i) for i in range(8)]
            path = tmp_path_factory.mktemp("pairs") / f"users-{n}.jsonl"
            lines = []
            for u in range(n):
                source = sources[u % 8]
                start = 4 * (u // 8)
                picked = [(source.train[(start + k) % len(source.train)], "train") for k in range(4)]
                picked.append((source.test[(u // 8) % len(source.test)], "test"))
                lines += [json.dumps({"user_id": f"u{u:05d}", "prompt": p.prompt, "chosen": p.chosen,
                                      "rejected": p.rejected, "split": split}) for p, split in picked]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            made[n] = path
        return made[n]

    return make
