"""Personalization schemes: which LoRA tensors are shared, private or frozen, plus any extra behaviour.

A scheme is an adapter layout (which adapters sit on the base, their ranks) with a split policy (the role
of every tensor: SHARED goes to the server, PRIVATE stays on the device, FROZEN is not trained), and at
most a little extra behaviour on the device. It composes with every aggregation strategy, because
strategies only ever see the shared tensors. See ``../shared/notes/methods.md``.

=========  ==========================  ==========================  =============================================
scheme     shared (aggregated)         private (device)            source
=========  ==========================  ==========================  =============================================
split      LoRA adapter, rank r_s      LoRA adapter, rank r_p      FedPDPO 2603.19741, HYDRA 2406.02888,
                                                                   dual-adapter FDLoRA 2406.07925
global     LoRA adapter, rank r_s      nothing                     FedAvg-LoRA; OpenFedLLM FedDPO 2402.06954
local      nothing                     LoRA adapter, rank r_p      OPPU 2402.04401 (one PEFT per user)
fedsa      LoRA A (rank r_s)           LoRA B                      FedSA-LoRA 2410.01463
ffa        LoRA B (A frozen, seeded)   nothing                     FFA-LoRA 2403.12313
finetune   LoRA adapter, rank r_s      a fine-tuned private copy   FedAvg + local fine-tuning baseline
                                       of that adapter             (e.g. Cheng et al., arXiv 2102.04925)
pal        K prototype adapters        K mixture logits            PAL 2406.08469
=========  ==========================  ==========================  =============================================

Behaviour beyond the layout (carried out by ``fedpersona.client.local``):

* what a user fits for itself (``personal_fit``): its PRIVATE tensors (split, local, fedsa, pal), a private
  copy of the shared adapter (finetune), or nothing (global, ffa: personalized == global);
* finetune trains the shared adapter only during rounds; its personalized model exists from the final
  evaluation on (the user's copy, fine-tuned on the user's training pairs): earlier evaluations report
  personalized == global;
* ``local`` shares nothing: every reply carries an empty ArrayRecord (0 bytes) and aggregation is the
  identity on it (``fedpersona.strategies.registry``);
* "global" for fedsa is A with B at its initial zero, i.e. the base model: FedSA has no global B.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from fedpersona.errors import UsageError
from fedpersona.model.adapters import SINGLE_ADAPTER, AdapterLayout, AdapterState, Role, SplitPolicy, by_adapter_name
from fedpersona.strategies import pal


class LayoutSettings(Protocol):
    """The run settings a layout reads (``RunConfig`` has them all)."""

    shared_rank: int
    private_rank: int
    pal_prototypes: int
    pal_init_std: float


PERSONAL_FITS = ("private", "copy", "none")


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    build: Callable[[LayoutSettings], AdapterLayout]
    personal_fit: str = "private"  # what a user fits for itself: PRIVATE tensors, a "copy" of SHARED, "none"
    finetune_at_eval: bool = False  # the final evaluation fine-tunes the personal copy first (finetune)
    supports_dp: bool = True
    setup: Callable[[torch.nn.Module, AdapterLayout], object] | None = None  # extra modules (pal's mixture)
    # a training user's first private values: (state, seed, settings)
    init_private: Callable[[AdapterState, int, LayoutSettings], None] | None = None
    # (state, shared tensors received, shared tensors after training) -> what to send (pal's weighting)
    shape_update: Callable[[AdapterState, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
                           dict[str, torch.Tensor]] | None = None

    def layout(self, settings: LayoutSettings) -> AdapterLayout:
        return self.build(settings)

    @property
    def roles(self) -> set[Role]:
        layout = self.build(_PROBE)
        probes = [f"x.lora_{m}.{name}.weight" for name in layout.ranks for m in ("A", "B")]
        probes += list(layout.extra.get("extra_tensors", ()))
        return {layout.policy(p) for p in probes}

    @property
    def has_shared(self) -> bool:
        return Role.SHARED in self.roles

    @property
    def has_private(self) -> bool:
        return Role.PRIVATE in self.roles


@dataclass(frozen=True)
class _Probe:
    shared_rank: int = 1
    private_rank: int = 1
    pal_prototypes: int = 2
    pal_init_std: float = 0.25


_PROBE = _Probe()


def _by_matrix(a: Role, b: Role) -> SplitPolicy:
    def policy(tensor_name: str) -> Role:
        return a if ".lora_A." in tensor_name else b

    return policy


def _split(s: LayoutSettings) -> AdapterLayout:
    return AdapterLayout({"shared": s.shared_rank, "private": s.private_rank},
                         by_adapter_name({"shared": Role.SHARED, "private": Role.PRIVATE}))


def _global(s: LayoutSettings) -> AdapterLayout:
    return AdapterLayout({"shared": s.shared_rank}, by_adapter_name({"shared": Role.SHARED}))


def _local(s: LayoutSettings) -> AdapterLayout:
    return AdapterLayout({"private": s.private_rank}, by_adapter_name({"private": Role.PRIVATE}))


def _fedsa(s: LayoutSettings) -> AdapterLayout:
    return AdapterLayout({SINGLE_ADAPTER: s.shared_rank}, _by_matrix(Role.SHARED, Role.PRIVATE))


def _ffa(s: LayoutSettings) -> AdapterLayout:
    return AdapterLayout({SINGLE_ADAPTER: s.shared_rank}, _by_matrix(Role.FROZEN, Role.SHARED))


def _pal(s: LayoutSettings) -> AdapterLayout:
    return pal.pal_layout(s.pal_prototypes, s.shared_rank)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("split", "shared LoRA adapter + private per-user LoRA adapter, both active "
                        "(FedPDPO 2603.19741, HYDRA 2406.02888, FDLoRA 2406.07925)", _split),
        Scheme("global", "one LoRA adapter, all of it shared; no private part "
                         "(FedAvg-LoRA; OpenFedLLM FedDPO 2402.06954)", _global, personal_fit="none"),
        Scheme("local", "one LoRA adapter per user, nothing shared (OPPU 2402.04401)", _local),
        Scheme("fedsa", "one LoRA adapter: A shared, B private (FedSA-LoRA 2410.01463)", _fedsa),
        Scheme("ffa", "one LoRA adapter: A frozen from a shared seed, B shared (FFA-LoRA 2403.12313)", _ffa,
               personal_fit="none"),
        Scheme("finetune", "one shared LoRA adapter trained federatedly; at the final evaluation each user "
                           "fine-tunes a private copy on its own pairs (FedAvg + local fine-tuning, "
                           "Cheng et al. 2102.04925)", _global,
               personal_fit="copy", finetune_at_eval=True, supports_dp=False),
        Scheme("pal", "K shared prototype LoRA adapters mixed by private per-user weights "
                      "(PAL 2406.08469)", _pal, setup=pal.install_mixture,
               init_private=pal.init_mixture, shape_update=pal.weight_update),
    )
}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise UsageError(f"--scheme {name}: unknown scheme; choose one of {', '.join(SCHEMES)}") from None
