"""Population files and presets: validation (one UsageError naming file, key and fix) and seeded draws."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedpersona.errors import UsageError
from fedpersona.population import PRESETS, Population, load_population_file, load_population_spec
from fedpersona.population.traces import (load_availability_trace, load_device_profiles, synthetic_availability_trace,
                                          synthetic_device_profiles)

DATA = Path(__file__).resolve().parents[2] / "fedpersona" / "population" / "data"

GOOD = """
name = "lab"
[[tier]]
name = "fast"
share = 0.4
seconds_per_pair = { dist = "lognormal", median = 0.5, sigma = 0.2 }
download_bytes_per_s = 1e7
upload_bytes_per_s = { dist = "uniform", low = 1e6, high = 2e6 }
memory_mb = 8000
[[tier]]
name = "slow"
share = 0.6
seconds_per_pair = 5.0
memory_mb = 2000
[availability]
model = "diurnal"
start_s = { dist = "normal", mean = 79200, std = 3600 }
on_fraction = { dist = "uniform", low = 0.1, high = 0.4 }
[dropout]
probability = 0.2
[[privacy]]
name = "strict"
share = 0.25
require_dp = true
max_epsilon = 1.0
[[privacy]]
name = "open"
share = 0.75
"""


def write(tmp_path: Path, text: str, name: str = "pop.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def arrays(pop: Population) -> dict[str, np.ndarray]:
    return {"tier": pop.tier, "speed": pop.seconds_per_unit, "down": pop.download_bytes_per_s,
            "up": pop.upload_bytes_per_s, "memory": pop.memory_mb, "on": pop.on_fraction,
            "dropout": pop.dropout_probability, "privacy": pop.privacy_group, "eps": pop.max_epsilon,
            "online_noon": pop.availability.online(43200.0)}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_load_and_draw(name):
    pop = Population.load(name, 500, seed=3)
    assert pop.spec.source == f"preset {name}"
    for values in arrays(pop).values():
        assert values.shape == (500,)
    assert np.all(pop.seconds_per_unit >= 0) and np.all(pop.download_bytes_per_s > 0)
    assert np.all((pop.dropout_probability >= 0) & (pop.dropout_probability <= 1))
    assert np.all((pop.on_fraction >= 0) & (pop.on_fraction <= 1))
    assert pop.describe().startswith(f"population {name} (preset {name}): 500 users")


def test_uniform_is_todays_simulation():
    pop = Population.load(None, 50, seed=0)
    assert pop.spec.name == "uniform" and pop.is_uniform
    assert pop.availability.online(12345.0).all() and np.all(pop.seconds_per_unit == 0)
    assert np.all(np.isinf(pop.upload_bytes_per_s)) and pop.fits(1e15).all()
    assert not pop.answer_request(0.0).declines.any() and not pop.answer_request(8.0).declines.any()
    assert not Population.load("cross-device", 50, 0).is_uniform


def test_cross_device_preset_has_three_tiers_diurnal_dropout_and_privacy_groups():
    pop = Population.load("cross-device", 1000, seed=1)
    assert pop.tier_names == ("fast", "mid", "slow")
    assert pop.spec.availability.model == "diurnal" and 0.25 < pop.on_fraction.mean() < 0.35
    assert abs(pop.dropout_probability.mean() - 0.2) < 0.01
    assert pop.privacy_names == ("strict", "default", "no-dp")
    slow, fast = pop.tier == 2, pop.tier == 0
    assert np.median(pop.seconds_per_unit[slow]) > 5 * np.median(pop.seconds_per_unit[fast])


def test_same_seed_same_population_other_seed_other(tmp_path):
    spec = load_population_file(write(tmp_path, GOOD))
    a, b, c = (arrays(Population(spec, 2000, seed)) for seed in (7, 7, 8))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert any(not np.array_equal(a[k], c[k]) for k in ("tier", "speed", "on", "privacy"))


def test_shares_are_exact_and_laws_are_the_files(tmp_path):
    pop = Population(load_population_file(write(tmp_path, GOOD)), 10_000, seed=0)
    assert pop.groups()["tier"].sizes() == {"fast": 4000, "slow": 6000}
    assert pop.groups()["privacy"].sizes() == {"strict": 2500, "open": 7500}
    fast = pop.tier == 0
    assert abs(np.median(pop.seconds_per_unit[fast]) - 0.5) < 0.02  # lognormal median
    assert np.all(pop.seconds_per_unit[~fast] == 5.0) and np.all(np.isinf(pop.download_bytes_per_s[~fast]))
    assert pop.upload_bytes_per_s[fast].min() >= 1e6 and pop.upload_bytes_per_s[fast].max() <= 2e6
    assert abs(pop.on_fraction.mean() - 0.25) < 0.01 and np.all(pop.dropout_probability == 0.2)
    strict = pop.privacy_group == 0
    assert np.all(pop.require_dp[strict]) and not pop.require_dp[~strict].any()
    assert np.all(pop.max_epsilon[strict] == 1.0) and np.all(np.isinf(pop.max_epsilon[~strict]))
    assert pop.fits(3e9).sum() == 4000  # 8000 MB holds 3 GB, 2000 MB does not


def test_privacy_answers_follow_the_device_policy_rules(tmp_path):
    pop = Population(load_population_file(write(tmp_path, GOOD)), 400, seed=0)
    strict = pop.privacy_group == 0
    no_dp = pop.answer_request(0.0)
    assert np.all(no_dp.reason[strict] == "dp-required") and np.all(no_dp.reason[~strict] == "")
    assert np.all(no_dp.epsilon[~strict] == 0) and np.all(np.isnan(no_dp.epsilon[strict]))
    eight = pop.answer_request(8.0)
    assert np.all(eight.reason[strict] == "epsilon-above-policy") and np.all(eight.epsilon[~strict] == 8.0)
    capped = pop.answer_request(8.0, cap_epsilon=True)
    assert not capped.declines.any() and np.all(capped.epsilon[strict] == 1.0)
    assert not pop.answer_request(0.5).declines.any()


def test_toml_syntax_error_is_one_usage_error_naming_file_and_line(tmp_path):
    path = write(tmp_path, "name = \"x\"\n[[tier]\nshare = 1\n")
    with pytest.raises(UsageError, match=r"pop\.toml: not valid TOML \(.*line 2"):
        load_population_file(path)
    with pytest.raises(UsageError, match="not found"):
        load_population_file(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="neither a preset"):
        load_population_spec("cross_device")


@pytest.mark.parametrize("edit, message", [
    (("share = 0.6", "share = 0.7"), r"\[\[tier\]\]: shares sum to 1.1"),
    (("seconds_per_pair = 5.0", "seconds_per_pair = -1"), r"'slow': seconds_per_pair = -1 is out of range"),
    (("seconds_per_pair = 5.0", "seconds_per_token = 5.0"), "seconds_per_pair in every tier or seconds_per_token"),
    (("memory_mb = 2000", "memory = 2000"), r"'slow': unknown key 'memory'"),
    (("probability = 0.2", "probability = { dist = \"lognormal\", median = 0.2, sigma = 1 }"),
     r"\[dropout\]: probability: this lognormal can draw values in \[0, inf\].*max ="),
    (("probability = 0.2", "probability = { dist = \"beta\", a = 1 }"), "dist = 'beta'; use one of constant"),
    (("low = 0.1, high = 0.4", "low = 0.1"), r"on_fraction \(uniform\): missing 'high'"),
    (("model = \"diurnal\"", "model = \"weekly\""), "model = 'weekly'; use one of always, diurnal, trace"),
    (("max_epsilon = 1.0", "max_epsilon = 0"), r"'strict': max_epsilon = 0 is out of range"),
    (("require_dp = true", "require_dp = \"yes\""), "require_dp = 'yes'; write true or false"),
    (("name = \"fast\"", "name = \"fast tier\""), r"#1: name = 'fast tier'"),
    (("[dropout]", "[drop]"), "unknown key 'drop'"),
    (("[availability]", "[availability]\nfile = \"x.json\""), r"\(diurnal\): key 'file' does not apply"),
])
def test_bad_files_name_file_key_and_fix(tmp_path, edit, message):
    old, new = edit
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(UsageError, match=message) as raised:
        load_population_file(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_trace_files_are_validated(tmp_path):
    bad_trace = write(tmp_path, '{"format": "fedpersona-availability/1", "period_s": 100, "devices": '
                                '[{"active": [0, 50], "inactive": [60, 70]}]}', "t.json")
    with pytest.raises(UsageError, match=r"t\.json: devices\[0\]: window 1 \[50, 70\) is not inside \[60, 100\]"):
        load_availability_trace(bad_trace)
    with pytest.raises(UsageError, match="not an availability trace"):
        load_availability_trace(write(tmp_path, '{"devices": []}', "u.json"))
    bad_csv = write(tmp_path, "tier,seconds_per_pair,download_bytes_per_s,upload_bytes_per_s,memory_mb\n"
                              "a,1,2,three,4\n", "d.csv")
    with pytest.raises(UsageError, match=r"d\.csv: data row 1: column upload_bytes_per_s = 'three' is not a number"):
        load_device_profiles(bad_csv)
    missing = write(tmp_path, "[availability]\nmodel = \"trace\"\nfile = \"nowhere.json\"\n")
    with pytest.raises(UsageError, match=r"nowhere\.json: availability trace not found"):
        load_population_file(missing)


def test_device_profiles_are_read_exactly(tmp_path):
    path = write(tmp_path, "# two phones\ntier,seconds_per_token,download_bytes_per_s,upload_bytes_per_s,memory_mb\n"
                           "big,0.01,1e7,inf,8000\nsmall,0.05,1e6,1e5,1500\n", "dev.csv")
    write(tmp_path, "[devices]\nfile = \"dev.csv\"\n", "pop.toml")
    pop = Population(load_population_file(tmp_path / "pop.toml"), 5, seed=0)
    assert pop.compute_unit == "token" and pop.tier_names == ("big", "small")
    np.testing.assert_array_equal(pop.tier, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(pop.seconds_per_unit, [0.01, 0.05, 0.01, 0.05, 0.01])
    assert math.isinf(pop.upload_bytes_per_s[0]) and pop.memory_mb[1] == 1500
    assert load_device_profiles(path).num_devices == 2


def test_shipped_traces_are_the_generators_output():
    import json

    assert json.loads((DATA / "synthetic-day.json").read_text()) == synthetic_availability_trace()
    assert (DATA / "synthetic-devices.csv").read_text() == synthetic_device_profiles()
    assert load_availability_trace(DATA / "synthetic-day.json").num_devices == 48
