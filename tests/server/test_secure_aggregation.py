"""Secure aggregation in a simulation, in process: FedAvg's strategy, the real UserGrid (users packed into
cohort messages) and the real ClientApp answering each cohort, as on Ray but without it.

The pool below the UserGrid records every message the server receives. The proof: those messages hold
only the protocol's records, no user's update (its bytes appear nowhere; its masked vector does not
correlate with it), while the aggregated adapter equals plain FedAvg's on the same users within the
documented quantization error.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp.strategy import FedAvg

from fedpersona.client.app import app as client_app
from fedpersona.config import RunConfig
from fedpersona.model.adapters import Role
from fedpersona.protocol import SECAGG_REPLY, SECAGG_VECTOR, cohort_key
from fedpersona.round.user_store import UserStore
from fedpersona.secagg import QuantizationPlan
from fedpersona.secagg import messages as m
from fedpersona.secagg.quantize import from_field
from fedpersona.secagg.wire import unpack_vector
from fedpersona.server.secure import SECURE_TRAIN, SecureAggregationGrid, SecureSettings, flatten
from fedpersona.server.user_grid import USER_NODE_BASE, UserGrid, user_of

USERS = 6
CONFIG = RunConfig(num_users=USERS, min_steps=2, epochs=1, gen_prompts=0, fraction_train=1.0, secure_aggregation=True)


class Pool:
    """Simulation nodes in process: each cohort message is answered by the real ClientApp; every reply the
    server receives is kept (``received``); ``tamper(reply) -> reply`` plays a misbehaving network/user."""

    def __init__(self, nodes=(11, 12), tamper=None):
        self.nodes, self.replies, self.received, self.tamper, self.count = list(nodes), {}, [], tamper, 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.count}"
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={}, state=RecordDict(),
                              run_config={})
            reply = client_app(msg, context)
            self.replies[msg.metadata.message_id] = self.tamper(reply) if self.tamper else reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        out = [self.replies.pop(i) for i in list(ids) if i in self.replies]
        self.received.extend(out)
        return out


@pytest.fixture(autouse=True, scope="module")
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def initial():
    """The run's initial shared tensors (a copy: the resident model's change as users train)."""
    from fedpersona.round.resident import resident_for

    tensors = resident_for(CONFIG).adapters.tensors(Role.SHARED)
    return ArrayRecord({k: v.detach().clone() for k, v in tensors.items()})


def train_round(initial, secure: bool, tamper=None, config: RunConfig = CONFIG):
    """One training round of FedAvg over all users; (replies the strategy got, aggregate, pool, reports)."""
    pool = Pool(tamper=tamper)
    parent = tempfile.mkdtemp(prefix="fp-secagg-test-")
    store = UserStore.create(parent)
    grid = UserGrid(pool, num_users=config.num_users, cohort_size=16, store=str(store.root), pool_size=2)
    reports = []
    if secure:
        grid = SecureAggregationGrid(grid, SecureSettings.from_config(config), on_round=reports.append)
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=2, min_train_nodes=2)
    random.seed(0)  # Flower samples with `random`: the same users in the same order, so the same cohorts train
    try:
        messages = strategy.configure_train(1, initial, ConfigRecord({**config.to_flat(), "server-round": 1}), grid)
        replies = list(grid.send_and_receive(messages, timeout=600))
        aggregate = strategy.aggregate_train(1, replies)[0] if replies else None
    finally:
        shutil.rmtree(parent, ignore_errors=True)  # the store and the folder it was made in
    return replies, aggregate, pool, reports


@pytest.fixture(scope="module")
def plain(initial):
    """Plain FedAvg on the same users: each user's own reply (its update) and the average."""
    replies, aggregate, _, _ = train_round(initial, secure=False)
    assert len(replies) == USERS and not any(r.has_error() for r in replies)
    return {user_of(r.metadata.src_node_id): r for r in replies}, aggregate


def weighted_updates(plain_replies, initial, users):
    base = flatten(initial)
    return {u: plain_replies[u].content["metrics"]["num-examples"] * (flatten(plain_replies[u].content["arrays"]) - base)
            for u in users}


def test_the_server_receives_no_individual_update_and_gets_fedavgs_average(initial, plain):
    plain_replies, plain_average = plain
    replies, aggregate, pool, (report,) = train_round(initial, secure=True)

    # the strategy got one reply: the sum's average, and nothing per user
    assert len(replies) == 1 and report.failed is None and report.included == USERS
    (reply,) = replies
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert set(reply.content["metrics"].keys()) == {"num-examples", "secagg-weight-sum", "secagg-users"}
    weight_sum = sum(r.content["metrics"]["num-examples"] for r in plain_replies.values())
    assert reply.content["metrics"]["secagg-weight-sum"] == pytest.approx(weight_sum, abs=USERS / 1e5)

    # the aggregate equals plain FedAvg's within the documented quantization error (n / s on the weighted sum,
    # divided by the weight sum; float32 rounding of the stored adapter on top)
    plan = SecureSettings.from_config(CONFIG).plan({}, USERS)
    bound = plan.error_bound(USERS) / weight_sum
    secure, reference = flatten(aggregate), flatten(plain_average)
    assert np.abs(secure - reference).max() <= bound + 1e-6, (np.abs(secure - reference).max(), bound)
    assert np.abs(reference - flatten(initial)).max() > 100 * bound  # the users did move the adapter

    # every message the server received: protocol records only, addressed per user; no metrics, no tensors
    updates = weighted_updates(plain_replies, initial, plain_replies)
    secrets = [a.tobytes() for r in plain_replies.values() for a in r.content["arrays"].to_numpy_ndarrays()
               if a.size >= 16 and np.any(a != 0)]
    secrets += [u.astype(np.float32).tobytes()[:4096] for u in updates.values()]
    masked = {}
    assert {msg.metadata.message_type for msg in pool.received} >= {SECURE_TRAIN}
    for msg in pool.received:
        assert msg.metadata.message_type == SECURE_TRAIN and not msg.has_error()
        content = msg.content
        assert not content.metric_records, "a user's metrics reached the server"
        for key in content.keys():
            user = int(key.split(".", 1)[0].removeprefix("user-"))
            assert key in (cohort_key(user, SECAGG_REPLY), cohort_key(user, SECAGG_VECTOR)), key
            if key == cohort_key(user, SECAGG_VECTOR):
                packed = content[key][m.MASKED_VECTOR].numpy()
                masked[user] = from_field(unpack_vector(packed, packed.shape[0], 32), 32).astype(np.float64)
        wire = recorddict_to_proto(content).SerializeToString()
        assert not any(secret in wire for secret in secrets), "an individual update reached the server"
    assert sorted(masked) == sorted(plain_replies)

    # a masked vector does not correlate with its user's update; the unmasked encoding would (the test's power)
    rng = np.random.default_rng(0)
    for user, vector in masked.items():
        update, weight = updates[user], plain_replies[user].content["metrics"]["num-examples"]
        encoded = from_field(plan.encode(update / weight, weight, rng), 32)
        assert np.corrcoef(encoded[:-1].astype(np.float64), update)[0, 1] > 0.99
        assert abs(np.corrcoef(vector[:-1], update)[0, 1]) < 0.05, user


def test_a_simulated_secure_round_repeats_with_the_same_seed(initial):
    """Simulated users seed their stochastic rounding from the run's seed, user and round, so a simulation
    repeats to the bit (a device keeps fresh randomness); another seed gives another run."""
    first = flatten(train_round(initial, secure=True)[1])
    again = flatten(train_round(initial, secure=True)[1])
    assert np.array_equal(first, again)
    other = flatten(train_round(initial, secure=True, config=CONFIG.replace(seed=1))[1])
    assert not np.array_equal(first, other)


def test_a_reply_breaking_the_protocol_is_dropped_and_the_round_aggregates_the_others(initial, plain):
    plain_replies, _ = plain
    victim = sorted(plain_replies)[0]

    def tamper(reply):  # user `victim` adds its metrics to its share-keys reply: refused, it drops out
        key = cohort_key(victim, SECAGG_REPLY)
        if key in reply.content and reply.content[key].get(m.STAGE) == m.SHARE_KEYS:
            reply.content[cohort_key(victim, "metrics")] = MetricRecord({"num-examples": 12})
        return reply

    replies, aggregate, _, (report,) = train_round(initial, secure=True, tamper=tamper)
    assert report.failed is None and report.included == USERS - 1
    assert report.refused == {"share-keys: protocol-error": 1}
    others = [u for u in plain_replies if u != victim]
    updates = weighted_updates(plain_replies, initial, others)
    weight_sum = sum(plain_replies[u].content["metrics"]["num-examples"] for u in others)
    expected = flatten(initial) + sum(updates.values()) / weight_sum
    bound = SecureSettings.from_config(CONFIG).plan({}, USERS).error_bound(USERS - 1) / weight_sum
    assert np.abs(flatten(aggregate) - expected).max() <= bound + 1e-6


def test_a_corrupted_share_ends_the_round_without_a_sum(initial):
    owner = USER_NODE_BASE  # user 0: every share of its self-mask seed is corrupted in transit

    def tamper(reply):
        for key in list(reply.content.keys()):
            record = reply.content[key]
            if key.endswith(SECAGG_REPLY) and record.get(m.STAGE) == m.UNMASK:
                owners, shares = list(record[m.SELF_MASK_OWNERS]), list(record[m.SELF_MASK_SHARES])
                i = owners.index(owner)
                shares[i] = shares[i][:-1] + bytes([shares[i][-1] ^ 1])
                record[m.SELF_MASK_SHARES] = shares
        return reply

    replies, aggregate, _, (report,) = train_round(initial, secure=True, tamper=tamper)
    assert replies == [] and aggregate is None  # Strategy.start keeps the global adapter
    assert report.failed and "self-mask" in report.failed, report.failed


def test_a_simulated_federation_with_user_level_dp_on_the_sum(tmp_path):
    from fedpersona.server.federation import run_federation

    config = RunConfig(num_users=4, rounds=1, min_steps=2, epochs=1, gen_prompts=0, fraction_train=1.0,
                       secure_aggregation=True, user_dp_noise=0.3, user_dp_clip=1.0, user_dp_delta=1e-3)
    result = run_federation(Pool(), config, out_dir=tmp_path, pool_size=2)
    row = result.rounds[0]
    assert row["train_replies"] == 4 and row["secure_aggregation_dropped"] == 0, row
    assert row["secure_aggregation_failed"] is None and row["eval_users"] == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and summary["secure_aggregation_failed_rounds"] == 0
    assert summary["user_level_epsilon"] is not None
    assert 0 < summary["bytes_up_per_client_round"] < 2 * 4 * 17_409 + 10_000  # a float32-sized masked vector


@pytest.mark.parametrize("argv", [
    ["simulate", "--set", "secure-aggregation=true", "--strategy", "Krum"],
    ["simulate", "--set", "secure-aggregation=true", "--set", "strategy=FedTrimmedAvg(beta=0.2)"],
    ["server", "--secure-aggregation", "--strategy", "FedMedian", "--insecure"],
])
def test_a_strategy_that_needs_each_update_is_refused_in_one_line(cli, argv, tmp_path):
    code, out, err = cli(*argv, "--out" if argv[0] == "simulate" else "--state", str(tmp_path / "x"))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "secure-aggregation" in lines[0] and "sum" in lines[0], err
    assert not (tmp_path / "x").exists()
