"""PAL: K shared prototype adapters mixed by private per-user weights (Chen et al., arXiv 2406.08469).

PAL models a user's preference as a mixture of K shared prototypes with user-specific weights on the
simplex. Here the prototypes are K LoRA adapters on the same base (all SHARED: aggregated by the server)
and the mixture is a private K-vector of logits per user: the input of prototype k's ``lora_B`` in every
layer is scaled by ``g_k = K * softmax(s * logits)_k`` (a forward pre-hook), so

    personalized = base + sum_k g_k(user) * B_k A_k x,      global = the uniform mixture (g_k = 1).

Only the K logits are private (and what a new user fits from a few pairs: PAL's cold-start claim).
``s`` (``LOGIT_SCALE``) is a fixed reparameterisation: the optimizer trains ``logits`` at the run's
private learning rate, and the effective logits move ``s`` times faster, so a mixture can become
decisive within one local round.

The global model is the uniform mixture (logits 0, what ``private_strength(0)`` returns to). A training
user's first round starts from random logits of its own (``init_mixture``, std ``INIT_STD``
before scaling): with every user at the uniform mixture the prototypes would receive identical updates
and never specialise; random private starting points break that symmetry (as random initialisation of
mixture models does), and users then move towards the prototype that suits them. A new user starts
from the uniform mixture and fits it on its few pairs.

Responsibility-weighted updates (``weight_update``). Centrally, the gradient that user u's data gives
prototype k is scaled by u's gain ``g_k``, so prototypes specialise on the users who lean on them. Local
Adam normalises that scale away (every prototype moves about ``lr`` per step whatever its gain), and
plain averaging then keeps all prototypes alike, which leaves the mixture nothing to choose from. So a
user sends ``w_t + g_k * (w_local - w_t)`` for prototype k, as an EM step weights each component's
update by the responsibility. What this reveals: the size of a user's update per prototype shows
roughly which prototypes it leans on (plain federated SGD on PAL would reveal the same through the
gradients); the mixture logits themselves never leave the device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from fedpersona.model.adapters import AdapterLayout, AdapterState, Role, SplitPolicy

MIXTURE_MODULE = "lora_pal_mixture"  # the name holds "lora_" so AdapterState manages it with the adapters
MIXTURE_TENSOR = f"{MIXTURE_MODULE}.logits"
LOGIT_SCALE = 10.0
INIT_STD = 0.25  # std of a training user's first logits (x LOGIT_SCALE: 2.5 units of effective logit)


def prototype_names(k: int) -> list[str]:
    return [f"proto{i}" for i in range(k)]


class PalMixture(torch.nn.Module):
    """A user's private mixture logits over K prototypes; ``gains()`` are the per-prototype scales.

    Called as ``mixture(k, x)`` on the input of each of prototype k's ``lora_B`` layers (a forward
    pre-hook), so ``lora_B(g_k x) = g_k B_k A_k x``. Being a called module lets DP-SGD take per-pair
    gradients of the logits (``per_sample_gradients``, Opacus's grad-sampler signature) while Opacus's
    own hooks on ``lora_B`` still see the true input and output of that layer (scaling the *output*
    with a forward hook would hide the scale from its backward hook and give wrong per-pair grads).
    """

    def __init__(self, k: int, scale: float = LOGIT_SCALE) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(k))
        self.scale = scale

    def gains(self) -> torch.Tensor:
        k = self.logits.numel()
        return k * torch.softmax(self.scale * self.logits, dim=0)

    def forward(self, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # x last: Opacus reads the batch off it
        return x * self.gains()[k].to(x.dtype)

    def per_sample_gradients(self, activations: Sequence[torch.Tensor], backprops: torch.Tensor
                             ) -> dict[torch.nn.Parameter, torch.Tensor]:
        """Per-sample gradient of the logits from one call ``y = g_k x`` (dim 0 of ``x`` is the batch):
        ``dL_i/dlogits = <x_i, dL_i/dy_i> * dg_k/dlogits`` with ``dg_k/dl_j = K s p_k (1[j=k] - p_j)``."""
        k, x = int(activations[0]), activations[1]
        contribution = (x * backprops).flatten(1).sum(1).to(self.logits.dtype)  # dL_i/dg_k
        p = torch.softmax(self.scale * self.logits.detach(), dim=0)
        jacobian_row = self.logits.numel() * self.scale * p[k] * (torch.nn.functional.one_hot(
            torch.tensor(k, device=p.device), p.numel()).to(p.dtype) - p)
        return {self.logits: contribution[:, None] * jacobian_row[None, :]}


def pal_policy(prototypes: Sequence[str]) -> SplitPolicy:
    """Prototype adapters are SHARED; the mixture logits are PRIVATE."""
    names = tuple(prototypes)

    def policy(tensor_name: str) -> Role:
        if tensor_name.startswith(MIXTURE_MODULE + ".") or f".{MIXTURE_MODULE}." in tensor_name:
            return Role.PRIVATE
        for name in names:
            if f".{name}." in tensor_name:
                return Role.SHARED
        raise KeyError(f"tensor {tensor_name} belongs to no PAL prototype in {list(names)}")

    return policy


def pal_layout(k: int, rank: int) -> AdapterLayout:
    names = prototype_names(k)
    return AdapterLayout({name: rank for name in names}, pal_policy(names),
                         extra={"pal_prototypes": k, "extra_tensors": (MIXTURE_TENSOR,)})


def install_mixture(model: torch.nn.Module, layout: AdapterLayout) -> PalMixture:
    """Add the mixture logits to a PEFT model built from ``pal_layout`` and hook every prototype's lora_B.

    Idempotent: a model that already carries the mixture is returned unchanged.
    """
    existing = getattr(model, MIXTURE_MODULE, None)
    if isinstance(existing, PalMixture):
        return existing
    names = list(layout.ranks)
    device = next(model.parameters()).device
    mixture = PalMixture(len(names)).to(device)
    model.add_module(MIXTURE_MODULE, mixture)
    index = {name: i for i, name in enumerate(names)}
    hooked = 0
    for module in model.modules():
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_b, torch.nn.ModuleDict):
            continue
        for name, linear in lora_b.items():
            if name in index:
                linear.register_forward_pre_hook(_scale_input(mixture, index[name], device))
                hooked += 1
    if hooked == 0:
        raise RuntimeError("PAL found no LoRA prototype layers to mix; was the model built from pal_layout?")
    return mixture


def _scale_input(mixture: PalMixture, k: int, device: torch.device):
    index = torch.tensor(k, device=device)  # a tensor, so Opacus can record it with the activations

    def pre_hook(_module: torch.nn.Module, args: tuple) -> tuple:
        return (mixture(index, args[0]), *args[1:])

    return pre_hook


@torch.no_grad()
def init_mixture(state: AdapterState, seed: int, settings: object = None) -> None:
    """A training user's first mixture logits: random, its own (see the module docstring), with std
    ``settings.pal_init_std`` (``INIT_STD`` if not given)."""
    std = float(getattr(settings, "pal_init_std", INIT_STD))
    generator = torch.Generator().manual_seed(int(seed) % (2**63))
    for name in state.names(Role.PRIVATE):
        param = state.params[name]
        param.copy_((torch.randn(param.shape, generator=generator) * std).to(param.dtype))


_PROTOTYPE = re.compile(r"\.proto(\d+)\.")


@torch.no_grad()
def weight_update(state: AdapterState, received: Mapping[str, torch.Tensor],
                  trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shared tensors to send: each prototype's local change scaled by the user's gain for it."""
    (mixture_name,) = [n for n in state.names(Role.PRIVATE) if n.endswith(MIXTURE_TENSOR)]
    k = state.params[mixture_name].numel()
    gains = (k * torch.softmax(LOGIT_SCALE * state.params[mixture_name].detach().float().cpu(), dim=0))
    out = {}
    for name, value in trained.items():
        match = _PROTOTYPE.search(name)
        if match is None:
            raise KeyError(f"shared tensor {name} belongs to no PAL prototype")
        start = torch.as_tensor(received[name]).to(value.dtype).reshape(value.shape)
        out[name] = start + gains[int(match.group(1))].to(value.dtype) * (value - start)
    return out


def mixture_weights(private: Mapping[str, torch.Tensor], scale: float = LOGIT_SCALE) -> list[float]:
    """A user's mixture (summing to 1) from their private tensors: for reports and tests."""
    logits = next(v for n, v in private.items() if n.endswith(MIXTURE_TENSOR))
    return torch.softmax(scale * torch.as_tensor(logits, dtype=torch.float32), dim=0).tolist()
