"""Bounded influence on real Flower Messages and strategies (issue 23, item 2): honest heterogeneity passes,
a replier cannot pick which reply is dropped, one reply's weight and update are bounded, the clip bound
comes from earlier rounds only, and what the log says about a reply is bounded in size."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedpersona.config import RunConfig
from fedpersona.server.recorder import RoundRecorder, attach_recorder
from fedpersona.server.reply_names import ReplyNames
from fedpersona.server.resume import recorder_totals, restore_recorder_totals
from fedpersona.strategies.influence import InfluenceBounds, a_priori_update_norm
from fedpersona.strategies.registry import build_strategy
from fedpersona.strategies.validation import ReplyScreen, ScreenSettings, TensorSpec, update_norm

SENT = {"a": np.zeros((4, 3), dtype=np.float32), "b": np.full(3, 0.5, dtype=np.float32)}
SPEC = TensorSpec.of(ArrayRecord({k: Array(v) for k, v in SENT.items()}))
BASE = {k: v.astype(np.float64) for k, v in SENT.items()}


def reply(update_scale: float, *, seed: int = 0, node: int = 100, weight: float = 16, direction=None,
          kind: str = MessageType.TRAIN, **metrics) -> Message:
    """A training reply moving the sent tensors by a random (or given) direction of norm ``update_scale``."""
    rng = np.random.default_rng(seed)
    d = direction or {k: rng.standard_normal(v.shape) for k, v in SENT.items()}
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in d.values()))
    arrays = {k: (SENT[k] + update_scale * d[k] / norm).astype(np.float32) for k in SENT}
    request = Message(content=RecordDict({}), dst_node_id=node, message_type=kind)
    request.metadata.__dict__["_message_id"] = f"m{node}"
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": weight, "train-steps": 16, **metrics})})
    return Message(content, reply_to=request)


def sent() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in SENT.items()})


def norm_of(msg: Message) -> float:
    return update_norm(msg.content["arrays"], BASE)


def fedavg(screen: ReplyScreen, recorder_kwargs=None):
    config = RunConfig(num_users=8, fraction_train=1.0)
    strategy = build_strategy("FedAvg", config=config, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    recorder = RoundRecorder(num_rounds=10, eval_every=10, out_dir=None, screen=screen, **(recorder_kwargs or {}))
    strategy = attach_recorder(strategy, recorder)

    class Grid:
        def get_node_ids(self):
            return list(range(100, 120))

    strategy.configure_train(1, sent(), ConfigRecord(), Grid())
    return strategy, recorder


def aggregate_update(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([(arrays[k].numpy().astype(np.float64) - BASE[k]).ravel() for k in SENT])


def direction_of(msg: Message) -> np.ndarray:
    return aggregate_update(msg.content["arrays"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------- honest replies

def test_honest_heterogeneous_replies_are_all_kept():
    """The default simulation's last round: half the users' updates near zero (their private heads fitted
    their pairs), the others 0.4-1.4, weights 8-160. The old screen cut at 10x the median of the others and
    dropped the users who trained most; nothing honest is rejected now, and nothing is clipped."""
    norms = [0.0016, 0.002, 0.0025, 0.003, 0.005, 0.007, 0.01, 0.02, 0.05, 0.08, 0.43, 0.6, 0.8, 0.95, 1.2, 1.36]
    weights = [8, 8, 12, 16, 20, 24, 24, 30, 36, 40, 48, 60, 80, 94, 120, 156]
    screen = ReplyScreen(SPEC, ScreenSettings(bounds=InfluenceBounds(initial_update_norm=2.1)))
    out = screen.train([reply(n, seed=i, node=100 + i, weight=w) for i, (n, w) in enumerate(zip(norms, weights))],
                       sent(), server_round=15)
    assert not out.rejected and len(out.accepted) == 16
    assert out.clipped == 0 and [norm_of(m) for m in out.accepted] == pytest.approx(norms, rel=1e-4)
    assert out.weight_capped == 1  # 156 > 4 x the median weight (33): one reply's weight capped, not dropped


# ---------------------------------------------------------------------------------------------- ties and votes

@pytest.mark.parametrize("attacker_first", [True, False])
def test_an_extra_metric_key_cannot_get_the_honest_reply_rejected(attacker_first):
    """Two devices: the attacker adds a metric key and sends a x1e6 update. Metric keys come from the
    protocol, not a vote: the attacker is rejected, the honest reply aggregated (the old screen broke the tie
    by sorting the key sets, so the honest reply was dropped and the attacker's update became the model)."""
    honest = reply(0.5, seed=1, node=101)
    attacker = reply(5e5, seed=2, node=102, **{"a-sneaky-key": 1.0})
    strategy, recorder = fedavg(ReplyScreen(SPEC))
    arrays, _ = strategy.aggregate_train(1, [attacker, honest] if attacker_first else [honest, attacker])
    assert recorder.rows[-1]["train_rejected_reasons"] == {"bad-metric": 1}
    assert recorder.rows[-1]["train_rejected_by"] == [["node 102", "bad-metric"]]
    assert np.linalg.norm(aggregate_update(arrays)) == pytest.approx(0.5, rel=1e-4)


# ---------------------------------------------------------------------------------------------- weight

@pytest.mark.parametrize("claimed", [99_999, 100_000])
def test_an_inflated_weight_is_capped_relative_to_the_round(claimed):
    """A sign-flipped update claiming 99,999 pairs (or the 1e5 cap) beside honest weights of about 16 took
    99.9% of the average; capped at 4 x the round's median weight it is one weight among others, and the
    aggregate still points where the honest users point."""
    rng = np.random.default_rng(5)
    common = {k: rng.standard_normal(v.shape) for k, v in SENT.items()}
    honest = [reply(0.5, node=100 + i, weight=w,
                    direction={k: common[k] + 0.3 * rng.standard_normal(v.shape) for k, v in SENT.items()})
              for i, w in enumerate((14, 16, 18, 16, 15, 17, 16))]
    attacker = reply(0.5, node=199, weight=claimed, direction={k: -v for k, v in common.items()})
    honest_direction = np.concatenate([common[k].ravel() for k in SENT])
    strategy, recorder = fedavg(ReplyScreen(SPEC))
    arrays, _ = strategy.aggregate_train(1, [*honest, attacker])
    assert recorder.rows[-1]["train_rejected"] == 0 and recorder.rows[-1]["train_weight_capped"] == 1
    assert attacker.content["metrics"]["num-examples"] == 64.0  # 4 x the median weight, 16
    assert cosine(aggregate_update(arrays), honest_direction) > 0.5  # unbounded: -1.000, the attacker's way
    unbounded, _ = fedavg(ReplyScreen(SPEC, ScreenSettings(bounds=InfluenceBounds(update_norm_ratio=0,
                                                                                  reply_weight_ratio=0))))
    again = [reply(0.5, node=100 + i, weight=16, direction=common) for i in range(7)]
    flipped = reply(0.5, node=199, weight=claimed, direction={k: -v for k, v in common.items()})
    arrays, _ = unbounded.aggregate_train(1, [*again, flipped])
    assert cosine(aggregate_update(arrays), honest_direction) < -0.99


def test_under_user_level_dp_any_weight_but_one_is_rejected():
    screen = ReplyScreen(SPEC, ScreenSettings.from_config(RunConfig(user_dp_noise=0.5), shared_parameters=15))
    out = screen.train([reply(0.2, seed=1, node=101, weight=1), reply(0.2, seed=2, node=102, weight=3)], sent())
    assert out.rejected_reasons == {"bad-weight": 1} and len(out.accepted) == 1


# ---------------------------------------------------------------------------------------------- update norm

def test_the_clip_bound_comes_from_earlier_rounds_never_from_this_one():
    bounds = InfluenceBounds(update_norm_ratio=3.0, initial_update_norm=2.0)
    screen = ReplyScreen(SPEC, ScreenSettings(bounds=bounds))
    first = screen.train([reply(n, seed=i, node=100 + i) for i, n in enumerate((0.4, 0.5, 0.6, 1e6))], sent(), 1)
    assert first.update_norm_bound == 2.0 and first.clipped == 1  # round 1: the a-priori bound
    assert norm_of(first.accepted[-1]) == pytest.approx(2.0, rel=1e-5)  # clipped, kept, not rejected
    assert screen.reference.medians == [pytest.approx(0.55, rel=1e-4)]  # median of the clipped norms
    # round 2: 3 x round 1's median, whatever round 2's replies are (here a majority of huge ones)
    second = screen.train([reply(n, seed=i, node=100 + i) for i, n in enumerate((0.5, 1e3, 1e3, 1e3))], sent(), 2)
    assert second.update_norm_bound == pytest.approx(1.65, rel=1e-4)
    assert [norm_of(m) for m in second.accepted] == pytest.approx([0.5, 1.65, 1.65, 1.65], rel=1e-4)
    # the bound grows at most 3-fold a round even when the replies push it
    third = screen.train([reply(1e3, seed=i, node=100 + i) for i in range(4)], sent(), 3)
    assert third.update_norm_bound == pytest.approx(3 * 1.65, rel=1e-4)
    assert screen.train([reply(0.1)], sent(), 4).update_norm_bound == pytest.approx(3 * 3 * 1.65, rel=1e-4)


def test_a_fixed_bound_wins_and_zero_turns_clipping_off():
    fixed = ReplyScreen(SPEC, ScreenSettings(bounds=InfluenceBounds(max_update_norm=0.3, initial_update_norm=5.0)))
    out = fixed.train([reply(1.0, seed=1), reply(0.2, seed=2, node=101)], sent())
    assert [norm_of(m) for m in out.accepted] == pytest.approx([0.3, 0.2], rel=1e-4)
    off = ReplyScreen(SPEC, ScreenSettings(bounds=InfluenceBounds(update_norm_ratio=0, reply_weight_ratio=0)))
    out = off.train([reply(1e4, seed=1, weight=99_999), reply(0.2, seed=2, node=101)], sent())
    assert norm_of(out.accepted[0]) == pytest.approx(1e4, rel=1e-4) and out.accepted[0].content["metrics"][
        "num-examples"] == 99_999


def test_bounding_does_not_depend_on_the_order_of_the_replies():
    def replies():
        return [reply(n, seed=i, node=100 + i, weight=w)
                for i, (n, w) in enumerate(((0.3, 8), (0.9, 160), (50.0, 99_999), (0.5, 30), (0.7, 12)))]

    results = []
    for order in list(itertools.permutations(range(5)))[::17]:  # 8 orders of the 120
        strategy, _ = fedavg(ReplyScreen(SPEC, ScreenSettings(bounds=InfluenceBounds(initial_update_norm=1.0))))
        batch = replies()
        arrays, _ = strategy.aggregate_train(1, [batch[i] for i in order])
        results.append(aggregate_update(arrays))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-5, atol=1e-6)


def test_the_first_rounds_bound_is_where_min_steps_adamw_steps_can_go():
    assert a_priori_update_norm(1e-3, 17_408, 16) == pytest.approx(1e-3 * math.sqrt(17_408) * 16)
    assert a_priori_update_norm(1e-3, 100, 16, max_steps=8) == pytest.approx(1e-3 * 10 * 8)
    assert a_priori_update_norm(1e-3, 0, 16) == 0.0


def test_the_reference_survives_a_resume():
    screen = ReplyScreen(SPEC, ScreenSettings(bounds=InfluenceBounds(initial_update_norm=2.0)))
    recorder = RoundRecorder(num_rounds=5, eval_every=5, out_dir=None, screen=screen)
    recorder.record_train(1, screen.train([reply(0.4, seed=1), reply(9.0, seed=2, node=101)], sent(), 1))
    saved = recorder_totals(recorder)
    fresh = ReplyScreen(SPEC, ScreenSettings(bounds=InfluenceBounds(initial_update_norm=2.0)))
    resumed = RoundRecorder(num_rounds=5, eval_every=5, out_dir=None, screen=fresh)
    restore_recorder_totals(resumed, saved)
    assert fresh.reference.medians == screen.reference.medians == [pytest.approx(1.2, rel=1e-4)]
    assert resumed.summary_stats()["clipped_replies"] == 1


# ---------------------------------------------------------------------------------------------- the protocol

@pytest.mark.parametrize("settings", [{}, {"dp_epsilon": 8.0}, {"user_dp_noise": 0.5}])
def test_what_the_client_app_sends_passes_the_protocols_keys(settings):
    """The real ClientApp reply builder (fedpersona.client.app.train_reply) in each privacy mode."""
    from fedpersona.alignment.trainer import TrainStats
    from fedpersona.client.app import train_reply
    from fedpersona.round.train import RoundResult

    config = RunConfig(**settings)
    shared = {k: torch.from_numpy(v + 0.01) for k, v in SENT.items()}
    weight = 1 if config.user_dp_noise > 0 else 24
    content = train_reply(config, RoundResult(shared, weight, TrainStats(16, 24, 0.6), epsilon=1.5))
    request = Message(content=RecordDict({}), dst_node_id=100, message_type=MessageType.TRAIN)
    request.metadata.__dict__["_message_id"] = "m"
    screen = ReplyScreen(SPEC, ScreenSettings.from_config(config, SPEC.parameters))
    out = screen.train([Message(content, reply_to=request)], sent())
    assert not out.rejected and len(out.accepted) == 1


@pytest.mark.parametrize("metrics,reason", [({"epsilon": -5.0}, "bad-metric"), ({"epsilon": float("inf")}, "bad-metric"),
                                            ({"acc-global": 1.5}, "bad-metric"), ({"x" * 100: 1.0}, "bad-metric"),
                                            ({"gen-" + "x" * 100: 1.0}, "bad-metric"),
                                            ({"gen-sampled-personal-rep3": 0.1}, None)])
def test_evaluation_metric_keys_and_epsilon_are_checked(metrics, reason):
    values = {"num-examples": 24, "user-index": 3, "acc-personalized": 0.8, "acc-global": 0.7, "acc-base": 0.5}
    request = Message(content=RecordDict({}), dst_node_id=100, message_type=MessageType.EVALUATE)
    request.metadata.__dict__["_message_id"] = "m"
    msg = Message(RecordDict({"metrics": MetricRecord({**values, **metrics})}), reply_to=request)
    out = ReplyScreen(SPEC).evaluate([msg])
    assert out.rejected_reasons == ({reason: 1} if reason else {})


def test_a_declined_replys_negative_epsilon_is_no_datum():
    from fedpersona.protocol import status_record

    request = Message(content=RecordDict({}), dst_node_id=100, message_type=MessageType.TRAIN)
    request.metadata.__dict__["_message_id"] = "m"
    declined = Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(
        {"num-examples": 0, "declined": 1, "epsilon": -5.0}), "status": ConfigRecord(status_record("budget-spent"))}),
        reply_to=request)
    recorder = RoundRecorder(num_rounds=5, eval_every=5, out_dir=None, screen=ReplyScreen(SPEC))
    recorder.record_train(1, recorder.screen.train([declined, reply(0.3, node=101, epsilon=2.5)], sent(), 1))
    assert recorder.summary_stats()["epsilon_max"] == 2.5


# ---------------------------------------------------------------------------------------------- the log

def test_what_the_log_says_about_a_reply_is_bounded(caplog):
    """A 1 MB metric key and a million-float metric were logged whole, per reply, per round."""
    huge_key = reply(0.3, node=101, **{"k" * 1_000_000: 1.0})
    huge_value = reply(0.3, node=102)
    huge_value.content["metrics"]["train-steps"] = [0.5] * 1_000_000
    huge_tensor_name = reply(0.3, node=103)
    huge_tensor_name.content["arrays"]["t" * 1_000_000] = Array(np.zeros(2, np.float32))
    with caplog.at_level(logging.INFO, logger="fedpersona.strategies.validation"):
        out = ReplyScreen(SPEC).train([huge_key, huge_value, huge_tensor_name, reply(0.3, node=104)], sent(), 1)
    assert out.rejected_reasons == {"bad-metric": 2, "extra-key": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all(len(line) < 600 for line in lines), [len(line) for line in lines]
    assert "1,000,002 characters" in lines[0] and "a list of 1000000 values" in lines[1]


def test_rejections_name_users_not_node_ids(caplog):
    from fedpersona.server.user_grid import USER_NODE_BASE

    recorder = RoundRecorder(num_rounds=5, eval_every=5, out_dir=None, screen=ReplyScreen(SPEC))
    nan = reply(0.3, node=USER_NODE_BASE + 7)
    nan.content["arrays"]["a"] = Array(np.full((4, 3), np.nan, np.float32))
    with caplog.at_level(logging.WARNING, logger="fedpersona.strategies.validation"):
        recorder.record_train(1, recorder.screen.train([nan, reply(0.3, node=USER_NODE_BASE + 2)], sent(), 1))
    assert recorder.rows[-1]["train_rejected_by"] == [["user 7", "non-finite"]]
    assert "user 7's reply rejected (non-finite: a tensor holds NaN or Inf)" in caplog.text
    assert str(USER_NODE_BASE + 7) not in caplog.text


def test_a_device_is_named_by_the_user_index_it_reported():
    names = ReplyNames(simulation=False)
    request = Message(content=RecordDict({}), dst_node_id=555, message_type=MessageType.EVALUATE)
    request.metadata.__dict__["_message_id"] = "m"
    late = reply(0.3, node=555)
    assert names(late) == "node 555"  # nothing reported yet: the node id is all the server knows
    evaluation = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "user-index": 42})}),
                         reply_to=request)
    names.learn(evaluation)
    assert names(late) == "user 42" and names(reply(0.3, node=556)) == "node 556"
