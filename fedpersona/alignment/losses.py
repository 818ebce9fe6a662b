"""DPO-family pairwise losses, per pair (no reduction), so privacy code can treat each pair as a record.

Inputs are summed response log-probs under the policy (``pc``, ``pr``) and the frozen reference
(``rc``, ``rr``), plus response lengths for the length-normalised SimPO.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedpersona.errors import UsageError

PairLoss = Callable[..., torch.Tensor]


def dpo_loss(pc, pr, rc, rr, *, beta: float, **_: object) -> torch.Tensor:
    """DPO (Rafailov et al., 2023, arXiv 2305.18290): -log sigmoid(beta * margin of log-ratios)."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def ipo_loss(pc, pr, rc, rr, *, beta: float, **_: object) -> torch.Tensor:
    """IPO (Azar et al., 2023, arXiv 2310.12036): squared distance of the log-ratio margin to 1/(2 beta)."""
    return (((pc - rc) - (pr - rr)) - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(pc, pr, rc, rr, *, beta: float, len_c, len_r, gamma: float = 0.5, **_: object) -> torch.Tensor:
    """SimPO (Meng et al., 2024, arXiv 2405.14734): reference-free, length-normalised, target margin gamma."""
    return -F.logsigmoid(beta * (pc / len_c.clamp(min=1) - pr / len_r.clamp(min=1)) - gamma)


LOSSES: dict[str, PairLoss] = {"dpo": dpo_loss, "ipo": ipo_loss, "simpo": simpo_loss}


def get_loss(name: str) -> PairLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise UsageError(f"--loss {name}: unknown loss; choose one of {', '.join(LOSSES)}") from None
