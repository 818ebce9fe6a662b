"""Every strategy name, a user's own ``module:Class`` strategy and every scheme, each for 2 rounds in a
real Flower simulation on Ray (one session: one Ray start-up, warm actors; see simulations.session).

Tiny settings: 5 training users + 1 new user, every user trained each round (Bulyan and Krum need at
least 3 and 5 updates), 2 local steps, evaluation and the generation check after round 2 only.
The server-side strategy is instrumented to see what it aggregated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpersona.config import RunConfig
from fedpersona.strategies.registry import BUILTIN

REPO = Path(__file__).resolve().parents[2]
CUSTOM = "tests.strategies.custom_strategy:DampedFedAvg"
BASE = RunConfig(num_users=5, new_users=1, rounds=2, fraction_train=1.0, min_users=2, epochs=1, min_steps=2,
                 max_steps=2, eval_every=2, gen_prompts=2, gen_max_tokens=24, new_user_steps=4, seed=3)
ARGS = {"FedProx": "proximal_mu=0.1", "FedAvgM": "server_momentum=0.5", "Krum": "num_malicious_nodes=1",
        "MultiKrum": "num_malicious_nodes=1,num_nodes_to_select=3", "QFedAvg": "q=0.2", CUSTOM: "damping=0.5",
        "FedAdam": "eta=0.01", "FedYogi": "eta=0.01", "FedAdagrad": "eta=0.01"}
STRATEGIES = (*BUILTIN, CUSTOM)
SCHEMES = ("global", "local", "fedsa", "ffa", "finetune", "pal")  # split runs with every strategy above

RUNS = [("split", s) for s in STRATEGIES] + [(scheme, "FedAvg") for scheme in SCHEMES]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Run all of RUNS in one simulation; per run: summary (or exception), aggregation log, strategy."""
    from fedpersona.server import federation
    from fedpersona.simulations.session import simulate_session

    out = tmp_path_factory.mktemp("session")
    aggregations: dict[str, list[dict]] = {}
    strategies: dict[str, object] = {}
    original = federation.make_strategy

    def instrumented(config, recorder):
        strategy = original(config, recorder)
        log = aggregations.setdefault(config.run_tag, [])
        strategies[config.run_tag] = strategy

        class Probe(type(strategy)):
            def configure_train(self, server_round, arrays, cfg, grid):
                self._sent = {k: v.numpy().copy() for k, v in arrays.items()}
                return super().configure_train(server_round, arrays, cfg, grid)

            def aggregate_train(self, server_round, replies):
                replies = list(replies)
                keys = sorted({k for m in replies if not m.has_error()
                               for k in m.content.metric_records["metrics"].keys()})
                arrays, metrics = super().aggregate_train(server_round, replies)
                log.append({"round": server_round, "replies": len(replies), "metric_keys": keys,
                            "aggregated": arrays is not None,
                            "same_keys": arrays is not None and set(arrays.keys()) == set(self._sent),
                            "finite": arrays is not None and all(np.isfinite(a.numpy()).all() for a in arrays.values()),
                            "change": None if arrays is None else max(
                                (float(np.abs(arrays[k].numpy() - self._sent[k]).max()) for k in self._sent), default=0.0)})
                return arrays, metrics

        Probe.__name__ = Probe.__qualname__ = type(strategy).__name__
        strategy.__class__ = Probe
        return strategy

    configs = [BASE.replace(scheme=scheme, strategy=f"{name}({ARGS[name]})" if ARGS.get(name) else name) for scheme, name in RUNS]
    dirs = [out / f"{i:02d}" for i in range(len(RUNS))]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))  # the custom strategy is imported by the server (this process)
        mp.setattr(federation, "make_strategy", instrumented)
        results = simulate_session(configs, dirs)
    return {run: (result, aggregations.get(f"session-run-{i}", []), strategies.get(f"session-run-{i}"), dirs[i])
            for i, (run, result) in enumerate(zip(RUNS, results, strict=True))}


def _ok(session, run):
    result, log, strategy, out = session[run]
    if isinstance(result, BaseException):
        pytest.fail(f"{run} failed: {type(result).__name__}: {result}")
    return result, log, strategy, out


def _common_checks(summary, out):
    assert summary["rounds"] == 2 and summary["num_users"] == BASE.num_users
    assert summary["evaluated_users"] == BASE.num_users and summary["new_users"] == BASE.new_users
    for key in ("personalized_accuracy_mean", "global_accuracy_mean", "new_user_accuracy_mean",
                "generation_win_rate", "new_user_generation_win_rate"):
        assert 0.0 <= summary[key] <= 1.0, key
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["train_replies"] == BASE.num_users and rows[0]["train_declined"] == BASE.new_users
    assert "personalized_accuracy_mean" in rows[1] and "new_user_accuracy_mean" in rows[1]
    assert len(json.loads((out / "new_users.json").read_text())) == BASE.new_users


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_runs_two_rounds_and_aggregates(session, name):
    summary, log, strategy, out = _ok(session, ("split", name))
    assert summary["strategy"] == (f"{name}({ARGS[name]})" if name in ARGS else name)  # the spec that ran
    _common_checks(summary, out)
    assert [e["round"] for e in log] == [1, 2]
    for entry in log:
        assert entry["replies"] == BASE.num_users + BASE.new_users  # new users reply too (declined)
        assert entry["aggregated"] and entry["same_keys"] and entry["finite"], entry
        assert entry["change"] > 0, f"{name} left the shared adapter unchanged in round {entry['round']}"
        # the loss travels only to the strategy that weights by it
        assert ("train_loss" in entry["metric_keys"]) == (name == "QFedAvg"), entry["metric_keys"]
    assert summary["bytes_up_per_client_round"] > 0
    if name == CUSTOM:
        assert type(strategy).__name__ == "DampedFedAvg" and strategy.aggregations == 2 and strategy.damping == 0.5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_runs_end_to_end(session, scheme):
    summary, log, _, out = _ok(session, (scheme, "FedAvg"))
    _, _, _, split_out = _ok(session, ("split", "FedAvg"))
    split = json.loads((split_out / "summary.json").read_text())
    _common_checks(summary, out)
    assert summary["scheme"] == scheme and len(log) == 2
    shared, private = summary["shared_parameters"], summary["private_parameters_per_user"]
    full = split["shared_parameters"]  # one rank-8 adapter
    if scheme == "local":  # nothing shared: empty replies, identity aggregation
        assert shared == 0 and summary["bytes_up_per_client_round"] == 0 and private > 0
        assert all(e["aggregated"] and e["change"] == 0 for e in log)
    else:
        assert summary["bytes_up_per_client_round"] >= 4 * shared  # float32 tensors really sent
        assert all(e["change"] > 0 for e in log)
    if scheme in ("global", "ffa"):  # no private part: personalized == global, generations identical
        assert private == 0
        assert summary["personalized_accuracy_mean"] == summary["global_accuracy_mean"]
        assert summary["generation_win_rate"] == 0.5
    expected_private = {"fedsa": full - shared, "finetune": full, "pal": BASE.pal_prototypes}
    if scheme in expected_private:
        assert private == expected_private[scheme]
    if scheme == "pal":
        assert shared == BASE.pal_prototypes * full
    per_user = json.loads((out / "per_user.json").read_text())
    assert len(per_user) == BASE.num_users and all("gen_win_rate" in e for e in per_user)
