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

An attack of your own (``--set attack=myattacks:flip_half``, or ``@fedpersona.register_attack("name")``):
a function ``attack(trained, sent, num_examples, *, scale, rng, **args) -> (arrays, num_examples)``:
``trained``/``sent`` map the shared tensor names to the honest reply's / the server's arrays (NumPy),
``num_examples`` is the honest weight, ``scale`` the ``attack-scale`` setting and ``rng`` a seeded
``numpy.random.Generator``; it returns the arrays and weight to send.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedpersona.plugins import Registry, typed_arguments
from fedpersona.protocol import ARRAYS, METRICS, NUM_EXAMPLES, decline_reason

HUGE_WEIGHT = 1e9
EXTRA_KEY = "attack.extra.weight"
Arrays = dict[str, np.ndarray]
Attack = Callable[..., tuple[Arrays, float]]


def _check_attack(obj: object) -> Attack:
    if not callable(obj):
        raise TypeError(f"{obj!r} is not a function attack(trained, sent, num_examples, *, scale, rng)")
    return obj


ATTACKS: Registry[Attack] = Registry("attack", "attack", _check_attack)


def register_attack(name: str, fn: Attack | None = None, *, replace: bool = False) -> Any:
    """Register a simulated attack (usable as ``--set attack=NAME``); a decorator without ``fn``.

    Args:
        name: the attack's name.
        fn: ``fn(trained, sent, num_examples, *, scale, rng, **args) -> (arrays, num_examples)`` (see the
            module docstring).
        replace: replace an existing attack of that name.

    Returns:
        ``fn`` (or the decorator).

    Raises:
        ValueError: the name is taken.
    """
    return ATTACKS.register(name, fn, replace=replace)


def _base(trained: Arrays, sent: Arrays, key: str) -> np.ndarray:
    return sent.get(key, np.zeros_like(trained[key]))


def _random_like(trained: Arrays, rng: np.random.Generator) -> Arrays:
    return {k: rng.normal(0.0, float(v.std()) or 1e-2, size=v.shape).astype(v.dtype) for k, v in trained.items()}


@register_attack("nan")
def nan_attack(trained: Arrays, sent: Arrays, num_examples: float, **_: Any) -> tuple[Arrays, float]:
    """Every shared tensor filled with NaN (caught as ``non-finite``)."""
    return {k: np.full_like(v, np.nan) for k, v in trained.items()}, num_examples


@register_attack("inf")
def inf_attack(trained: Arrays, sent: Arrays, num_examples: float, **_: Any) -> tuple[Arrays, float]:
    """Every shared tensor filled with +Inf (caught as ``non-finite``)."""
    return {k: np.full_like(v, np.inf) for k, v in trained.items()}, num_examples


@register_attack("scale")
def scale_attack(trained: Arrays, sent: Arrays, num_examples: float, *, scale: float, **_: Any) -> tuple[Arrays, float]:
    """The update boosted, ``sent + scale * (trained - sent)`` (Bhagoji et al. 2019, arXiv 1811.12470)."""
    return {k: (_base(trained, sent, k) + scale * (v - _base(trained, sent, k))).astype(v.dtype)
            for k, v in trained.items()}, num_examples


@register_attack("sign-flip")
def sign_flip_attack(trained: Arrays, sent: Arrays, num_examples: float, **_: Any) -> tuple[Arrays, float]:
    """The update reversed, ``sent - (trained - sent)``: an honest norm, the opposite direction."""
    return {k: (2 * _base(trained, sent, k) - v).astype(v.dtype) for k, v in trained.items()}, num_examples


@register_attack("weight-huge")
def weight_huge_attack(trained: Arrays, sent: Arrays, num_examples: float, *, rng: np.random.Generator,
                       **_: Any) -> tuple[Arrays, float]:
    """Random tensors claiming ``num-examples`` 1e9 (one user becomes the model)."""
    return _random_like(trained, rng), HUGE_WEIGHT


@register_attack("weight-negative")
def weight_negative_attack(trained: Arrays, sent: Arrays, num_examples: float, *, rng: np.random.Generator,
                           **_: Any) -> tuple[Arrays, float]:
    """Random tensors claiming ``num-examples`` -1."""
    return _random_like(trained, rng), -1


@register_attack("wrong-shape")
def wrong_shape_attack(trained: Arrays, sent: Arrays, num_examples: float, **_: Any) -> tuple[Arrays, float]:
    """The first tensor replaced by a shape-[1] one (NumPy would broadcast it into every coordinate)."""
    keys = list(trained)
    return ({**trained, keys[0]: trained[keys[0]].reshape(-1)[:1].copy()} if keys else trained), num_examples


@register_attack("missing-key")
def missing_key_attack(trained: Arrays, sent: Arrays, num_examples: float, **_: Any) -> tuple[Arrays, float]:
    """The last shared tensor left out."""
    keys = list(trained)
    return ({k: v for k, v in trained.items() if k != keys[-1]} if keys else trained), num_examples


@register_attack("extra-key")
def extra_key_attack(trained: Arrays, sent: Arrays, num_examples: float, **_: Any) -> tuple[Arrays, float]:
    """One tensor the run does not share, added."""
    return {**trained, EXTRA_KEY: np.zeros(4, dtype=np.float32)}, num_examples


@register_attack("random")
def random_attack(trained: Arrays, sent: Arrays, num_examples: float, *, rng: np.random.Generator,
                  **_: Any) -> tuple[Arrays, float]:
    """Random tensors of plausible magnitude with the honest weight."""
    return _random_like(trained, rng), num_examples


def is_attacker(config: Any, index: int, server_round: int) -> bool:
    """Whether simulated user ``index`` attacks in ``server_round`` (the first ``attack-users`` users, in
    rounds 1..``attack-rounds``, every round when that is 0)."""
    in_round = config.attack_rounds == 0 or server_round <= config.attack_rounds
    return bool(config.attack) and 0 <= index < config.attack_users and in_round


def tamper(config: Any, index: int, reply: RecordDict, request: RecordDict) -> RecordDict:
    """The reply user ``index`` sends: ``reply`` itself unless the user is malicious (see module docstring).

    Args:
        config: the run configuration (``attack``, ``attack-users``, ``attack-rounds``, ``attack-scale``, ``seed``).
        index: the simulated user.
        reply: its honest training reply.
        request: the server's train message content (its ``arrays`` are the global tensors sent).

    Returns:
        The reply to send (a new ``RecordDict`` when tampered).
    """
    server_round = int(request.config_records["config"].get("server-round", 0)) if "config" in request else 0
    if not is_attacker(config, index, server_round) or decline_reason(reply) is not None:
        return reply
    attack, args = ATTACKS.get(config.attack)
    trained = {k: v.numpy() for k, v in reply[ARRAYS].items()}
    sent_record = request.array_records.get(ARRAYS)
    sent = {k: v.numpy() for k, v in sent_record.items()} if sent_record is not None else {}
    metrics = dict(reply[METRICS])
    rng = np.random.default_rng([config.seed, index, server_round])
    kwargs = typed_arguments(attack, args, f"attack {config.attack}", reserved=("scale", "rng"), named_only=True)
    arrays, weight = attack(trained, sent, metrics[NUM_EXAMPLES], scale=config.attack_scale, rng=rng, **kwargs)
    metrics[NUM_EXAMPLES] = weight
    return RecordDict({ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                       METRICS: MetricRecord(metrics)})
