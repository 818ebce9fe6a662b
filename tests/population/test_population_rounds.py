"""The population model wired into the server's round (fedpersona.server.population_rounds), in process.

These drive ``PopulationRounds`` the way the user grid and the sampling wrapper do (plan, the strategy's
seeded sample among the candidates, over-selection, the decision before training), without training
anyone: what is tested here is who is selected, who would train, who declines and what is counted.
End-to-end runs with the real ClientApp: test_population_federation.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedpersona.alignment.settings import TrainSettings
from fedpersona.alignment.stacked import batch_schedule
from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.population import Status
from fedpersona.protocol import DECLINED, METRICS, decline_reason
from fedpersona.server.deadline_grid import WallClockRounds
from fedpersona.server.population_rounds import PopulationRounds, pairs_trained, train_pair_count
from fedpersona.server.user_grid import USER_NODE_BASE, user_of

THREE_TIERS = """
name = "three-tiers"
[[tier]]
name = "fast"
share = 0.3
seconds_per_pair = 0.1
[[tier]]
name = "mid"
share = 0.4
seconds_per_pair = 0.5
[[tier]]
name = "slow"
share = 0.3
seconds_per_pair = 10.0
memory_mb = {memory}
[dropout]
probability = {dropout}
"""
PRIVACY = """
[[privacy]]
name = "strict"
share = 0.25
require_dp = true
max_epsilon = 1.0
[[privacy]]
name = "default"
share = 0.25
require_dp = true
max_epsilon = 8.0
[[privacy]]
name = "open"
share = 0.5
"""


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "population.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def sample_round(rounds: PopulationRounds, server_round: int, content: RecordDict) -> list[Message]:
    """What the sampling wrapper and a Flower strategy do: plan, sample the goal count (FedAvg's rule over
    the listed candidates, seeded as ``server.sampling`` seeds it), then over-select."""
    rounds.begin(server_round)
    try:
        nodes = [USER_NODE_BASE + int(u) for u in rounds.candidates()]
        size = max(int(len(nodes) * rounds.config.fraction_train), rounds.config.min_users)
        random.seed(f"{rounds.config.seed}/train/{server_round}")
        picked = random.sample(nodes, size)
    finally:
        rounds.end()
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in picked]
    return rounds.select(server_round, messages)


def train_content(config: RunConfig, server_round: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord([np.zeros((64, 64), np.float32)]),
                       "config": ConfigRecord({**config.to_flat(), "server-round": server_round})})


@pytest.mark.parametrize("num_pairs", [1, 5, 8, 13, 40, 97])
@pytest.mark.parametrize("epochs,batch,min_steps,max_steps", [(1, 8, 0, 0), (4, 8, 16, 0), (3, 4, 0, 7)])
def test_pairs_trained_is_what_the_trainer_trains(num_pairs, epochs, batch, min_steps, max_steps):
    settings = TrainSettings(epochs=epochs, batch_size=batch, min_steps=min_steps, max_steps=max_steps)
    assert pairs_trained(num_pairs, settings) == sum(len(b) for b in batch_schedule(num_pairs, settings, seed=3))


def test_the_uniform_population_changes_nothing():
    config = RunConfig(num_users=20, fraction_train=0.25)
    rounds = PopulationRounds(config, num_nodes=20)
    content = train_content(config, 1)
    messages = sample_round(rounds, 1, content)
    assert len(messages) == 5 and list(rounds.plan.candidates) == list(range(20))
    decision = rounds.decide(messages)
    assert decision.send == messages and not decision.answered  # the same messages, content untouched
    assert all(m.content is content for m in decision.send)
    rounds.finish(decision.outcome)
    row = rounds.row(1)
    assert row["simulated_round_s"] == 0.0 and row["accepted"] == 5 and row["late_users"] == 0
    summary = rounds.summary([{**row, "personalized_accuracy_mean": 0.7}], {})
    for key in ("simulated_seconds", "unavailable_users", "declined_users", "dropped_users", "late_users"):
        assert summary[key] == 0, key
    assert summary["time_to_accuracy"] == {"0.6": 0.0, "0.7": 0.0, "0.8": None, "0.9": None}
    assert set(summary["accuracy_by_group"]) >= {"tier:all", "availability:all", "privacy:no-demands"}


def test_a_deadline_the_slow_tier_cannot_meet_keeps_it_out_of_every_round(tmp_path):
    population = write(tmp_path, THREE_TIERS.format(memory="inf", dropout=0.0))
    config = RunConfig(num_users=60, fraction_train=0.2, population=population, round_deadline=30.0, max_steps=2)
    rounds = PopulationRounds(config, num_nodes=60)
    slow = set(np.flatnonzero(rounds.population.tier == rounds.population.tier_names.index("slow")).tolist())
    work = {u: pairs_trained(train_pair_count(config, u), config.train_settings) for u in range(60)}
    # the setting is what it says: every mid or fast device makes the deadline, no slow one can
    assert max(0.5 * work[u] for u in work if u not in slow) < 30.0 < min(10.0 * work[u] for u in slow)
    late = 0
    for r in range(1, 9):
        decision = rounds.decide(sample_round(rounds, r, train_content(config, r)))
        sent = {user_of(m.metadata.dst_node_id) for m in decision.send}
        assert sent and not sent & slow
        late += decision.outcome.count(Status.LATE)
        rounds.finish(decision.outcome)
    summary = rounds.summary([], {})
    assert summary["late_users"] == late > 0
    assert summary["accuracy_by_group"]["tier:slow"]["rounds_trained"] == 0
    assert summary["accuracy_by_group"]["tier:fast"]["rounds_trained"] > 0
    assert summary["simulated_seconds"] == pytest.approx(8 * 30.0)  # every round waits for its deadline


def share_complete(tmp_path: Path, over_selection: float, rounds_to_run: int = 150) -> tuple[float, float]:
    population = write(tmp_path, THREE_TIERS.format(memory="inf", dropout=0.3).replace("10.0", "0.5"))
    config = RunConfig(num_users=1000, fraction_train=0.01, population=population, over_selection=over_selection,
                       min_replies=8)
    rounds = PopulationRounds(config, num_nodes=1000)
    content = train_content(config, 1)
    replies = []
    for r in range(1, rounds_to_run + 1):
        decision = rounds.decide(sample_round(rounds, r, content))
        assert len(decision.send) <= 10  # never more than the goal count trains
        replies.append(len(decision.send))
        rounds.finish(decision.outcome)
    return 1 - rounds.summary([], {})["incomplete_rounds"] / rounds_to_run, float(np.mean(replies))


def test_over_selection_collects_the_replies_rounds_need_despite_30_percent_dropout(tmp_path):
    plain, plain_replies = share_complete(tmp_path, 1.0)
    over, over_replies = share_complete(tmp_path, 1.5)
    # 10 wanted, 8 needed: with 30% dropout, selecting 10 completes ~38% of rounds, selecting 15 ~95%
    assert plain < 0.6 and over >= 0.9, (plain, over)
    assert plain_replies < 7.5 < 9.0 < over_replies


def test_privacy_policies_answer_as_devices_do(tmp_path):
    population = write(tmp_path, THREE_TIERS.format(memory="inf", dropout=0.0).replace("10.0", "0.5") + PRIVACY)
    config = RunConfig(num_users=40, fraction_train=0.5, population=population)
    rounds = PopulationRounds(config, num_nodes=40)
    decision = rounds.decide(sample_round(rounds, 1, train_content(config, 1)))
    names = rounds.population.privacy_names
    group = {u: names[rounds.population.privacy_group[u]] for u in range(40)}
    sent = {user_of(m.metadata.dst_node_id) for m in decision.send}
    assert sent and all(group[u] == "open" for u in sent)  # a round without DP: DP-requiring users say no
    for reply in decision.answered:
        assert decline_reason(reply.content) == "dp-required" and reply.content[METRICS][DECLINED] == 1
        assert not reply.content.array_records["arrays"]  # a decline sends nothing of the user's data
    assert len(decision.answered) == sum(group[int(u)] != "open" for u in decision.outcome.users)

    own = PopulationRounds(config.replace(privacy_demands="own-epsilon"), num_nodes=40)
    decision = own.decide(sample_round(own, 1, train_content(config, 1)))
    assert not decision.answered
    asked = {group[user_of(m.metadata.dst_node_id)]: float(m.content["config"]["dp-epsilon"]) for m in decision.send}
    assert asked == {"strict": 1.0, "default": 8.0, "open": 0.0}  # each at its own largest epsilon, open as asked

    dp_round = config.replace(dp_epsilon=8.0)
    rounds = PopulationRounds(dp_round, num_nodes=40)
    decision = rounds.decide(sample_round(rounds, 1, train_content(dp_round, 1)))
    assert {decline_reason(r.content) for r in decision.answered} == {"epsilon-above-policy"}


def test_devices_that_cannot_hold_the_model_are_never_selected_and_are_counted(tmp_path):
    population = write(tmp_path, THREE_TIERS.format(memory=100, dropout=0.0))  # the slow tier: 100 MB
    config = RunConfig(num_users=50, fraction_train=0.5, population=population)
    rounds = PopulationRounds(config, num_nodes=50, model_bytes=300e6)
    unfit = set(np.flatnonzero(rounds.population.memory_mb < 300).tolist())
    assert len(unfit) == 15
    sampled = sample_round(rounds, 1, train_content(config, 1))
    assert not {user_of(m.metadata.dst_node_id) for m in sampled} & unfit
    rounds.finish(rounds.decide(sampled).outcome)
    assert rounds.summary([], {})["unfit_users"] == 15


def test_round_settings_are_checked_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="over-selection"):
        RunConfig(over_selection=0.5).validate()
    with pytest.raises(UsageError, match="round-deadline"):
        RunConfig(round_deadline=-1).validate()
    with pytest.raises(UsageError, match="privacy-demands"):
        RunConfig(privacy_demands="maybe").validate()
    with pytest.raises(UsageError, match="no-such-preset"):
        RunConfig.from_flat({"population": "no-such-preset"})
    assert RunConfig.from_flat({"population": "cross-device"}).population == "cross-device"


class Nodes:
    """A deployment's connected devices (only what over-selection reads of a Grid)."""

    def get_node_ids(self):
        return [11, 12, 13, 14, 15, 16, 17, 18]


def test_deployment_over_selection_adds_seeded_devices():
    rounds = WallClockRounds(RunConfig(over_selection=1.5, seed=4))
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in (12, 15, 17, 18)]
    rounds.begin(1)
    picked = rounds.select(1, messages, Nodes())
    extra = [m.metadata.dst_node_id for m in picked[4:]]
    assert len(picked) == 6 and not set(extra) & {12, 15, 17, 18} and all(m.content is content for m in picked)
    assert rounds.wanted[1] == 4
    again = WallClockRounds(RunConfig(over_selection=1.5, seed=4)).select(1, messages, Nodes())
    assert [m.metadata.dst_node_id for m in again[4:]] == extra


def test_the_end_table_shows_the_population_only_when_there_is_one():
    from fedpersona.display import population_rows

    uniform = {"population": "uniform", "simulated_seconds": 0.0, "unavailable_users": 0, "declined_users": 0,
               "dropped_users": 0, "late_users": 0, "accuracy_by_group": {"tier:all": {"users": 4}}}
    assert population_rows(uniform) == []
    rows = dict(population_rows({**uniform, "population": "cross-device", "simulated_seconds": 7200.0,
                                 "late_users": 3, "dropped_users": 1200,
                                 "accuracy_by_group": {"tier:fast": {"personalized_accuracy_mean": 0.81,
                                                                     "rounds_trained": 2.0},
                                                       "tier:slow": {"personalized_accuracy_mean": 0.52,
                                                                     "rounds_trained": 0.0}}}))
    assert rows["simulated time"] == "2.00 h (cross-device)"
    assert "late 3" in rows["users not counted (summed over rounds)"] and "dropped 1,200" in rows[
        "users not counted (summed over rounds)"]
    assert rows["personalized acc by tier (rounds trained)"] == "fast 0.810 (2.0), slow 0.520 (0.0)"
    deployment = {"population": None, "simulated_seconds": None, "late_users": 1}
    assert dict(population_rows(deployment)) == {"users not counted (summed over rounds)":
                                                 "unavailable 0, declined 0, dropped 0, late 1, surplus 0, unfit 0"}


def test_the_population_flag_fails_fast_in_one_line(cli, tmp_path):
    code, out, err = cli("simulate", "--population", "no-such-preset", "--out", str(tmp_path / "run"))
    assert code == 2 and "no-such-preset" in err and "cross-device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    code, _, err = cli("benchmark", "--population", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "b"))
    assert code == 2 and "missing.toml" in err
