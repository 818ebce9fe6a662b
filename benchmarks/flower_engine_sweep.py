"""Flower simulation engine: the cost of one message sweep over N nodes (a reproduction for Flower's tracker).

Flower 1.41's simulation engine (``flwr/server/superlink/fleet/vce/vce_api.py``) feeds its workers from
``add_messages_to_queue``, a loop that, forever, calls ``state.get_message_ins(node_id=node_id, limit=1)``
for every node id in the nodes mapping and then waits 0.1 s. With the in-memory LinkState the simulation
uses (``flwr/server/superlink/linkstate/in_memory_linkstate.py``), every ``get_message_ins`` call walks the
message store from the start under the state lock, running ``_check_stored_messages`` (TTL and federation
checks) on each message it passes, until it finds an undelivered message for that node. A round stores
one instruction message per sampled node, and those messages stay in the store until the ServerApp pulls
the replies, so one sweep costs O(nodes x messages). This script builds exactly that state with Flower's
own code, as ``flwr/simulation/run_simulation.py`` and ``vce_api.start_vce`` do (``LinkStateFactory`` on
the in-memory database with the ``NoOpFederationManager``, the run pre-registered with its primary task,
nodes registered by ``vce_api._register_nodes``, one ``MessageType.TRAIN`` message per node pushed through
``InMemoryGrid.push_messages``; no Ray, no ClientApp), and times one full sweep done as
``add_messages_to_queue`` does it: once while the messages are undelivered (the sweep that dispatches a
round: node i's message is found after i messages, about N^2/2 visits) and once after all were delivered
(every later sweep of the round, while the clients work: each node walks all N messages, N^2 visits and
nothing found). Both grow about 100x per 10x nodes at a constant few microseconds per node-message visit:
on a 2-core CPU machine (flwr 1.41.0, default nodes) the delivered sweep took 0.05 s at 100 nodes, 0.34 s
at 300 and 4.2 s at 1,000 (so about 7 minutes at 10,000 by extrapolation), the undelivered one about half
that. From a few hundred nodes on, then, the loop never rests in its 0.1 s wait: one thread walks the
store continuously, holding the state lock (which ``store_message_res`` and the ServerApp's pulls also
need) for a whole walk per node and taking the GIL from the ServerApp and the workers, and the last
node's instruction reaches the worker queue a whole undelivered sweep after the round pushed it (seconds
at 1,000 nodes, minutes at 10,000). That is why fedpersona's simulations do not make each simulated
user a Flower node: ``fedpersona/server/user_grid.py`` shows the strategy one virtual node per user and
sends cohorts of users to a small pool of real simulation nodes (about one per actor slot), so the engine
sweeps a handful of nodes and messages whatever the population.

Usage::

    python benchmarks/flower_engine_sweep.py                       # nodes 100 300 1000 (seconds)
    python benchmarks/flower_engine_sweep.py --nodes 100 1000 10000  # 10,000 takes minutes
    python benchmarks/flower_engine_sweep.py --nodes 300 --repeats 3 --out /tmp/sweep.json

Prints a table (nodes, messages, seconds per sweep undelivered and delivered, seconds per node, cost per
node-message visit, growth per 10x nodes against the previous row) and a least-squares fit of the growth
over all rows, and writes the same figures to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import cast

import flwr
from flwr.app import Message, MessageType, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid


def build_state(num_nodes: int) -> tuple[InMemoryLinkState, dict[int, int], list[str]]:
    """The link state of a simulation with ``num_nodes`` nodes and one round's messages pushed to it.

    Mirrors ``run_simulation`` (run and primary task pre-registered in a fresh in-memory state,
    ``TaskIdentity`` set so that ``Message`` takes the run id and the SuperLink as source), ``start_vce``
    (``_register_nodes``: nodes created and marked online) and a ServerApp round (one TRAIN message per
    node through ``InMemoryGrid.push_messages``, which sets the message id and stores it).
    """
    state_factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID

    state = cast(InMemoryLinkState, state_factory.state())
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=state_factory)
    grid.set_run(run)

    nodes_mapping = _register_nodes(num_nodes=num_nodes, state_factory=state_factory)
    messages = [Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
                for node_id in nodes_mapping]
    message_ids = list(grid.push_messages(messages))
    if len(message_ids) != num_nodes or len(state.message_ins_store) != num_nodes:
        raise SystemExit(f"{num_nodes} nodes: only {len(message_ids)} of {num_nodes} messages were stored")
    return state, nodes_mapping, message_ids


def sweep(state: InMemoryLinkState, nodes_mapping: dict[int, int]) -> tuple[float, int]:
    """One pass of ``vce_api.add_messages_to_queue``'s loop (without its 0.1 s wait): seconds, messages."""
    found = 0
    started = time.perf_counter()
    for node_id in nodes_mapping.keys():
        message_ins_list = state.get_message_ins(node_id=node_id, limit=1)
        found += len(message_ins_list)
    return time.perf_counter() - started, found


def measure(num_nodes: int, repeats: int) -> dict:
    state, nodes_mapping, _ = build_state(num_nodes)
    undelivered, delivered = [], []
    for repeat in range(repeats):
        if repeat:  # undeliver again, as if the round had just been pushed
            for message in state.message_ins_store.values():
                message.metadata.delivered_at = ""
        seconds, found = sweep(state, nodes_mapping)
        if found != num_nodes:
            raise SystemExit(f"{num_nodes} nodes: the undelivered sweep found {found} messages")
        undelivered.append(seconds)
        seconds, found = sweep(state, nodes_mapping)
        if found != 0:
            raise SystemExit(f"{num_nodes} nodes: the delivered sweep found {found} messages")
        delivered.append(seconds)
    messages = len(state.message_ins_store)
    best_undelivered, best_delivered = min(undelivered), min(delivered)
    return {
        "nodes": num_nodes,
        "messages": messages,
        "undelivered_seconds": best_undelivered,
        "delivered_seconds": best_delivered,
        "delivered_seconds_per_node": best_delivered / num_nodes,
        # node-message visits: node i finds its message after i + 1 (undelivered), walks all (delivered)
        "undelivered_us_per_visit": 1e6 * best_undelivered / (num_nodes * (num_nodes + 1) / 2),
        "delivered_us_per_visit": 1e6 * best_delivered / (num_nodes * messages),
        "undelivered_seconds_all": undelivered,
        "delivered_seconds_all": delivered,
    }


def growth_per_10x(xs: list[float], ys: list[float]) -> float | None:
    """10 ** (least-squares slope of log10 y on log10 x): the factor per 10x nodes (100 = quadratic)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    lx, ly = [math.log10(x) for x in xs], [math.log10(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return 10 ** slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 300, 1000],
                        help="node counts to measure (10000 takes minutes)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="sweeps of each kind per node count (the fastest is kept)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark-engine-sweep/sweep.json"))
    args = parser.parse_args()

    results = []
    for num_nodes in sorted(set(args.nodes)):
        results.append(measure(num_nodes, max(1, args.repeats)))

    print(f"flwr {flwr.__version__}, in-memory LinkState, one sweep of add_messages_to_queue "
          f"(get_message_ins(node_id, limit=1) for every node)")
    header = (f"{'nodes':>7} {'messages':>8} {'s/sweep undelivered':>19} {'s/sweep delivered':>17} "
              f"{'s/node delivered':>16} {'us/visit':>8} {'growth/10x':>10}")
    print(header)
    previous = None
    for r in results:
        growth = (growth_per_10x([previous["nodes"], r["nodes"]],
                                 [previous["delivered_seconds"], r["delivered_seconds"]]) if previous else None)
        r["delivered_growth_per_10x_vs_previous"] = growth
        print(f"{r['nodes']:>7} {r['messages']:>8} {r['undelivered_seconds']:>19.4f} {r['delivered_seconds']:>17.4f} "
              f"{r['delivered_seconds_per_node']:>16.2e} {r['delivered_us_per_visit']:>8.2f} "
              f"{(f'{growth:.0f}x' if growth else '-'):>10}")
        previous = r
    xs = [r["nodes"] for r in results]
    fit = {"undelivered_growth_per_10x": growth_per_10x(xs, [r["undelivered_seconds"] for r in results]),
           "delivered_growth_per_10x": growth_per_10x(xs, [r["delivered_seconds"] for r in results])}
    if fit["delivered_growth_per_10x"]:
        print(f"fitted growth per 10x nodes: undelivered {fit['undelivered_growth_per_10x']:.0f}x, "
              f"delivered {fit['delivered_growth_per_10x']:.0f}x (10x = linear, 100x = nodes x messages)")
    print("us/visit: delivered seconds / (nodes x messages); growth/10x: delivered sweep against the row above")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "flwr": flwr.__version__,
                                    "python": platform.python_version(), "cpus": os.cpu_count(),
                                    "repeats": args.repeats, "results": results, "fit": fit}, indent=2))
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
