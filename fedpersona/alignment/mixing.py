"""Inference-time personalization: mix the personal and the global model's next-token distributions.

Decoding-time Realignment (DeRa; Liu et al., "Decoding-time Realignment of Language Models", ICML 2024,
arXiv 2402.02992) shows that the model aligned with KL strength ``beta / lambda`` is, token by token,
approximately a geometric mixture of the reference model and the model aligned with strength ``beta``::

    pi_lambda(y_t | x, y_<t)  ∝  pi_global(y_t | x, y_<t) ** (1 - lambda)  *  pi_personal(y_t | x, y_<t) ** lambda

that is, the softmax of the ``lambda``-weighted sum of the two models' log-probabilities. Here the reference
is the **global** model (base + shared adapter, the private tensors at their initial values) and the
aligned model is the user's **personal** model (base + shared + trained private adapter): ``lambda`` is a
per-user weight chosen at decoding time, without retraining. 0 is the global model, 1 the personal model
(both exactly: a single forward is run then), between 0 and 1 interpolates, above 1 extrapolates (more
personal than training made it, which DeRa finds useful when training under-regularised the reference).
The price is two forwards per generated token, each with its own KV cache.

Beside it, the weight-space knob (``AdapterState.private_strength``, ``--method weights``) interpolates
the private tensors themselves: one forward per token, but not linear in its effect and never beyond 1.

Shapes: ``personal_logits`` and ``global_logits`` are ``[..., V]`` (one decoding step: ``[batch, V]``, any
leading dimensions; ``V`` the vocabulary), of any float dtype; ``weight`` a Python float. The result is
``[..., V]`` float32 log-probabilities (normalised with ``log_softmax``). A token either model rules out
(``-inf``) stays ruled out whatever the weight (with ``weight > 1`` the global term's coefficient is
negative and would otherwise turn its ``-inf`` into ``+inf``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedpersona.model.adapters import AdapterState, Role

# The largest mixing weight accepted: 1 is the personal model; DeRa explores extrapolation up to a few times
# the trained strength, beyond which a small model's text degrades into its favourite tokens.
MAX_MIX_WEIGHT = 4.0


def mix_logprobs(personal_logits: torch.Tensor, global_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """``log_softmax(weight * log p_personal + (1 - weight) * log p_global)`` over the last dimension."""
    if personal_logits.shape != global_logits.shape:
        raise ValueError(f"logits of different shapes: personal {tuple(personal_logits.shape)}, "
                         f"global {tuple(global_logits.shape)}")
    personal = torch.log_softmax(personal_logits.float(), dim=-1)
    global_ = torch.log_softmax(global_logits.float(), dim=-1)
    if weight == 1.0:
        return personal
    if weight == 0.0:
        return global_
    allowed = torch.isfinite(personal) & torch.isfinite(global_)
    mixed = weight * personal.masked_fill(~allowed, 0.0) + (1.0 - weight) * global_.masked_fill(~allowed, 0.0)
    return torch.log_softmax(mixed.masked_fill(~allowed, float("-inf")), dim=-1)


class PrivateViews:
    """The personal and the global view of one resident model, switched by copying the private tensors.

    ``personal`` is the private tensors as loaded (strength 1), ``global`` their initial values (what
    ``private_strength(0)`` gives). A switch copies the private tensors only (a few KB to MB; far less than a
    second model in memory). Use as a context manager: the personal tensors are back in place afterwards.
    """

    def __init__(self, adapters: AdapterState) -> None:
        self.adapters = adapters
        self.names = adapters.names(Role.PRIVATE)
        self.personal = {n: adapters.params[n].detach().clone() for n in self.names}
        self.current = "personal"

    @property
    def differ(self) -> bool:
        """Whether the two views are different models (False without private tensors or before training)."""
        return any(not torch.equal(self.personal[n], self.adapters.initial[n]) for n in self.names)

    @torch.no_grad()
    def use(self, view: str) -> None:
        if view == self.current:
            return
        source = self.personal if view == "personal" else self.adapters.initial
        for n in self.names:
            self.adapters.params[n].copy_(source[n])
        self.current = view

    def __enter__(self) -> PrivateViews:
        return self

    def __exit__(self, *exc: object) -> None:
        self.use("personal")


@contextmanager
def private_views(adapters: AdapterState) -> Iterator[PrivateViews]:
    """``PrivateViews`` of ``adapters`` for the duration of the block (personal tensors restored after)."""
    with PrivateViews(adapters) as views:
        yield views
