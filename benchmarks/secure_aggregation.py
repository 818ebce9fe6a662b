"""Secure aggregation over Flower messages (issue 26): cost per round against users and update size, beside
plain FedAvg; and the accuracy of both.

Not a test: it prints figures. Each secure row is one real round of the wired path, in this process:
Flower's ``FedAvg`` samples n users, ``fedpersona.server.secure.SecureAggregationGrid`` runs the four SecAgg+
stages through the real ``UserGrid`` (per-user requests packed into cohort messages of up to 16 users), and
each cohort is answered by ``fedpersona.client.secure`` (every user its own participant, its state in the
run's user store between stages). Only local training is replaced by a synthetic update of the model's
shared-adapter shape (a random direction of norm ~1, weight 8..160 pairs): training costs the same with
and without secure aggregation, and 1,000 users of SmolLM2 do not train on this machine. No dropouts.
The plain row aggregates n replies of the same shapes with Flower's ``FedAvg.aggregate_train`` (one
reply object reused n times: the same arithmetic without n copies in memory).

Update sizes: d = 17,408, the embedded model's shared adapter (split scheme, rank 8); d = 2,442,240,
SmolLM2-135M's (rank-8 LoRA on q, k, v, o, gate, up, down of its 30 layers: hidden 576, key/value 192,
MLP 1,536). Columns:

* ``client s/user``: CPU seconds one user spends on the protocol in a round (the four stages: key
  generation and agreement, Shamir sharing, AES-GCM, clipping/quantizing, mask expansion, state files);
  plain FedAvg spends none;
* ``server s``: the server's CPU seconds for the round (SecAgg+ server, message packing and unpacking,
  decoding) against FedAvg's ``aggregate_train``;
* ``up KB/user``, ``down KB/user``: payload bytes a user sends and receives in the round (all stages;
  down includes the global tensors, as in plain FedAvg; keys and framing not counted).

Accuracy (``--accuracy``): the default scenario (or ``--accuracy-set key=value`` overrides) simulated on
Ray twice, with and without ``secure-aggregation``, or read from two finished runs' output folders
(``--accuracy-from PLAIN_OUT SECURE_OUT``, e.g. two ``fedpersona simulate`` runs).

Usage::

    .venv/bin/python benchmarks/secure_aggregation.py                          # the cost grid
    .venv/bin/python benchmarks/secure_aggregation.py --users 10 50 --dims embedded
    .venv/bin/python benchmarks/secure_aggregation.py --users --accuracy-from runs/plain runs/secure
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedpersona.client import secure as client_secure
from fedpersona.client.cohort import cohort_of
from fedpersona.config import RunConfig
from fedpersona.protocol import SECAGG_REQUEST, cohort_key
from fedpersona.round.user_store import UserStore
from fedpersona.secagg import messages as m
from fedpersona.server.secure import SecureAggregationGrid, SecureSettings
from fedpersona.server.user_grid import UserGrid, user_of

SMOLLM2 = {"layers": 30, "hidden": 576, "kv": 192, "mlp": 1536}


def embedded_shapes() -> dict[str, tuple[int, ...]]:
    """The embedded model's shared tensors (the default split scheme), from the resident model."""
    from fedpersona.model.adapters import Role
    from fedpersona.round.resident import resident_for

    return {k: tuple(v.shape) for k, v in resident_for(RunConfig()).adapters.tensors(Role.SHARED).items()}


def smollm2_shapes(rank: int = 8) -> dict[str, tuple[int, ...]]:
    """SmolLM2-135M's rank-``rank`` LoRA tensors on all seven linear layers of each block."""
    h, kv, mlp = SMOLLM2["hidden"], SMOLLM2["kv"], SMOLLM2["mlp"]
    out: dict[str, tuple[int, ...]] = {}
    for layer in range(SMOLLM2["layers"]):
        for name, (d_in, d_out) in {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, mlp),
                                    "up": (h, mlp), "down": (mlp, h)}.items():
            out[f"layers.{layer}.{name}.lora_A"] = (rank, d_in)
            out[f"layers.{layer}.{name}.lora_B"] = (d_out, rank)
    return out


class BenchPool:
    """Simulation nodes in process: cohort messages answered by ``fedpersona.client.secure`` with a synthetic
    update in place of training; client CPU seconds counted apart."""

    def __init__(self, d: int, seed: int, nodes: int = 2) -> None:
        self.nodes, self.d, self.rng = list(range(11, 11 + nodes)), d, np.random.default_rng(seed)
        self.replies: dict[str, Message] = {}
        self.client_seconds, self.count = 0.0, 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def _update(self) -> tuple[np.ndarray, float]:
        direction = self.rng.standard_normal(self.d)
        return direction / np.linalg.norm(direction) * self.rng.uniform(0.5, 1.5), float(self.rng.integers(8, 161))

    def _answer(self, msg: Message) -> RecordDict:
        users, store = cohort_of(msg)
        first = msg.content.config_records[cohort_key(users[0], SECAGG_REQUEST)]
        if first[m.STAGE] != m.MASKED_INPUT:  # the real cohort handler, state files included
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={}, state=RecordDict(),
                              run_config={})
            return client_secure.answer_message(msg, context)
        plan = client_secure.plan_of(msg.content)
        parts: dict[int, Any] = {}
        for user in users:
            request = dict(msg.content.config_records[cohort_key(user, SECAGG_REQUEST)])
            secrets = client_secure.SecretFile(store.root / client_secure.STORE_FOLDER / f"{user}.json")
            parts[user] = client_secure.answer(request, secrets, self._update, plan, self.d)
        return client_secure.pack_cohort_reply(parts)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = f"b{self.count}"
            started = time.process_time()
            self.replies[msg.metadata.message_id] = Message(self._answer(msg), reply_to=msg)
            self.client_seconds += time.process_time() - started
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def global_arrays(shapes: dict[str, tuple[int, ...]], seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array((rng.standard_normal(s) * 0.05).astype(np.float32)) for k, s in shapes.items()})


def secure_row(n: int, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, float]:
    """One secure round of ``n`` users; client/server CPU seconds and bytes per user."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    arrays = global_arrays(shapes, seed)
    d = sum(int(np.prod(s)) for s in shapes.values())
    config = RunConfig(num_users=n, fraction_train=1.0, secure_aggregation=True)
    store = UserStore.create(tempfile.mkdtemp(prefix="fp-secagg-bench-"))
    pool = BenchPool(d, seed)
    reports: list[Any] = []
    grid = SecureAggregationGrid(UserGrid(pool, num_users=n, cohort_size=16, store=str(store.root), pool_size=2),
                                 SecureSettings.from_config(config), on_round=reports.append)
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=n, min_train_nodes=n)
    random.seed(seed)
    try:
        started = time.process_time()
        messages = strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid)
        replies = list(grid.send_and_receive(messages, timeout=3600))
        strategy.aggregate_train(1, replies)
        total = time.process_time() - started
    finally:
        store.remove()
    (report,) = reports
    if report.failed:
        raise RuntimeError(f"the secure round failed: {report.failed}")
    return {"client": pool.client_seconds / n, "server": total - pool.client_seconds,
            "up": report.bytes_up / n / 1e3, "down": report.bytes_down / n / 1e3}


def plain_row(n: int, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, float]:
    """FedAvg's aggregation of ``n`` replies of these shapes; bytes a plain user sends and receives."""
    arrays = global_arrays(shapes, seed + 1)
    anchor = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    anchor.metadata.__dict__["_message_id"] = "anchor"
    rng = np.random.default_rng(seed)
    metrics = [MetricRecord({"num-examples": int(rng.integers(8, 161)), "declined": 0, "train-steps": 16})
               for _ in range(n)]
    replies = [Message(RecordDict({"arrays": arrays, "metrics": metrics[i]}), reply_to=anchor) for i in range(n)]
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=n, min_train_nodes=n)
    started = time.process_time()
    strategy.aggregate_train(1, replies)
    server = time.process_time() - started
    payload = sum(len(arrays[k].data) for k in arrays.keys())
    return {"client": 0.0, "server": server, "up": (payload + 3 * 8 + 24) / 1e3, "down": payload / 1e3}


def cost_table(users: list[int], dims: list[str], seed: int) -> None:
    header = (f"{'model':<9} {'d':>9} {'n':>5} | {'secure client s/user':>20} {'server s':>9} {'up KB/user':>10} "
              f"{'down KB/user':>12} | {'plain server s':>14} {'up KB/user':>10} {'down KB/user':>12}")
    print(header)
    print("-" * len(header))
    for name in dims:
        shapes = embedded_shapes() if name == "embedded" else smollm2_shapes()
        d = sum(int(np.prod(s)) for s in shapes.values())
        for n in users:
            secure, plain = secure_row(n, shapes, seed), plain_row(n, shapes, seed)
            print(f"{name:<9} {d:>9} {n:>5} | {secure['client']:>20.4f} {secure['server']:>9.3f} "
                  f"{secure['up']:>10.1f} {secure['down']:>12.1f} | {plain['server']:>14.3f} {plain['up']:>10.1f} "
                  f"{plain['down']:>12.1f}", flush=True)


def accuracy_table(outs: list[Path] | None, overrides: list[str]) -> None:
    """Personalized and global accuracy with and without secure aggregation (runs, or two finished runs)."""
    summaries = {}
    if outs:
        for label, out in zip(("plain", "secure"), outs, strict=True):
            summaries[label] = json.loads((Path(out) / "summary.json").read_text())
    else:
        import fedpersona as fp

        settings = dict(item.split("=", 1) for item in overrides)
        for label, secure in (("plain", False), ("secure", True)):
            result = fp.simulate(RunConfig.from_flat({**settings, "secure-aggregation": secure}, source="--accuracy-set"))
            summaries[label] = result.summary
    print(f"{'run':<7} {'personalized':>12} {'global':>8} {'p10 personalized':>16} {'wall s':>8}")
    for label, summary in summaries.items():
        print(f"{label:<7} {summary['personalized_accuracy_mean']:>12.4f} {summary['global_accuracy_mean']:>8.4f} "
              f"{summary['personalized_accuracy_p10']:>16.4f} {summary['wall_seconds']:>8.1f}")
    plain, secure = summaries["plain"], summaries["secure"]
    print(f"difference: personalized {secure['personalized_accuracy_mean'] - plain['personalized_accuracy_mean']:+.4f}, "
          f"global {secure['global_accuracy_mean'] - plain['global_accuracy_mean']:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="*", default=[10, 50, 200, 1000],
                        help="users per round (none: skip the cost table)")
    parser.add_argument("--dims", nargs="+", choices=("embedded", "smollm2"), default=["embedded", "smollm2"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accuracy", action="store_true", help="simulate both ways and print the accuracies")
    parser.add_argument("--accuracy-set", action="append", default=[], help="a setting of the accuracy runs")
    parser.add_argument("--accuracy-from", nargs=2, type=Path, metavar=("PLAIN_OUT", "SECURE_OUT"),
                        help="print the accuracies of two finished runs instead of simulating")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.users:
        cost_table(args.users, args.dims, args.seed)
    if args.accuracy or args.accuracy_from:
        accuracy_table(args.accuracy_from, args.accuracy_set)


if __name__ == "__main__":
    main()
