"""DPO-family pairwise losses, per pair (no reduction), so privacy code can treat each pair as a record.

Every loss has one signature, the contract a plug-in loss follows too::

    loss(pc, pr, rc, rr, *, beta, len_c, len_r, **hyperparameters) -> Tensor[n]

``pc``/``pr``: summed log-probs (nats) of the chosen / rejected response tokens under the policy, shape
``[n]`` for ``n`` pairs; ``rc``/``rr``: the same under the frozen reference model (base, no adapters);
``len_c``/``len_r``: response lengths in tokens, ``[n]``; ``beta``: the run's ``beta`` setting. It returns
one loss per pair (``[n]``, no reduction): DP-SGD clips each pair's gradient on its own, and the trainer
takes the mean over a batch. Hyperparameters come from the spec: ``--set loss='cdpo(label_smoothing=0.2)'``.

A loss of your own: ``@fedpersona.register_loss("name")`` on a function with that signature, or name it by
import path without registering (``--set loss=mylosses:my_loss``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fedpersona.plugins import Registry, typed_arguments

PairLoss = Callable[..., torch.Tensor]
RESERVED = ("beta", "len_c", "len_r")  # what the trainer passes itself


def _check_loss(obj: object) -> PairLoss:
    if not callable(obj):
        raise TypeError(f"{obj!r} is not callable")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return obj  # a builtin or C callable: trust it
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_var = any(p.kind is p.VAR_POSITIONAL for p in params.values())
    if len(positional) < 4 and not takes_var:
        raise TypeError("a pairwise loss takes (pc, pr, rc, rr, *, beta, len_c, len_r, **hyperparameters)")
    return obj


LOSSES: Registry[PairLoss] = Registry("loss", "loss", _check_loss)


def register_loss(name: str, fn: PairLoss | None = None, *, replace: bool = False) -> Any:
    """Register a pairwise loss under ``name`` (usable as ``--set loss=name``); a decorator without ``fn``.

    Args:
        name: the loss's name.
        fn: ``fn(pc, pr, rc, rr, *, beta, len_c, len_r, **hyperparameters) -> Tensor[n]`` (see the module
            docstring for shapes and units).
        replace: replace an existing loss of that name.

    Returns:
        ``fn``, or a decorator.

    Raises:
        ValueError: the name is taken.
        fedpersona.errors.UsageError: ``fn`` does not have a loss's signature.
    """
    return LOSSES.register(name, fn, replace=replace)


def _margin(pc, pr, rc, rr) -> torch.Tensor:
    """The DPO log-ratio margin ``(pc - rc) - (pr - rr)``, ``[n]``."""
    return (pc - rc) - (pr - rr)


@register_loss("dpo")
def dpo_loss(pc, pr, rc, rr, *, beta: float, **_: object) -> torch.Tensor:
    """DPO (Rafailov et al., 2023, arXiv 2305.18290): ``-log sigmoid(beta * margin)``.

    Args:
        pc, pr, rc, rr: summed response log-probs (policy chosen/rejected, reference chosen/rejected), ``[n]``.
        beta: KL strength.

    Returns:
        Per-pair loss, ``[n]``.
    """
    return -F.logsigmoid(beta * _margin(pc, pr, rc, rr))


@register_loss("ipo")
def ipo_loss(pc, pr, rc, rr, *, beta: float, **_: object) -> torch.Tensor:
    """IPO (Azar et al., 2023, arXiv 2310.12036): squared distance of the margin to ``1/(2 beta)``.

    Args:
        pc, pr, rc, rr: summed response log-probs, ``[n]``.
        beta: regularisation strength (the target margin is ``1/(2 beta)``).

    Returns:
        Per-pair loss, ``[n]``.
    """
    return (_margin(pc, pr, rc, rr) - 1.0 / (2.0 * beta)) ** 2


@register_loss("simpo")
def simpo_loss(pc, pr, rc, rr, *, beta: float, len_c, len_r, gamma: float = 0.5, **_: object) -> torch.Tensor:
    """SimPO (Meng et al., 2024, arXiv 2405.14734): reference-free, length-normalised, target margin gamma.

    Args:
        pc, pr: summed policy log-probs of chosen / rejected, ``[n]`` (the reference is not used).
        beta: reward scale.
        len_c, len_r: response lengths in tokens, ``[n]``.
        gamma: target reward margin.

    Returns:
        Per-pair loss, ``[n]``.
    """
    return -F.logsigmoid(beta * (pc / len_c.clamp(min=1) - pr / len_r.clamp(min=1)) - gamma)


@register_loss("cdpo")
def cdpo_loss(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.1, **_: object) -> torch.Tensor:
    """Conservative DPO (Mitchell, 2023, "A note on DPO with noisy preferences"; TRL's ``label_smoothing``):
    each label is taken to be flipped with probability ``label_smoothing``, so the loss is the expected
    DPO loss under that noise, ``(1 - e) * dpo(margin) + e * dpo(-margin)``; it stops pushing a pair's margin
    once the pair is confidently ranked, which keeps the policy closer to the reference.

    Args:
        pc, pr, rc, rr: summed response log-probs, ``[n]``.
        beta: KL strength.
        label_smoothing: the assumed label-flip probability ``e`` in [0, 0.5).

    Returns:
        Per-pair loss, ``[n]``.

    Raises:
        ValueError: ``label_smoothing`` outside [0, 0.5).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"cdpo label_smoothing={label_smoothing}: must be in [0, 0.5)")
    logits = beta * _margin(pc, pr, rc, rr)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register_loss("rpo")
def rpo_loss(pc, pr, rc, rr, *, beta: float, len_c, alpha: float = 1.0, **_: object) -> torch.Tensor:
    """RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization", arXiv 2404.19733; TRL's
    ``rpo_alpha``): DPO plus ``alpha`` times the chosen response's negative log-likelihood per token. The
    likelihood term keeps the chosen answer probable, countering the *likelihood displacement* of plain DPO
    (both responses' probabilities fall; on small models the text then degenerates into repetition).

    Args:
        pc, pr, rc, rr: summed response log-probs, ``[n]``.
        beta: KL strength of the DPO part.
        len_c: chosen response lengths in tokens, ``[n]``.
        alpha: weight of the NLL term.

    Returns:
        Per-pair loss, ``[n]``.
    """
    return dpo_loss(pc, pr, rc, rr, beta=beta) - alpha * pc / len_c.clamp(min=1)


def get_loss(spec: str) -> PairLoss:
    """The loss a spec names, its hyperparameters bound: ``dpo``, ``cdpo(label_smoothing=0.2)``,
    ``mylosses:my_loss(scale=2)``.

    Args:
        spec: a registered name or ``package.module:NAME``, optionally with ``(key=value, ...)``.

    Returns:
        ``fn(pc, pr, rc, rr, *, beta, len_c, len_r) -> Tensor[n]``.

    Raises:
        fedpersona.errors.UsageError: an unknown loss, a broken plug-in, or an argument the loss does not take.
    """
    fn, args = LOSSES.get(spec)
    if not args:
        return fn
    return functools.partial(fn, **typed_arguments(fn, args, f"loss {spec}", reserved=RESERVED,
                                                        named_only=True))
