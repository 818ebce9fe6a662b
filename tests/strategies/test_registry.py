"""Strategy registry: names, typed arguments, checks against the run, and fedpersona's adaptations."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedpersona.cli import main
from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.strategies.registry import (BUILTIN, TRAIN_LOSS_KEY, build_strategy, strategy_for,
                                            trained_per_round)

REPO = Path(__file__).resolve().parents[2]
CUSTOM = "tests.strategies.custom_strategy:DampedFedAvg"


class FakeGrid:
    def __init__(self, n: int) -> None:
        self.ids = list(range(100, 100 + n))

    def get_node_ids(self):
        return self.ids


def reply(arrays: dict, **metrics) -> Message:
    request = Message(content=RecordDict({}), dst_node_id=100, message_type=MessageType.TRAIN)
    request.metadata.__dict__["_message_id"] = "m"
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 4, **metrics})})
    return Message(content, reply_to=request)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_builds_for_a_run(name):
    config = RunConfig(num_users=8, fraction_train=1.0)
    strategy = strategy_for(config.replace(strategy=name))
    assert type(strategy).__name__ == name
    assert strategy.fraction_train == 1.0 and strategy.min_train_nodes == config.min_users


def test_names_are_case_insensitive_and_args_are_typed():
    s = build_strategy("fedprox", "proximal_mu=0.25", config=RunConfig())
    assert type(s).__name__ == "FedProx" and s.proximal_mu == 0.25
    s = build_strategy("MultiKrum", {"num-malicious-nodes": "1", "num_nodes_to_select": "2"},
                       config=RunConfig(num_users=10, fraction_train=1.0))
    assert (s.num_malicious_nodes, s.num_nodes_to_select) == (1, 2)
    s = build_strategy("FedAdam", "eta=0.01,tau=1e-4,beta_1=0.5", config=RunConfig())
    assert (s.eta, s.tau, s.beta_1) == (0.01, 1e-4, 0.5)


def test_qfedavg_learning_rate_is_derived_from_the_run_unless_given():
    assert build_strategy("QFedAvg", "", config=RunConfig(shared_lr=5e-4)).client_learning_rate == 5e-4
    assert build_strategy("QFedAvg", "client_learning_rate=0.1", config=RunConfig()).client_learning_rate == 0.1
    with pytest.raises(UsageError, match="client_learning_rate"):
        build_strategy("QFedAvg", "")  # without a run there is nothing to derive it from


@pytest.mark.parametrize("name,args,message", [
    ("Nope", "", "unknown strategy; choose one of FedAvg, FedAvgM"),
    ("FedProx", "mu=1", "FedProx has no argument .mu.; it takes .*proximal_mu"),
    ("FedAdam", "eta=abc", "cannot read 'abc' as float"),
    ("FedAvg", "fraction_train=0.3", "set through the run configuration"),
    ("FedAvg", "novalue", "expected key=value"),
    ("FedTrimmedAvg", "beta=0.7", "beta"),
    ("nosuchmodule:Thing", "", "no module .nosuchmodule. in the working directory"),
    ("fedpersona.config:RunConfig", "", "not a subclass"),
])
def test_bad_names_and_arguments_are_usage_errors(name, args, message):
    with pytest.raises(UsageError, match=message):
        build_strategy(name, args, config=RunConfig())


def test_byzantine_rules_need_enough_users_per_round():
    # 6 users, half trained, one new user who may be sampled and decline: 2 updates in the worst case
    small = RunConfig(num_users=6, new_users=1, fraction_train=0.5)
    assert trained_per_round(small) == 2
    with pytest.raises(UsageError, match=r"Bulyan with num_malicious_nodes=0 needs at least 3 .*minus up to 1 new"):
        strategy_for(small.replace(strategy="Bulyan"))
    with pytest.raises(UsageError, match=r"Krum with num_malicious_nodes=1 needs at least 5"):
        strategy_for(small.replace(strategy="Krum(num_malicious_nodes=1)"))
    with pytest.raises(UsageError, match="num_nodes_to_select=9 exceeds"):
        strategy_for(small.replace(strategy="MultiKrum(num_nodes_to_select=9)", fraction_train=1.0))
    assert strategy_for(small.replace(strategy="Bulyan", fraction_train=1.0)).num_malicious_nodes == 0
    assert strategy_for(RunConfig(num_users=7, fraction_train=1.0,
                                  strategy="Bulyan(num_malicious_nodes=1)")).num_malicious_nodes == 1


def test_loss_weighted_strategy_is_refused_with_dp():
    with pytest.raises(UsageError, match="raw training loss"):
        strategy_for(RunConfig(strategy="QFedAvg", dp_epsilon=8.0))


def test_only_loss_weighted_strategies_ask_clients_for_the_loss():
    grid = FakeGrid(4)
    for name, expected in (("QFedAvg", "train_loss"), ("FedAvg", None), ("FedProx", None)):
        strategy = strategy_for(RunConfig(num_users=4, fraction_train=1.0, strategy=name))
        config = ConfigRecord({"x": 1})
        messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2))}), config, grid))
        assert len(messages) == 4
        assert messages[0].content["config"].get(TRAIN_LOSS_KEY) == expected


@pytest.mark.parametrize("name", ["FedAvg", "Krum", "FedMedian", "Bulyan", "QFedAvg", "FedAdam"])
def test_nothing_shared_aggregates_to_nothing(name):
    strategy = strategy_for(RunConfig(num_users=6, fraction_train=1.0, strategy=name))
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(6))
    arrays, _ = strategy.aggregate_train(1, [reply({}, train_loss=0.5) for _ in range(5)])
    assert arrays is not None and len(arrays) == 0


def test_adapted_strategies_aggregate_as_flower_does():
    strategy = strategy_for(RunConfig(num_users=4, fraction_train=1.0))
    strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}), ConfigRecord(), FakeGrid(4))
    replies = [reply({"w": Array(np.full(2, v, dtype=np.float32))}) for v in (1.0, 3.0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])


def test_a_users_own_strategy_by_import_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    strategy = strategy_for(RunConfig(num_users=4, fraction_train=1.0, strategy=f"{CUSTOM}(damping=0.25)"))
    assert type(strategy).__name__ == "DampedFedAvg" and strategy.damping == 0.25
    assert strategy.fraction_train == 1.0  # the run's sampling still applies
    with pytest.raises(UsageError, match="damping must be in"):
        strategy_for(RunConfig(strategy=f"{CUSTOM}(damping=2)"))


def test_cli_prints_one_line_and_exits_2(capsys):
    for argv, needle in ((["--strategy", "Nope"], "choose one of FedAvg"),
                         (["--strategy", "Krum(num_malicious_nodes=2)", "-n", "4"], "2f+3"),
                         (["--scheme", "nope"], "choose one of split, global, local, fedsa, ffa, finetune, pal")):
        with pytest.raises(SystemExit) as done:
            main(["simulate", *argv, "--out", "/tmp/fedpersona-never-written"])
        assert done.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("fedpersona: error:") and needle in err
