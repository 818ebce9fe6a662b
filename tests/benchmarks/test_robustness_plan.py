"""benchmarks/robustness.py without running it (a run needs Ray: tens of seconds): the grid it plans is
valid, its weight-inflation attack passes validation of form, and its tables report what the runs return,
failures included."""

from __future__ import annotations

import numpy as np
import pytest

from fedpersona.strategies.attacks import ATTACKS
from fedpersona.strategies.registry import strategy_for


@pytest.fixture
def bench(load_benchmark, monkeypatch):
    """The script as a module; its folder on sys.path, as when run (the weight-inflation attack is the plug-in
    ``robustness:inflated_weight``, imported by name where a run configuration is checked)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    return load_benchmark("robustness")


def test_the_default_grid_covers_every_federation_attack_and_variant(bench):
    args = bench.parse_args([])
    rows = bench.plan(args)
    assert len(rows) == len(args.federations) * len(args.attacks) * len(args.variants)
    for row in rows:
        strategy_for(row.config)
        users, attackers = bench.federation(row.federation)
        assert row.config.num_users == users and row.config.fraction_train == 1.0
        assert row.config.attack_users == (0 if row.attack == "none" else attackers)
        assert row.config.validate_replies == (row.variant != "no-validation")
    unbounded = next(r for r in rows if r.variant == "validation-only").config
    assert (unbounded.update_norm_ratio, unbounded.reply_weight_ratio) == (0.0, 0.0)
    assert {r.attack for r in rows} >= {"sign-flip", "scale", "random", "inflate", "inflate-cap"}


def test_weight_inflation_reverses_the_update_and_claims_its_weight(bench):
    sent = {"a": np.ones(3, np.float32)}
    trained = {"a": np.array([1.5, 1.0, 0.0], np.float32)}
    arrays, weight = bench.inflated_weight(trained, sent, 16, weight=99999.0)
    np.testing.assert_allclose(arrays["a"], [0.5, 1.0, 2.0])
    assert weight == 99999.0
    ATTACKS.get("sign-flip")  # the registry the plug-in spec goes through elsewhere


def test_tables_say_what_happened(bench):
    args = bench.parse_args(["--federations", "4:1", "--attacks", "inflate", "--variants", "bounded,FedMedian"])
    rows = bench.plan(args)
    ok = bench.result_of(rows[0], {"personalized_accuracy_mean": 0.75, "global_accuracy_mean": 0.5,
                                   "rejected_replies": 4, "rejected_reasons": {"non-finite": 4}}, 3.2)
    failed = bench.result_of(rows[1], ValueError("operands could not be broadcast\nmore"), 1.0)
    table = bench.markdown([ok, failed]).splitlines()
    assert table[0] == "| users:attackers | attack | FedAvg, bounded (default) | FedMedian |"
    assert table[2] == "| 4:1 | inflate | 0.500 (rejected 4) | run failed (ValueError) |"
    assert failed["error"] == "ValueError: operands could not be broadcast"
    before = [{**ok, "global_accuracy_mean": 0.25, "rejected_replies": 0}]
    assert bench.markdown([ok], baseline=before).splitlines()[2] == "| 4:1 | inflate | 0.250 | 0.500 (rejected 4) |"


@pytest.mark.parametrize("argv", [["--attacks", "bogus"], ["--variants", "Krum"], ["--federations", "4:2"],
                                  ["--federations", "x"]])
def test_bad_options_stop_with_a_message(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
