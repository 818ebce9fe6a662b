"""Simulated attacks on real reply records: what each one sends, and who makes it when."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpersona.config import RunConfig
from fedpersona.protocol import status_record
from fedpersona.strategies.attacks import ATTACKS, EXTRA_KEY, tamper
from fedpersona.strategies.validation import TensorSpec, tensor_problem

SENT = {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)}
TRAINED = {"a": np.full((2, 3), 1.5, np.float32), "b": np.arange(4, dtype=np.float32)}
CONFIG = RunConfig(num_users=4, rounds=3, attack_users=2, attack="nan")


def request(server_round: int = 1) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in SENT.items()}),
                       "config": ConfigRecord({"server-round": server_round})})


def reply() -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in TRAINED.items()}),
                       "metrics": MetricRecord({"num-examples": 12, "declined": 0})})


def sent_arrays(content: RecordDict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in content["arrays"].items()}


@pytest.mark.parametrize("attack", ATTACKS.names())
def test_each_attack_breaks_what_its_reason_names(attack):
    out = tamper(CONFIG.replace(attack=attack), 0, reply(), request())
    arrays, weight = sent_arrays(out), out["metrics"]["num-examples"]
    expected = {"nan": "non-finite", "inf": "non-finite", "wrong-shape": "wrong-shape", "missing-key": "missing-key",
                "extra-key": "extra-key"}
    problem = tensor_problem(out["arrays"], TensorSpec.of(request()["arrays"]))
    assert (problem[0] if problem else None) == expected.get(attack)
    if attack == "scale":  # sent + 1e6 * (trained - sent)
        np.testing.assert_allclose(arrays["a"], 1.0 + 1e6 * 0.5)
        np.testing.assert_allclose(arrays["b"], 1e6 * np.arange(4))
    if attack == "sign-flip":  # sent - (trained - sent): same norm, opposite direction
        np.testing.assert_allclose(arrays["a"], 0.5)
        np.testing.assert_allclose(arrays["b"], -np.arange(4))
    assert weight == {"weight-huge": 1e9, "weight-negative": -1}.get(attack, 12)
    if attack in ("weight-huge", "weight-negative", "random"):
        assert not np.allclose(arrays["b"], TRAINED["b"]) and arrays["b"].dtype == np.float32
    if attack == "extra-key":
        assert EXTRA_KEY in arrays


def test_only_the_first_attack_users_attack_and_only_in_attack_rounds():
    assert tamper(CONFIG, 2, reply(), request())["arrays"]["a"].numpy()[0, 0] == 1.5  # user 2: honest
    assert np.isnan(tamper(CONFIG, 1, reply(), request())["arrays"]["a"].numpy()).all()
    once = CONFIG.replace(attack_rounds=1)
    assert np.isnan(tamper(once, 0, reply(), request(1))["arrays"]["a"].numpy()).all()
    assert tamper(once, 0, reply(), request(2))["arrays"]["a"].numpy()[0, 0] == 1.5
    assert tamper(RunConfig(num_users=4), 0, reply(), request())["arrays"]["a"].numpy()[0, 0] == 1.5


def test_a_declined_reply_is_left_alone():
    declined = RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 0, "declined": 1}),
                           "status": ConfigRecord(status_record("budget-spent"))})
    assert tamper(CONFIG, 0, declined, request()) is declined


def test_random_tensors_are_seeded_by_user_and_round():
    attack = CONFIG.replace(attack="random")
    first, again = (sent_arrays(tamper(attack, 0, reply(), request(1))) for _ in range(2))
    other = sent_arrays(tamper(attack, 0, reply(), request(2)))
    np.testing.assert_array_equal(first["b"], again["b"])
    assert not np.array_equal(first["b"], other["b"])


def test_sign_flip_passes_the_screen_it_is_for_the_robust_rules():
    """The one attack validation cannot see (honest norm, weight and shape): benchmarks/robustness.py."""
    out = tamper(CONFIG.replace(attack="sign-flip"), 0, reply(), request())
    assert tensor_problem(out["arrays"], TensorSpec.of(request()["arrays"])) is None
