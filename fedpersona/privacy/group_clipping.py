"""Group-wise per-pair clipping: the shared and the private tensors each get a share of the clip norm.

DP-SGD clips each pair's gradient to norm ``C`` and adds ``N(0, (sigma C)^2)`` noise per coordinate. With
one joint clip, the share of ``C`` a group of tensors receives is whatever share of the pair's gradient
norm it happens to have: PAL's two private mixture logits carry ~15% of a pair's gradient norm next to
the 35k prototype entries, so after clipping their signal is ~0.15 C against the same sigma C noise.

Group-wise clipping (McMahan et al. 2018, arXiv 1710.06963, "per-layer clipping"; He et al. 2022, arXiv
2212.01539) clips each group g to its own ``C_g`` with ``sum_g C_g^2 = C^2``. A pair's clipped gradient
over all tensors still has norm at most ``C`` (the concatenation of group vectors of norms ``<= C_g``),
so the sensitivity, the noise ``sigma C`` on every coordinate and the accountant are exactly those of
the joint clip: the guarantee is unchanged, only how ``C`` is spent. ``private_share`` ``f`` gives the
private group ``C sqrt(f)`` and the shared group ``C sqrt(1 - f)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed


def group_norms(max_grad_norm: float, private_share: float) -> tuple[float, float]:
    """(private, shared) clip norms whose squares add up to ``max_grad_norm ** 2``."""
    if not 0.0 < private_share < 1.0:
        raise ValueError(f"private share {private_share!r} must be in (0, 1)")
    return max_grad_norm * math.sqrt(private_share), max_grad_norm * math.sqrt(1.0 - private_share)


class GroupClippingDPOptimizer(DPOptimizer):
    """``DPOptimizer`` that clips each pair's gradient per group of parameters (``groups``: one label per
    parameter of the wrapped optimizer, in its order) to that group's norm in ``group_max_norms``.
    ``max_grad_norm`` (the noise scale) must be the root sum of squares of the group norms."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, groups: Sequence[int], group_max_norms: Sequence[float],
                 max_grad_norm: float, **kwargs) -> None:
        super().__init__(optimizer, max_grad_norm=max_grad_norm, **kwargs)
        if len(groups) != len(self.params):
            raise ValueError(f"{len(groups)} group labels for {len(self.params)} parameters")
        if not math.isclose(math.sqrt(sum(c * c for c in group_max_norms)), max_grad_norm, rel_tol=1e-9):
            raise ValueError("the group clip norms must add up (in squares) to max_grad_norm")
        self.groups = list(groups)
        self.group_max_norms = list(group_max_norms)

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        batch = len(samples[0])
        factors: list[torch.Tensor] = []
        for label, norm in enumerate(self.group_max_norms):
            members = [g for g, group in zip(samples, self.groups, strict=True) if group == label]
            if batch == 0 or not members:
                factors.append(torch.zeros((batch,), device=samples[0].device))
                continue
            norms = torch.stack([g.reshape(batch, -1).norm(2, dim=-1) for g in members], dim=1).norm(2, dim=1)
            factors.append((norm / (norms + 1e-6)).clamp(max=1.0))
        for p, label in zip(self.params, self.groups, strict=True):
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factors[label].to(grad_sample.device, p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)
