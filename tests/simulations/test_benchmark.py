"""``fedpersona benchmark``: planning, the report (table, JSON, plots) and its CLI, with a stand-in simulator
(the real simulations are exercised by test_strategies_and_schemes.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedpersona.cli import main
from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.io import atomic_write_json
from fedpersona.simulations.benchmark import (COLUMNS, RunSpec, parse_strategies, plan, quantity_groups,
                                              run_benchmark, train_pair_counts)

BASE = RunConfig(num_users=9, new_users=2, rounds=3)


def test_strategies_carry_their_own_arguments():
    assert parse_strategies("FedAvg, FedProx(proximal_mu=0.01),MultiKrum(num_malicious_nodes=1,num_nodes_to_select=2)") == [
        "FedAvg", "FedProx(proximal_mu=0.01)", "MultiKrum(num_malicious_nodes=1,num_nodes_to_select=2)"]
    assert parse_strategies("tests.x:Mine(a=1)") == ["tests.x:Mine(a=1)"]
    with pytest.raises(UsageError, match="without its"):
        parse_strategies("FedProx(proximal_mu=0.01")
    specs = plan(["split", "local"], ["FedAvg", "FedProx(proximal_mu=0.1)"])
    assert [s.label for s in specs] == ["split / FedAvg", "split / FedProx(proximal_mu=0.1)", "local / FedAvg",
                                        "local / FedProx(proximal_mu=0.1)"]
    assert len({s.slug for s in specs}) == 4
    with pytest.raises(UsageError, match="listed twice"):
        plan(["split", "split"], ["FedAvg"])


def test_quantity_groups_are_the_bottom_and_top_thirds():
    counts = train_pair_counts(BASE)
    assert len(counts) == BASE.num_users and all(n >= 8 for n in counts.values())
    groups = quantity_groups(counts)
    assert len(groups["few"]) == len(groups["many"]) == 3
    assert max(counts[u] for u in groups["few"]) <= min(counts[u] for u in groups["many"])


def fake_simulate(config, *, out_dir, resources, reporter, verbose):
    """Writes what a run writes; accuracy grows with pairs unless the scheme is 'global'."""
    counts = train_pair_counts(config)
    per_user = [{"user_index": u, "personalized": 0.5 if config.scheme == "global" else min(1.0, 0.5 + n / 200),
                 "global": 0.5, "base": 0.4} for u, n in counts.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "per_user.json", per_user)
    atomic_write_json(out_dir / "new_users.json", [{"user_index": 9, "personalized": 0.6, "global": 0.5, "base": 0.4}])
    rows = [{"round": r, "personalized_accuracy_mean": 0.5 + 0.05 * r, "global_accuracy_mean": 0.5}
            for r in range(1, config.rounds + 1)]
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    acc = [e["personalized"] for e in per_user]
    if config.strategy == "FedMedian":
        raise RuntimeError("boom")
    return {"personalized_accuracy_mean": float(np.mean(acc)), "personalized_accuracy_p10": float(np.percentile(acc, 10)),
            "personalized_accuracy_min": min(acc), "global_accuracy_mean": 0.5, "new_users": 1,
            "new_user_accuracy_mean": 0.6, "new_user_accuracy_p10": 0.6, "generation_win_rate": 0.7,
            "private_parameters_per_user": 4352, "bytes_up_per_client_round": 75104.0, "epsilon_max": None,
            "wall_seconds": 1.5}


def test_report_table_json_and_plots(tmp_path):
    specs = [RunSpec("split", "FedAvg"), RunSpec("global", "FedAvg"), RunSpec("split", "FedMedian")]
    lines = []
    result = run_benchmark(BASE, specs, tmp_path, simulate=fake_simulate, log=lines.append)
    md = (tmp_path / "benchmark.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run"))
    assert header.count("|") == len(COLUMNS) + 1
    split_row = next(line for line in md.splitlines() if line.startswith("| split / FedAvg"))
    assert "4,352" in split_row and "75,104" in split_row and "0.700" in split_row
    assert "failed: RuntimeError: boom" in md  # one failed run does not lose the others
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["run"] for r in saved["runs"]] == [s.label for s in specs]
    split, global_ = saved["runs"][0], saved["runs"][1]
    assert split["many_pairs_accuracy_mean"] > split["few_pairs_accuracy_mean"]
    assert global_["few_pairs_accuracy_mean"] == global_["many_pairs_accuracy_mean"] == 0.5
    assert saved["config"]["num-users"] == BASE.num_users and len(saved["train_pairs"]) == BASE.num_users
    for png in ("accuracy_per_round.png", "per_user_accuracy.png", "accuracy_by_pairs.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in md
    assert any("run 1/3 split / FedAvg: starting" in line for line in lines)
    assert (tmp_path / "runs" / "split-FedMedian" / "error.txt").read_text().strip().endswith("boom")


def test_bad_benchmark_input_fails_before_any_run(tmp_path, capsys):
    for argv, needle in ((["--schemes", "split,nope"], "unknown scheme"),
                         (["--strategies", "FedAvg,Nope"], "unknown strategy"),
                         (["--strategies", "Bulyan(num_malicious_nodes=3)"], "4f+3")):
        with pytest.raises(SystemExit) as done:
            main(["benchmark", *argv, "--out", str(tmp_path / "b"), "--users", "6"])
        assert done.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("fedpersona: error:") and needle in err[-1]
        assert not (tmp_path / "b" / "runs").exists()
