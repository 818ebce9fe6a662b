"""Accountant, ledger and calculator: reference epsilons (docs/explanation/privacy.md), errors, persistence."""

from __future__ import annotations

import json
import math

import pytest

from fedpersona.errors import UsageError
from fedpersona.privacy.accountant import epsilon, epsilon_of_history, merge_history, noise_for_epsilon
from fedpersona.privacy.calculator import REPORT_KEYS, epsilon_report, format_report, noise_report
from fedpersona.privacy.ledger import PrivacyLedger, default_delta

# (noise, sample rate, steps, delta, accountant, epsilon as printed, tolerance). The tolerance is one unit
# of the last printed digit, except where the printed digits go below float/numerical noise: the RDP
# values from TF Privacy (16 digits) are held to 1e-12, and the PRV value (FFT discretisation, which
# moves in the 10th digit across numpy builds; Opacus's own test checks 7 places) to 1e-9.
REFERENCE = [
    (1.5, 0.04, 2250, 1e-5, "rdp", 7.32911117143, 1e-11),  # opacus tests/accountants_test.py
    (1.5, 0.04, 2249, 1e-5, "prv", 6.777395712150674, 1e-9),  # same
    (1.3, 150 / 60000, 6000, 1e-5, "rdp", 0.7242234026109595, 1e-12),  # tensorflow_privacy
    (1.0, 1e-3, 30000, 1e-7, "rdp", 1.4154988495444842, 1e-12),  # same
    (1.0, 1.0, 1, 1e-5, "rdp", 4.7285, 1e-4),  # no subsampling: RDP upper bound of the Gaussian mechanism
    (1.0, 1.0, 1, 1e-5, "prv", 4.387, 1e-3),  # PRV, "about 4.387"
]


@pytest.mark.parametrize("noise,q,steps,delta,accountant,expected,tol", REFERENCE)
def test_reference_epsilons(noise, q, steps, delta, accountant, expected, tol):
    assert abs(epsilon(noise, q, steps, delta, accountant) - expected) <= tol
    report = epsilon_report(noise, q, steps, delta, accountant)
    assert abs(report["epsilon"] - expected) <= tol


def test_gaussian_mechanism_bounds_are_ordered():
    # exact Gaussian-mechanism epsilon (sigma 1, delta 1e-5) is 4.3772: both accountants bound it from above
    exact = 4.3772
    assert exact < epsilon(1.0, 1.0, 1, 1e-5, "prv") < epsilon(1.0, 1.0, 1, 1e-5, "rdp")


def test_reference_noise_multiplier():
    noise = noise_for_epsilon(8.0, 1e-5, 0.04, 2000, "rdp")
    assert round(noise, 4) == 1.3562
    report = noise_report(8.0, 0.04, 2000, 1e-5, "rdp")
    assert round(report["noise_multiplier"], 4) == 1.3562
    assert 8.0 - 0.01 <= report["epsilon"] <= 8.0  # reaches the target from below, within tolerance


def test_history_equals_one_phase_and_composes():
    one = epsilon_of_history([(1.5, 0.04, 2250)], 1e-5, "rdp")
    split = epsilon_of_history([(1.5, 0.04, 1000), (1.5, 0.04, 1250)], 1e-5, "rdp")
    assert split == one
    assert epsilon_of_history([], 1e-5, "rdp") == 0.0
    mixed = epsilon_of_history([(1.5, 0.04, 1000), (1.0, 0.04, 10)], 1e-5, "rdp")
    assert mixed > epsilon(1.5, 0.04, 1000, 1e-5, "rdp")
    assert merge_history([[1.5, 0.04, 3], (2.0, 0.1, 0), (1.5, 0.04, 4)]) == [(1.5, 0.04, 7)]


@pytest.mark.parametrize("call", [
    lambda: epsilon(0.0, 0.04, 10, 1e-5),
    lambda: epsilon(-1.0, 0.04, 10, 1e-5),
    lambda: epsilon(float("nan"), 0.04, 10, 1e-5),
    lambda: epsilon(1.0, 0.0, 10, 1e-5),
    lambda: epsilon(1.0, 1.5, 10, 1e-5),
    lambda: epsilon(1.0, 0.04, 10, 0.0),
    lambda: epsilon(1.0, 0.04, 10, 1.0),
    lambda: epsilon(1.0, 0.04, -1, 1e-5),
    lambda: epsilon(1.0, 0.04, 10, 1e-5, "gdp"),
    lambda: epsilon_of_history([(1.0, 0.04)], 1e-5),
    lambda: noise_for_epsilon(0.0, 1e-5, 0.04, 10),
    lambda: noise_for_epsilon(8.0, 1e-5, 0.04, 0),
    lambda: noise_for_epsilon(8.0, 1e-5, 0.04, 10, "moments"),
    lambda: PrivacyLedger.from_json('{"accountant": "rdp"}'),
    lambda: default_delta(0),
])
def test_bad_input_is_one_line_usage_error(call):
    with pytest.raises(UsageError) as err:
        call()
    assert str(err.value) and "\n" not in str(err.value)


def test_default_delta_is_well_below_one_over_n():
    assert default_delta(100) == 1e-5
    assert default_delta(10**6) == pytest.approx(1e-7)
    for n in (1, 7, 100, 10**4, 10**5, 3 * 10**6):
        assert default_delta(n) <= min(1e-5, 0.1 / n) * (1 + 1e-12)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_json_round_trip_continues(accountant):
    fresh = PrivacyLedger.calibrate(4.0, 1e-5, 0.1, 60, accountant)
    assert not fresh.would_exceed(60)  # calibrated so that the planned steps fit
    assert fresh.spent_epsilon() == 0.0

    one_go = PrivacyLedger.from_json(fresh.to_json())
    one_go.record(20)
    after_one = one_go.spent_epsilon()
    one_go.record(25, sample_rate=0.08)  # the user's data grew: a new phase

    saved = PrivacyLedger.from_json(fresh.to_json())
    saved.record(20)
    stored = json.dumps(saved.to_json())  # as in a ConfigRecord string or a state file
    reloaded = PrivacyLedger.from_json(stored)
    assert reloaded == saved
    reloaded.record(25, sample_rate=0.08)

    assert reloaded.history == one_go.history == [(fresh.noise_multiplier, 0.1, 20), (fresh.noise_multiplier, 0.08, 25)]
    assert reloaded.spent_epsilon() == one_go.spent_epsilon()
    assert reloaded.spent_epsilon() > after_one > 0.0
    assert reloaded.steps_taken == 45


def test_ledger_budget_and_clip_only():
    ledger = PrivacyLedger.calibrate(2.0, 1e-5, 0.2, 30, "rdp")
    ledger.record(30)
    assert ledger.spent_epsilon() <= 2.0
    assert ledger.would_exceed(1)
    clip_only = PrivacyLedger.calibrate(math.inf, 1e-5, 0.2, 30)
    assert clip_only.noise_multiplier == 0.0 and clip_only.clip_only
    clip_only.record(100)
    assert clip_only.spent_epsilon() == math.inf and not clip_only.would_exceed(100)
    assert PrivacyLedger.from_json(json.loads(json.dumps(clip_only.to_json()))) == clip_only


def test_calculator_reports_have_stable_keys_and_a_line():
    eps = epsilon_report(1.5, 0.04, 2250, 1e-5, "rdp")
    noise = noise_report(8.0, 0.04, 2000, 1e-5, "rdp")
    for report in (eps, noise):
        assert tuple(report) == REPORT_KEYS
        assert json.loads(json.dumps(report)) == report
        line = format_report(report)
        assert "\n" not in line and "rdp" in line
    assert eps["mode"] == "epsilon" and eps["target_epsilon"] is None
    assert "7.3291" in format_report(eps)
    assert noise["mode"] == "noise" and noise["target_epsilon"] == 8.0
    assert "1.3562" in format_report(noise)


def test_planned_participations_is_the_binomial_quantile():
    from fedpersona.privacy.dp_training import planned_participations

    def cdf(k, n, p):
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))

    assert planned_participations(15, 1.0) == 15  # every user every round: plan for all of them
    for rounds, fraction in ((15, 0.5), (40, 0.1), (6, 0.3), (100, 0.05)):
        k = planned_participations(rounds, fraction)
        assert cdf(k, rounds, fraction) >= 0.9 > cdf(k - 1, rounds, fraction), (rounds, fraction, k)
    assert planned_participations(15, 0.5) == 10
    assert planned_participations(1, 0.01) == 1  # never 0: a user sampled once can train


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_with_a_prior_release_meets_the_target_together(accountant):
    alone = noise_for_epsilon(8.0, 1e-5, 0.16, 160, accountant)
    release = [(5.0, 1.0, 1)]  # a pair count released with std 5 (sensitivity 1)
    both = noise_for_epsilon(8.0, 1e-5, 0.16, 160, accountant, prior=release)
    assert both > alone  # the release costs budget, so DP-SGD needs more noise ...
    spent = epsilon_of_history([*release, (both, 0.16, 160)], 1e-5, accountant)
    assert 8.0 - 0.01 <= spent <= 8.0  # ... and the two together reach the target, not more
    with pytest.raises(UsageError):  # a prior that spends the whole budget leaves nothing to train with
        noise_for_epsilon(1.0, 1e-5, 0.16, 160, accountant, prior=[(0.5, 1.0, 1)])


def test_ledger_with_a_released_count_accounts_it_and_survives_json():
    ledger = PrivacyLedger.calibrate(8.0, 1e-5, 0.16, 160, "rdp", count_noise=5.0, released_count=41.7)
    assert ledger.aggregation_weight == 42
    assert 0 < ledger.spent_epsilon() == epsilon(5.0, 1.0, 1, 1e-5)  # released before any step
    ledger.record(160)
    assert ledger.spent_epsilon() <= 8.0 and ledger.steps_taken == 160  # the release is not a step
    plain = PrivacyLedger.calibrate(8.0, 1e-5, 0.16, 160, "rdp")
    assert ledger.noise_multiplier > plain.noise_multiplier
    assert PrivacyLedger.from_json(ledger.dumps()) == ledger
    assert PrivacyLedger.calibrate(8.0, 1e-5, 0.16, 160, "rdp", count_noise=5.0, released_count=-3.0
                                   ).aggregation_weight == 1
    old = plain.to_json()
    del old["count_noise"], old["released_count"]  # a ledger written before counts were released
    assert PrivacyLedger.from_json(old) == plain
    with pytest.raises(UsageError):
        PrivacyLedger.from_json({**ledger.to_json(), "released_count": None})


def test_epsilon_is_never_negative_even_at_a_large_delta():
    from fedpersona.privacy.accountant import epsilon

    assert 0.0 <= epsilon(1000.0, 0.01, 1, 0.01) <= epsilon(1.0, 0.1, 10, 1e-5)
    with pytest.raises(UsageError, match="too large"):
        epsilon(1.0, 0.1, 10, 0.5)


@pytest.mark.parametrize("argv", [
    ["privacy", "--delta", "0.5", "--noise-multiplier", "1.0", "--sample-rate", "0.1", "--steps", "100"],
    ["privacy", "--delta", "0.05", "--epsilon", "2.0", "--sample-rate", "0.1", "--steps", "100"],
    ["simulate", "--set", "dp-delta=0.5"],
    ["client", "--state", "nowhere", "--server", "127.0.0.1:9", "--insecure", "--max-delta", "0.2"],
])
def test_a_delta_that_guarantees_nothing_is_refused(cli, argv) -> None:
    """Issue 12 kind 9: `--delta 0.5` used to print a negative epsilon; a delta above 0.01 is refused."""
    code, out, err = cli(*argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "delta" in lines[0] and "0.01" in lines[0], err
    assert "epsilon" not in out
