"""A real multi-round Flower simulation on Ray, with a strategy that inspects what clients send."""

import json
import textwrap

import pytest

from fedpersona.config import RunConfig
from fedpersona.simulations.launcher import Resources, simulate

SUMMARY_KEYS = {
    "num_users", "rounds", "scheme", "strategy", "personalized_accuracy_mean", "personalized_accuracy_p10",
    "personalized_accuracy_min", "global_accuracy_mean", "global_accuracy_p10", "base_accuracy_mean",
    "epsilon_max", "bytes_up_per_client_round", "shared_parameters", "private_parameters_per_user",
    "wall_seconds",
}

INSPECTOR = textwrap.dedent('''
    from flwr.serverapp.strategy import FedAvg

    SEEN = []  # (round, array names, metric names) of every training reply the server received
    TRAINED = []  # (round, user index, rounds the user has trained) of every evaluation reply

    class InspectingFedAvg(FedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            for msg in replies:
                names = [n for rec in msg.content.array_records.values() for n in rec.keys()]
                SEEN.append((server_round, names, sorted(msg.content.metric_records["metrics"].keys())))
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round, replies):
            replies = list(replies)
            for msg in replies:
                metrics = msg.content.metric_records["metrics"]
                TRAINED.append((server_round, int(metrics["user-index"]), int(metrics["rounds-trained"])))
            return super().aggregate_evaluate(server_round, replies)
''')


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sim")
    (folder / "fp_inspect.py").write_text(INSPECTOR)
    import sys

    sys.path.insert(0, str(folder))
    try:
        config = RunConfig(num_users=6, rounds=3, fraction_train=0.5, epochs=1, min_steps=4,
                           strategy="fp_inspect:InspectingFedAvg")
        summary = simulate(config, out_dir=folder / "out", resources=Resources(num_cpus=1.0)).summary
        import fp_inspect
    finally:
        sys.path.remove(str(folder))
    return summary, folder / "out", fp_inspect.SEEN


def test_summary_contract(run):
    summary, out, _ = run
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["num_users"] == 6 and summary["rounds"] == 3 and summary["scheme"] == "split"
    assert summary["epsilon_max"] is None
    from fedpersona.model.embedded import read_sums, shipped_path

    assert summary["model_sha256"] == read_sums(shipped_path())["model.safetensors"]  # the shipped bits
    for key in SUMMARY_KEYS:
        if key.endswith(("_mean", "_p10", "_min")):
            assert 0.0 <= summary[key] <= 1.0
    assert summary["personalized_accuracy_min"] <= summary["personalized_accuracy_p10"] <= summary["personalized_accuracy_mean"]
    # bytes really sent: float32 shared tensors plus a small envelope
    assert 4 * summary["shared_parameters"] <= summary["bytes_up_per_client_round"] < 4 * summary["shared_parameters"] * 1.2


def test_metrics_per_round_and_per_user(run):
    _, out, _ = run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    # rounds before the last evaluate a sample as large as they train, the last one every user
    assert [(r["train_replies"], r["eval_users"]) for r in rows] == [(3, 3), (3, 3), (3, 6)]
    users = json.loads((out / "per_user.json").read_text())
    assert sorted(u["user_index"] for u in users) == list(range(6))


def test_server_received_only_shared_tensors(run, split_resident):
    _, _, seen = run
    from fedpersona.model.adapters import Role

    shared = set(split_resident.adapters.names(Role.SHARED))
    assert len(seen) == 9  # 3 users x 3 rounds
    for _, names, metrics in seen:
        assert set(names) == shared
        assert not any(".private." in n for n in names)
        assert set(metrics) <= {"num-examples", "train-steps", "declined"}


def test_same_seed_samples_the_same_users_and_gives_the_same_results(run, tmp_path):
    """Users are virtual nodes listed in user order (server.user_grid) and sampling is reseeded per round:
    a seeded run trains the same users in every round (which users trained shows in each evaluation reply)."""
    import fp_inspect

    first = sorted(fp_inspect.TRAINED)
    # a round before the last evaluates a sample as large as it trains (fraction-evaluate 0: fraction-train),
    # the last one every user
    assert [sum(1 for r, _, _ in first if r == k) for k in (1, 2, 3)] == [3, 3, 6]
    assert len({trained for r, _, trained in first if r == 3}) > 1  # users differ: sampling did something
    config = RunConfig(num_users=6, rounds=3, fraction_train=0.5, epochs=1, min_steps=4,
                       strategy="fp_inspect:InspectingFedAvg")
    fp_inspect.TRAINED.clear()
    simulate(config, out_dir=tmp_path / "again", resources=Resources(num_cpus=1.0))
    assert sorted(fp_inspect.TRAINED) == first
    # and, replies aggregated in the order sent, the same results to the last bit
    _, out, _ = run
    assert (tmp_path / "again" / "per_user.json").read_text() == (out / "per_user.json").read_text()


def test_a_run_whose_clients_all_fail_exits_1_with_the_first_error(tmp_path, capsys):
    """Every training call raises (the strategy sends an invalid setting): exit 1, one line naming the
    first client error; summary.json is still written, with the failure count."""
    from fedpersona.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--users", "2", "--rounds", "1", "--strategy", "tests.strategies.custom_strategy:BadSettingFedAvg",
              "--set", "gen-prompts=0", "--set", "max-test-pairs=4", "--quiet", "--out", str(out)])
    assert done.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fedpersona: run failed: every client training call failed") and "batch-size" in last, last
    assert json.loads((out / "summary.json").read_text())["client_failures"] >= 2
