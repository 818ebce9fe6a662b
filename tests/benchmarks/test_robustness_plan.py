"""benchmarks/robustness.py without running it (a run needs Ray: tens of seconds): the grid it plans is
valid for every strategy, and its table reports what the runs return, failures included."""

from __future__ import annotations

import pytest

from fedpersona.strategies.registry import strategy_for


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("robustness")


def test_the_default_grid_is_valid_for_every_strategy(bench):
    args = bench.parse_args([])
    rows = bench.plan(args)
    attacks = [a for a in args.attacks if a != "none"]
    assert len(rows) == len(args.strategies) * (1 + 2 * len(attacks))  # clean row + validation on/off
    malicious = round(args.users * args.malicious)
    for row in rows:
        strategy_for(row.config)  # Krum n >= 2f+3, Bulyan n >= 4f+3, FedTrimmedAvg beta < 0.5: else UsageError
        assert row.config.attack_users == (0 if row.attack == "none" else malicious)
        assert row.config.validate_replies == row.validation and row.config.fraction_train == 1.0
    f = {r.strategy: r.assumed_malicious for r in rows}
    assert f["Krum"] == malicious  # 20 users: Krum's theory covers all 5 attackers
    assert f["Bulyan"] == (args.users - 3) // 4 < malicious  # Bulyan's cannot (4f + 3 > n at 25%)


def test_table_rows_say_what_happened(bench):
    args = bench.parse_args(["--attacks", "nan", "--strategies", "FedAvg", "--users", "8", "--rounds", "2"])
    rows = bench.plan(args)
    ok = bench.result_of(rows[0], {"personalized_accuracy_mean": 0.75, "global_accuracy_mean": 0.5,
                                   "rejected_replies": 4, "rejected_reasons": {"non-finite": 4}}, 3.2)
    failed = bench.result_of(rows[1], ValueError("operands could not be broadcast\nmore"), 1.0)
    table = bench.markdown([ok, failed]).splitlines()
    assert table[2] == "| nan | FedAvg | - | on | 0.750 | 0.500 | 4 | 3 |"
    assert table[3] == "| nan | FedAvg | - | off | run failed | ValueError | - | 1 |"
    assert failed["error"] == "ValueError: operands could not be broadcast"


@pytest.mark.parametrize("argv", [["--attacks", "bogus"], ["--strategies", "MultiKrum"], ["--malicious", "0.5"]])
def test_bad_options_stop_with_a_message(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
