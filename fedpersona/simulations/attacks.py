"""Simulated malicious users: the first ``attack-users`` users (by user index) tamper with their train replies.

Settings: ``attack`` (below), ``attack-users`` (how many), ``attack-rounds`` (only rounds 1..k; 0: all),
``attack-scale`` (the factor of ``scale``). Simulation only (the settings are in ``SIMULATION_ONLY``: a deployment server never sends them and a
device declines a message carrying them). The honest reply is computed first, as always (the user's
private adapter and ledger advance as usual); then ``tamper`` rewrites what is sent back. Each attack
breaks one thing the server validates (``fedpersona.strategies.validation``, reason code in brackets):

==================  ====================================================================  ===============
attack              what the reply carries                                                caught as
==================  ====================================================================  ===============
``nan`` / ``inf``   every shared tensor filled with NaN / +Inf                            non-finite
``scale``           the update boosted: ``sent + s * (trained - sent)``, s = attack-scale  update-norm
                    (explicit boosting, Bhagoji et al. 2019, arXiv 1811.12470)
``sign-flip``       the update reversed: ``sent - (trained - sent)`` (same norm as honest)  (not by norm)
``weight-huge``     random tensors with ``num-examples`` 1e9 (one user becomes the model)  bad-weight
``weight-negative`` random tensors with ``num-examples`` -1                               bad-weight
``wrong-shape``     the first tensor replaced by a shape-[1] one (NumPy broadcasts it)      wrong-shape
``missing-key``     the last shared tensor left out                                       missing-key
``extra-key``       one tensor the run does not share added                               extra-key
``random``          random tensors, honest weight                                         update-norm
==================  ====================================================================  ===============

Random tensors are Gaussian with, per tensor, the standard deviation of the honest trained tensor
(plausible magnitudes), seeded per (run seed, user, round). Declined replies are left alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedpersona.protocol import ARRAYS, METRICS, NUM_EXAMPLES, decline_reason

ATTACKS = ("nan", "inf", "scale", "sign-flip", "weight-huge", "weight-negative", "wrong-shape", "missing-key",
           "extra-key", "random")
HUGE_WEIGHT = 1e9
EXTRA_KEY = "attack.extra.weight"


def is_attacker(config: Any, index: int, server_round: int) -> bool:
    """Whether simulated user ``index`` attacks in ``server_round`` (the first ``attack-users`` users, in
    rounds 1..``attack-rounds``, every round when that is 0)."""
    in_round = config.attack_rounds == 0 or server_round <= config.attack_rounds
    return bool(config.attack) and 0 <= index < config.attack_users and in_round


def tamper(config: Any, index: int, reply: RecordDict, request: RecordDict) -> RecordDict:
    """The reply user ``index`` sends: ``reply`` itself unless the user is malicious (see module docstring).

    ``request``: the server's train message content (its ``arrays`` are the global tensors sent)."""
    server_round = int(request.config_records["config"].get("server-round", 0)) if "config" in request else 0
    if not is_attacker(config, index, server_round) or decline_reason(reply) is not None:
        return reply
    trained = {k: v.numpy() for k, v in reply[ARRAYS].items()}
    sent_record = request.array_records.get(ARRAYS)
    sent = {k: v.numpy() for k, v in sent_record.items()} if sent_record is not None else {}
    metrics = dict(reply[METRICS])
    rng = np.random.default_rng([config.seed, index, server_round])
    arrays = _tampered(config.attack, trained, sent, config.attack_scale, rng)
    if config.attack == "weight-huge":
        metrics[NUM_EXAMPLES] = HUGE_WEIGHT
    elif config.attack == "weight-negative":
        metrics[NUM_EXAMPLES] = -1
    return RecordDict({ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                       METRICS: MetricRecord(metrics)})


def _tampered(attack: str, trained: dict[str, np.ndarray], sent: dict[str, np.ndarray], scale: float,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    def base(key: str) -> np.ndarray:
        return sent.get(key, np.zeros_like(trained[key]))

    if attack in ("nan", "inf"):
        return {k: np.full_like(v, np.nan if attack == "nan" else np.inf) for k, v in trained.items()}
    if attack in ("scale", "sign-flip"):
        factor = scale if attack == "scale" else -1.0
        return {k: (base(k) + factor * (v - base(k))).astype(v.dtype) for k, v in trained.items()}
    if attack in ("weight-huge", "weight-negative", "random"):
        return {k: rng.normal(0.0, float(v.std()) or 1e-2, size=v.shape).astype(v.dtype) for k, v in trained.items()}
    keys = list(trained)
    if attack == "wrong-shape" and keys:
        return {**trained, keys[0]: trained[keys[0]].reshape(-1)[:1].copy()}
    if attack == "missing-key" and keys:
        return {k: v for k, v in trained.items() if k != keys[-1]}
    if attack == "extra-key":
        return {**trained, EXTRA_KEY: np.zeros(4, dtype=np.float32)}
    return trained
