"""Reply validation on real Flower Messages and ArrayRecords, and in front of every strategy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.protocol import status_record
from fedpersona.server.recorder import RoundRecorder, attach_recorder
from fedpersona.strategies.registry import BUILTIN, build_strategy
from fedpersona.strategies.influence import InfluenceBounds
from fedpersona.strategies.validation import (REJECT_REASONS, ReplyScreen, ScreenSettings, TensorSpec, tensor_problem,
                                              update_norm)

SENT = {"a": np.zeros((4, 3), dtype=np.float32), "b": np.full(3, 0.5, dtype=np.float32)}
SPEC = TensorSpec.of(ArrayRecord({k: Array(v) for k, v in SENT.items()}))


@pytest.fixture(autouse=True)
def _no_full_collections(monkeypatch):
    """Flower's ``ArrayRecord.to_numpy_ndarrays(keep_input=False)`` (QFedAvg, Krum, Bulyan, ...) runs a full
    ``gc.collect()`` per reply: ~0.1 s here, seconds each in a suite process holding models. It is memory
    hygiene, not aggregation, so these tests skip it (the strategies' results are the same)."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)


def message(content: RecordDict, node: int = 100, kind: str = MessageType.TRAIN) -> Message:
    request = Message(content=RecordDict({}), dst_node_id=node, message_type=kind)
    request.metadata.__dict__["_message_id"] = f"m{node}"
    return Message(content, reply_to=request)


def train_reply(arrays: dict[str, np.ndarray], node: int = 100, **metrics) -> Message:
    return message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": 10, "train-steps": 4, **metrics})}), node)


def honest(seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in SENT.items()}


def sent() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in SENT.items()})


def screen(**settings) -> ReplyScreen:
    return ReplyScreen(SPEC, ScreenSettings(**settings))


def reasons(screened) -> dict[str, int]:
    return screened.rejected_reasons


# ---------------------------------------------------------------------------------------------- training

BAD_TRAIN = {
    "non-finite": lambda: train_reply({**honest(9), "a": np.full((4, 3), np.nan, np.float32)}),
    "non-finite inf": lambda: train_reply({**honest(9), "b": np.array([0, np.inf, 0], np.float32)}),
    "missing-key": lambda: train_reply({"a": honest(9)["a"]}),
    "extra-key": lambda: train_reply({**honest(9), "c": np.zeros(2, np.float32)}),
    "wrong-shape": lambda: train_reply({**honest(9), "a": np.zeros(1, np.float32)}),  # would broadcast
    "wrong-shape order": lambda: train_reply({"b": honest(9)["b"], "a": honest(9)["a"]}),
    "wrong-dtype": lambda: train_reply({**honest(9), "b": honest(9)["b"].astype(np.float64)}),
    "bad-weight huge": lambda: train_reply(honest(9), **{"num-examples": 1e9}),
    "bad-weight negative": lambda: train_reply(honest(9), **{"num-examples": -1}),
    "bad-weight zero": lambda: train_reply(honest(9), **{"num-examples": 0}),
    "bad-weight nan": lambda: train_reply(honest(9), **{"num-examples": float("nan")}),
    "bad-metric": lambda: train_reply(honest(9), **{"train-steps": float("inf")}),
    "bad-metric key": lambda: train_reply(honest(9), sneaky=1.0),  # a key the protocol does not know
    "bad-metric epsilon": lambda: train_reply(honest(9), epsilon=-5.0),
    "missing-key record": lambda: message(RecordDict({"metrics": MetricRecord({"num-examples": 10,
                                                                               "train-steps": 4})})),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_each_bad_reply_is_rejected_with_its_reason_and_the_rest_kept(case):
    good = [train_reply(honest(i), node=i) for i in range(4)]
    bad = BAD_TRAIN[case]()
    out = screen().train([good[0], bad, *good[1:]], sent(), server_round=1)
    assert reasons(out) == {case.split()[0]: 1}
    assert out.accepted == good and not out.declined and not out.failures


def test_honest_replies_pass_and_reasons_are_documented():
    out = screen().train([train_reply(honest(i), node=i) for i in range(5)], sent())
    assert len(out.accepted) == 5 and not out.rejected
    assert {c.split()[0] for c in BAD_TRAIN} == set(REJECT_REASONS)  # every reason code is exercised above


def test_update_norm_is_the_l2_distance_from_the_sent_tensors():
    moved = {"a": SENT["a"] + 3.0, "b": SENT["b"]}  # 12 entries moved by 3: sqrt(12 * 9)
    record = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in moved.items()})
    assert update_norm(record, SENT) == pytest.approx(np.sqrt(108))


def test_declined_replies_are_counted_not_rejected_and_failures_kept_apart():
    declined = message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 0, "declined": 1}),
                                   "status": ConfigRecord(status_record("epsilon-above-policy"))}), node=7)
    legacy = message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 0, "declined": 1})}))
    out = screen().train([train_reply(honest(1)), declined, legacy], sent())
    assert out.declined_reasons == {"budget-spent": 1, "epsilon-above-policy": 1}
    assert not out.rejected and len(out.accepted) == 1


def test_without_validation_only_declined_replies_are_set_apart():
    nan = train_reply({**honest(1), "a": np.full((4, 3), np.nan, np.float32)})
    out = ReplyScreen.permissive().train([nan, train_reply(honest(2))], sent())
    assert len(out.accepted) == 2 and not out.rejected


def test_tensor_problem_names_the_tensor():
    record = ArrayRecord({"a": Array(np.zeros(1, np.float32)), "b": Array(SENT["b"])})
    assert tensor_problem(record, SPEC) == ("wrong-shape", "'a' has shape [1], expected [4, 3]")
    assert tensor_problem(ArrayRecord({k: Array(v) for k, v in SENT.items()}), SPEC) is None


# ---------------------------------------------------------------------------------------------- evaluation

def eval_reply(node: int = 100, **metrics) -> Message:
    values = {"num-examples": 5, "user-index": node, "acc-personalized": 0.8, "acc-global": 0.7, "acc-base": 0.5}
    return message(RecordDict({"metrics": MetricRecord({**values, **metrics})}), node, MessageType.EVALUATE)


@pytest.mark.parametrize("metrics,reason", [
    ({"acc-global": 1.5}, "bad-metric"), ({"acc-personalized": float("nan")}, "bad-metric"),
    ({"acc-base": -0.1}, "bad-metric"), ({"num-examples": -1}, "bad-weight"),
    ({"num-examples": float("inf")}, "bad-weight"),
])
def test_bad_evaluation_replies_are_rejected(metrics, reason):
    out = screen().evaluate([eval_reply(1), eval_reply(2, **metrics)])
    assert reasons(out) == {reason: 1} and len(out.accepted) == 1


# ---------------------------------------------------------------------------------------------- every strategy

ARGS = {"Krum": "num_malicious_nodes=1", "MultiKrum": "num_malicious_nodes=1,num_nodes_to_select=3",
        "Bulyan": "num_malicious_nodes=1", "QFedAvg": "q=0.2", "FedAdam": "eta=0.01", "FedYogi": "eta=0.01",
        "FedAdagrad": "eta=0.01"}
ATTACKS = {
    "nan": lambda r: {**r, "a": np.full((4, 3), np.nan, np.float32)},
    "wrong-shape": lambda r: {**r, "a": np.zeros(1, np.float32)},
    "missing-key": lambda r: {"a": r["a"]},
    "extra-metric": None,  # an extra metric key (below): rejected by the protocol's keys, not by a vote
}


def recording(name: str, args: str | None = None):
    extra = ARGS.get(name, "") if args is None else args
    config = RunConfig(num_users=8, fraction_train=1.0, strategy=f"{name}({extra})" if extra else name)
    strategy = build_strategy(config.strategy, config=config, fraction_train=1.0, min_train_nodes=2,
                              min_available_nodes=2)
    recorder = RoundRecorder(num_rounds=10, eval_every=10, out_dir=None, screen=ReplyScreen(SPEC))
    strategy = attach_recorder(strategy, recorder)
    strategy.configure_train(1, sent(), ConfigRecord(), FakeGrid(8))
    return strategy, recorder


class FakeGrid:
    def __init__(self, n: int) -> None:
        self.ids = list(range(100, 100 + n))

    def get_node_ids(self):
        return self.ids


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("name", BUILTIN)
def test_every_strategy_aggregates_exactly_the_honest_replies(name, attack):
    """One malicious reply among 8: the result equals the same strategy given the 7 honest replies only
    (for the Byzantine rules, told of one faulty reply fewer: the rejected one counts against f)."""
    loss = {"train_loss": 0.5} if name == "QFedAvg" else {}  # the loss key QFedAvg asks for (only it)

    def honest_replies():  # fresh messages each time: some strategies (Bulyan, QFedAvg) consume their inputs
        return [train_reply(honest(i), node=i, **loss) for i in range(7)]

    bad = (train_reply(honest(99), node=99, sneaky=1.0, **loss) if ATTACKS[attack] is None else
           train_reply(ATTACKS[attack](honest(99)), node=99, **loss))
    attacked, recorder = recording(name)
    arrays, _ = attacked.aggregate_train(1, [bad, *honest_replies()])
    clean, _ = recording(name, ARGS.get(name, "").replace("num_malicious_nodes=1", "num_malicious_nodes=0"))
    expected, _ = clean.aggregate_train(1, honest_replies())
    assert arrays is not None and set(arrays.keys()) == set(SENT)
    for key in SENT:
        assert np.isfinite(arrays[key].numpy()).all()
        np.testing.assert_array_equal(arrays[key].numpy(), expected[key].numpy())
    row = recorder.rows[-1]
    assert row["train_rejected"] == 1 and row["train_replies"] == 7 and sum(row["train_rejected_reasons"].values()) == 1


def test_bulyan_still_aggregates_when_the_screen_removed_the_faulty_replies():
    """Bulyan needs n >= 4f + 3 of the replies it gets: 7 with f=1 would leave 6 after one rejection."""
    strategy, _ = recording("Bulyan")
    replies = [train_reply(honest(i), node=i) for i in range(6)]
    replies.append(train_reply({**honest(9), "b": np.full(3, np.inf, np.float32)}, node=9))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.num_malicious_nodes == 1  # lowered for the round only
    unscreened, recorder = recording("Bulyan")
    recorder.screen = ReplyScreen.permissive()
    assert unscreened.aggregate_train(1, [train_reply(honest(i), node=i) for i in range(6)]) == (None, None)


def test_without_a_valid_reply_the_global_adapter_stays():
    strategy, recorder = recording("FedAvg")
    nan = {k: np.full_like(v, np.nan) for k, v in SENT.items()}
    assert strategy.aggregate_train(1, [train_reply(nan, node=1), train_reply(nan, node=2)]) == (None, None)
    assert recorder.rows[-1]["train_rejected_reasons"] == {"non-finite": 2}
    assert recorder.summary_stats()["rejected_replies"] == 2


def test_fedmedian_without_validation_passes_nan_and_with_it_does_not():
    """The issue's finding, kept as a check that the screen is what makes the difference."""
    def replies():  # fresh messages each time: FedMedian consumes its inputs
        nan = train_reply({**honest(5), "a": np.full((4, 3), np.nan, np.float32)}, node=5)
        return [*(train_reply(honest(i), node=i) for i in range(4)), nan]

    strategy, _ = recording("FedMedian")
    arrays, _ = strategy.aggregate_train(1, replies())
    assert np.isfinite(arrays["a"].numpy()).all()
    unguarded, recorder = recording("FedMedian")
    recorder.screen = ReplyScreen.permissive()
    arrays, _ = unguarded.aggregate_train(1, replies())
    assert not np.isfinite(arrays["a"].numpy()).all()


def test_evaluation_rejects_stay_out_of_the_records_and_the_average():
    strategy, recorder = recording("FedAvg")
    recorder.eval_every = 1
    result = strategy.aggregate_evaluate(1, [eval_reply(1), eval_reply(2, **{"acc-global": 7.0})])
    assert result["acc-global"] == pytest.approx(0.7)  # Flower's average over the accepted reply only
    assert list(recorder.last_eval) == [1]
    row = recorder.rows[-1]
    assert row["eval_rejected"] == 1 and row["eval_rejected_reasons"] == {"bad-metric": 1}


# ---------------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("changes,message", [
    ({"max_update_norm": -1.0}, "max-update-norm"), ({"update_norm_ratio": 0.5}, "update-norm-ratio"),
    ({"max_reply_weight": 0.0}, "max-reply-weight"), ({"reply_weight_ratio": 0.5}, "reply-weight-ratio"),
    ({"attack": "nan"}, "attack-users"),
    ({"attack": "bogus", "attack_users": 1}, "choose one of"), ({"attack_users": 1}, "attack"),
    ({"attack": "nan", "attack_users": 99}, "attack-users"),
])
def test_settings_are_checked_in_one_place(changes, message):
    with pytest.raises(UsageError, match=message):
        RunConfig(**changes).validate()


def test_screen_settings_follow_the_run_configuration():
    config = RunConfig(validate_replies=False, max_update_norm=2.0, update_norm_ratio=4.0, max_reply_weight=50.0,
                       reply_weight_ratio=6.0, shared_lr=0.01, min_steps=9)
    settings = ScreenSettings.from_config(config, shared_parameters=100)
    assert (settings.enabled, settings.max_reply_weight, settings.unit_weight) == (False, 50.0, False)
    assert settings.bounds == InfluenceBounds(max_update_norm=2.0, update_norm_ratio=4.0,
                                              initial_update_norm=pytest.approx(0.01 * 10 * 9), reply_weight_ratio=6.0)
    user_dp = ScreenSettings.from_config(RunConfig(user_dp_noise=0.5, user_dp_clip=0.7), shared_parameters=100)
    assert user_dp.unit_weight and user_dp.bounds.max_update_norm == 0.7  # the devices' own clip: DP-FedAvg


def test_user_level_dp_wrapper_gets_only_screened_replies():
    from fedpersona.privacy.user_level import wrap_strategy

    inner = build_strategy("FedAvg", "", config=RunConfig(num_users=8, fraction_train=1.0), fraction_train=1.0,
                           min_train_nodes=2, min_available_nodes=2)
    recorder = RoundRecorder(num_rounds=10, eval_every=10, out_dir=None, screen=ReplyScreen(SPEC))
    strategy = attach_recorder(wrap_strategy(inner, noise_multiplier=0.1, clipping_norm=1.0, num_sampled=4),
                               recorder)
    strategy.configure_train(1, sent(), ConfigRecord(), FakeGrid(4))
    nan = train_reply({**honest(9), "a": np.full((4, 3), np.nan, np.float32)}, node=9)
    arrays, _ = strategy.aggregate_train(1, [nan, *(train_reply(honest(i), node=i) for i in range(3))])
    assert all(np.isfinite(arrays[k].numpy()).all() for k in SENT)
    assert recorder.rows[-1]["train_rejected_reasons"] == {"non-finite": 1}
