"""FedProx's proximal term on the shared tensors (Li et al., 2020, arXiv 1812.06127).

FedProx adds ``mu/2 * ||w - w_t||^2`` to each client's local objective, ``w_t`` being the global weights
the round started from. Here it applies to the SHARED tensors only: private tensors never leave the
device and have no global value to stay close to. The strategy sends ``mu`` as ``proximal-mu`` in the
train config; the client trains inside ``proximal_term``.

The term's gradient, ``mu * (w - w_t)``, is added to each shared tensor's gradient right before every
optimizer step (a global optimizer step pre-hook, active only inside the block). That is the gradient
of the FedProx objective, and it also works under DP-SGD: Opacus replaces ``.grad`` with the clipped,
noised per-pair sum before the inner AdamW steps, and the hook adds the data-independent term after
that (post-processing: no privacy cost).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


@contextmanager
def proximal_term(params: Iterable[torch.nn.Parameter], mu: float) -> Iterator[None]:
    """Within the block, every optimizer step of ``params`` follows the gradient of the FedProx term too."""
    params = list(params)
    if mu <= 0 or not params:
        yield
        return
    anchors = {id(p): p.detach().clone() for p in params}

    def add_proximal_gradient(optimizer: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                anchor = anchors.get(id(p))
                if anchor is not None and p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=mu)

    handle = register_optimizer_step_pre_hook(add_proximal_gradient)
    try:
        yield
    finally:
        handle.remove()
