"""User-level DP: the device clips its shared update when asked, and the epsilon is accounted over rounds."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpersona.client.app import app as client_app
from fedpersona.config import RunConfig
from fedpersona.model.adapters import Role
from fedpersona.privacy.accountant import epsilon
from fedpersona.privacy.user_level import CLIPPING_NORM_KEY, user_level_report

CONFIG = RunConfig(num_users=3, min_steps=2, epochs=1, user_dp_noise=1.0, user_dp_clip=0.05)


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _train(shared, extra):
    config = ConfigRecord({**CONFIG.to_flat(), "server-round": 1, **extra})
    msg = Message(content=RecordDict({"arrays": ArrayRecord(shared), "config": config}), dst_node_id=3,
                  message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=3, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error
    return reply.content


def _update_norm(content, shared):
    sent = content.array_records["arrays"].to_numpy_ndarrays()
    return float(np.sqrt(sum(((a - b.numpy()) ** 2).sum() for a, b in zip(sent, shared.values()))))


def test_update_is_clipped_only_when_the_server_asks(split_resident):
    shared = split_resident.adapters.tensors(Role.SHARED)
    unclipped = _train(shared, {})
    assert _update_norm(unclipped, shared) > 0.05  # a real update is larger than the clip we will ask for
    clipped = _train(shared, {CLIPPING_NORM_KEY: 0.05})
    assert _update_norm(clipped, shared) == pytest.approx(0.05, rel=1e-4)
    metrics = clipped.metric_records["metrics"]
    assert metrics["num-examples"] == 1 and "train-steps" not in metrics  # constant weighting, no data size


def test_user_level_epsilon_composes_rounds_with_sampling():
    report = user_level_report(noise_multiplier=1.0, num_sampled=10, num_users=100, rounds=50, delta=1e-3)
    assert report["user_level_epsilon"] == pytest.approx(epsilon(1.0, 0.1, 50, 1e-3))
    assert report["user_level_epsilon_no_amplification"] == pytest.approx(epsilon(1.0, 1.0, 50, 1e-3))
    assert report["user_level_epsilon"] < report["user_level_epsilon_no_amplification"]
    more = user_level_report(noise_multiplier=1.0, num_sampled=10, num_users=100, rounds=100, delta=1e-3)
    assert more["user_level_epsilon"] > report["user_level_epsilon"]
