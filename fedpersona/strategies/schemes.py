"""Personalization schemes: which LoRA tensors are shared, private or frozen.

A scheme is an adapter layout (which adapters sit on the base, their ranks) plus a split policy (the role
of every tensor). It composes with every aggregation strategy, because strategies only ever see the
shared tensors. Sources are in each scheme's description; see also ``../shared/notes/methods.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedpersona.errors import UsageError
from fedpersona.model.adapters import AdapterLayout, Role, SplitPolicy, by_adapter_name


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    layout: Callable[[int, int], AdapterLayout]  # (shared_rank, private_rank) -> layout

    @property
    def has_shared(self) -> bool:
        return any(role is Role.SHARED for role in _roles_of(self))

    @property
    def has_private(self) -> bool:
        return any(role is Role.PRIVATE for role in _roles_of(self))


def _roles_of(scheme: Scheme) -> set[Role]:
    layout = scheme.layout(1, 1)
    probes = [f"x.lora_{m}.{name}.weight" for name in layout.ranks for m in ("A", "B")]
    return {layout.policy(p) for p in probes}


def _by_matrix(a: Role, b: Role) -> SplitPolicy:
    def policy(tensor_name: str) -> Role:
        return a if ".lora_A." in tensor_name else b

    return policy


def _split(shared_rank: int, private_rank: int) -> AdapterLayout:
    return AdapterLayout({"shared": shared_rank, "private": private_rank},
                         by_adapter_name({"shared": Role.SHARED, "private": Role.PRIVATE}))


def _global(shared_rank: int, _private_rank: int) -> AdapterLayout:
    return AdapterLayout({"shared": shared_rank}, by_adapter_name({"shared": Role.SHARED}))


def _local(_shared_rank: int, private_rank: int) -> AdapterLayout:
    return AdapterLayout({"private": private_rank}, by_adapter_name({"private": Role.PRIVATE}))


def _fedsa(shared_rank: int, _private_rank: int) -> AdapterLayout:
    return AdapterLayout({"lora": shared_rank}, _by_matrix(Role.SHARED, Role.PRIVATE))


def _ffa(shared_rank: int, _private_rank: int) -> AdapterLayout:
    return AdapterLayout({"lora": shared_rank}, _by_matrix(Role.FROZEN, Role.SHARED))


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("split", "shared LoRA adapter + private per-user LoRA adapter, both active "
                        "(FedPDPO 2603.19741, HYDRA 2406.02888, FDLoRA 2406.07925)", _split),
        Scheme("global", "one LoRA adapter, all of it shared; no private part "
                         "(FedAvg-LoRA; OpenFedLLM FedDPO 2402.06954)", _global),
        Scheme("local", "one LoRA adapter per user, nothing shared (OPPU 2402.04401)", _local),
        Scheme("fedsa", "one LoRA adapter: A shared, B private (FedSA-LoRA 2410.01463)", _fedsa),
        Scheme("ffa", "one LoRA adapter: A frozen from a shared seed, B shared (FFA-LoRA 2403.12313)", _ffa),
    )
}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise UsageError(f"--scheme {name}: unknown scheme; choose one of {', '.join(SCHEMES)}") from None
