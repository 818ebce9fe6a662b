"""User-level DP (DP-FedAvg, McMahan et al. 2018, arXiv 1710.06963) with Flower's clipping wrappers.

The privacy unit here is a whole user: each sampled user's shared-adapter update (returned minus sent)
is clipped to norm C on the device (``fixedclipping_mod``), the server adds Gaussian noise of std
``z * C / m`` to the average (``DifferentialPrivacyClientSideFixedClipping``), every update counts the
same (``num-examples`` is a constant 1: weighting by data size would break the analysis), and the
round-by-round loss composes over rounds with subsampling rate ``q = m / N``.

Accounting. Flower 1.41 keeps no cross-round epsilon with subsampling, so it is computed here with the
RDP accountant of the sampled Gaussian mechanism. Flower samples exactly m users without replacement,
while the amplification bound assumes Poisson sampling (the standard DP-FedAvg approximation), so the
summary also reports the bound with no amplification (q = 1), which holds regardless of sampling.
The private adapter and the pair-level ledger are separate guarantees: they are reported apart,
each with its own delta, and never added.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod

from fedpersona.privacy.accountant import epsilon
from fedpersona.protocol import COHORT

CLIPPING_NORM_KEY = "clipping_norm"  # the key Flower's client-side wrapper sends to fixedclipping_mod


def wrap_strategy(strategy: Any, *, noise_multiplier: float, clipping_norm: float, num_sampled: int) -> Any:
    """Wrap ``strategy`` with client-side fixed clipping and server-side noise (Flower's wrapper)."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    return DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=noise_multiplier, clipping_norm=clipping_norm, num_sampled_clients=num_sampled
    )


def clipping_mod_when_asked(msg: Message, context: Context, call_next):
    """``fixedclipping_mod`` when the server asked for clipping (user-level DP on), a no-op otherwise.

    Flower's mod fails a message that carries no clipping norm, so it cannot sit on the ClientApp
    unconditionally; this keeps one ClientApp for runs with and without user-level DP. A simulation's
    cohort message (several users) passes through: the ClientApp clips each user's reply itself
    (``clip_user_reply``).
    """
    config = msg.content.config_records.get("config")
    if config is not None and CLIPPING_NORM_KEY in config and COHORT not in msg.content.config_records:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def clip_user_reply(view: Message, context: Context, call_next) -> Message:
    """``fixedclipping_mod`` on one user's reply of a cohort (``fedpersona.client.cohort.user_view``)."""
    return fixedclipping_mod(view, context, call_next)


def user_level_report(*, noise_multiplier: float, num_sampled: int, num_users: int, rounds: int,
                      delta: float) -> dict[str, float | None]:
    """User-level epsilon after ``rounds`` rounds: with amplification by sampling, and without."""
    if noise_multiplier <= 0 or rounds <= 0:
        return {"user_level_epsilon": None, "user_level_epsilon_no_amplification": None, "user_level_delta": delta}
    q = min(1.0, num_sampled / num_users)
    return {
        "user_level_epsilon": epsilon(noise_multiplier, q, rounds, delta, "rdp"),
        "user_level_epsilon_no_amplification": epsilon(noise_multiplier, 1.0, rounds, delta, "rdp"),
        "user_level_delta": delta,
    }
