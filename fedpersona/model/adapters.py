"""Shared and private LoRA adapters on one frozen base, and the split policy that labels every tensor.

A *layout* names the LoRA adapters to attach (``{"shared": 8, "private": 4}``: name -> rank); all of them
are active together. A *split policy* maps each adapter tensor's name to a Role: SHARED tensors go to the
server, PRIVATE tensors never leave the device, FROZEN tensors are not trained. The policy is the single
place that decides what is sent; the client packs its reply from ``tensors(Role.SHARED)`` alone.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch


class Role(str, enum.Enum):
    """The role of one adapter tensor: SHARED tensors are sent to the server and aggregated, PRIVATE ones stay
    on the device, FROZEN ones keep their seeded initial values and are not trained."""

    SHARED = "shared"
    PRIVATE = "private"
    FROZEN = "frozen"


SplitPolicy = Callable[[str], Role]

# PEFT's LoRA modules are named ``lora_A``/``lora_B``, and PEFT warns ("should not be contained in the
# prefix 'lora_' ... reinitialization") for an adapter name that is a substring of that prefix: such a
# name could be confused with the prefix when PEFT matches saved keys. Layouts never use one.
PEFT_LORA_PREFIX = "lora_"
SINGLE_ADAPTER = "single"  # the adapter of one-adapter layouts (fedsa, ffa)
# adapter names of earlier releases -> today's: stored tensors (device state) under an old name still load
LEGACY_ADAPTER_NAMES = {"lora": SINGLE_ADAPTER}
_LEGACY_TENSOR = re.compile(r"\.(lora_[A-Za-z_]+?)\.(" + "|".join(map(re.escape, LEGACY_ADAPTER_NAMES)) + r")\.")


def current_tensor_name(name: str) -> str:
    """``name`` with an earlier release's adapter name replaced: ``...lora_B.lora.weight`` -> ``...lora_B.single.weight``."""
    return _LEGACY_TENSOR.sub(lambda m: f".{m.group(1)}.{LEGACY_ADAPTER_NAMES[m.group(2)]}.", name)


def check_adapter_name(name: str) -> None:
    """Refuse an adapter name PEFT would warn about (one contained in its prefix ``lora_``)."""
    if not name or name in PEFT_LORA_PREFIX:
        raise ValueError(f"adapter name {name!r} is contained in PEFT's prefix {PEFT_LORA_PREFIX!r}: PEFT warns "
                         "that its weights may be reinitialised on loading; choose another name")


def by_adapter_name(roles: Mapping[str, Role]) -> SplitPolicy:
    """Policy for layouts with one adapter per role: the role is the adapter's (``...lora_A.<name>.weight``).

    Args:
        roles: adapter name -> its tensors' role, e.g. ``{"shared": Role.SHARED, "private": Role.PRIVATE}``.

    Returns:
        The split policy; it raises ``KeyError`` for a tensor of no listed adapter.
    """

    def policy(tensor_name: str) -> Role:
        for adapter, role in roles.items():
            if f".{adapter}." in tensor_name:
                return role
        raise KeyError(f"tensor {tensor_name} belongs to no adapter in {sorted(roles)}")

    return policy


@dataclass(frozen=True)
class AdapterLayout:
    """Which LoRA adapters sit on the base and which role each tensor plays.

    Attributes:
        ranks: adapter name -> LoRA rank (e.g. ``{"shared": 8, "private": 4}``); names must not contain ``lora_``.
        policy: the split policy, tensor name (``...lora_A.<adapter>.weight``) -> ``Role``.
        target_modules: the modules LoRA goes on (``"a,b"`` or ``"all-linear"``); ``""``: the architecture's
            default.
        alpha_per_rank: LoRA alpha divided by rank (the scaling is ``alpha / r``).
        extra: anything a scheme's hooks need (PAL: its prototype count and its extra tensors' names).
    """

    ranks: Mapping[str, int]
    policy: SplitPolicy
    target_modules: str | tuple[str, ...] = ""  # "": the architecture's default (fedpersona.model.targets)
    alpha_per_rank: float = 2.0
    extra: Mapping[str, object] = field(default_factory=dict)


def attach_adapters(base: torch.nn.Module, layout: AdapterLayout, seed: int, target_modules: str = ""):
    """Wrap ``base`` with every adapter of ``layout`` (PEFT), all active; trainability set by the policy.

    LoRA goes on ``target_modules`` ("a,b,c" or "all-linear") if given, else on the layout's, else on the
    architecture's default (``fedpersona.model.targets.resolve_targets``; UsageError if it has none)."""
    from peft import LoraConfig, get_peft_model

    from fedpersona.model.targets import CONV1D_FAMILIES, resolve_targets

    targets = resolve_targets(base.config, target_modules or layout.target_modules)

    def config(rank: int) -> LoraConfig:
        # GPT-2-style Conv1D layers store their weight transposed: PEFT needs to be told (else it warns)
        return LoraConfig(r=rank, lora_alpha=layout.alpha_per_rank * rank, lora_dropout=0.0, bias="none",
                          target_modules=targets, task_type="CAUSAL_LM",
                          fan_in_fan_out=getattr(base.config, "model_type", "") in CONV1D_FAMILIES)

    names = list(layout.ranks)
    for name in names:
        check_adapter_name(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # LoRA A initialisation is the same on every process: a shared seed
        try:
            model = get_peft_model(base, config(layout.ranks[names[0]]), adapter_name=names[0])
        except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
            from fedpersona.errors import UsageError

            raise UsageError(f"lora-target-modules {targets}: {str(err).splitlines()[0]}; set lora-target-modules "
                             "to names of the model's linear layers, or all-linear") from None
        for name in names[1:]:
            model.add_adapter(name, config(layout.ranks[name]))
    model.base_model.set_adapter(names)  # all active at once; also marks them trainable
    for name, param in adapter_parameters(model):
        param.requires_grad_(layout.policy(name) is not Role.FROZEN)
    return model


def adapter_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for name, param in model.named_parameters():
        if "lora_" in name:
            yield name, param


class AdapterState:
    """Reads, writes and resets adapter tensors by role on a resident PEFT model (no model rebuild)."""

    def __init__(self, model: torch.nn.Module, policy: SplitPolicy) -> None:
        self.params = dict(adapter_parameters(model))
        self.roles = {name: policy(name) for name in self.params}
        self.initial = {name: p.detach().clone() for name, p in self.params.items()}

    def names(self, role: Role) -> list[str]:
        return [n for n, r in self.roles.items() if r is role]

    def count(self, role: Role) -> int:
        return sum(self.params[n].numel() for n in self.names(role))

    def tensors(self, role: Role) -> dict[str, torch.Tensor]:
        """Detached CPU copies of this role's tensors, in a stable order."""
        return {n: self.params[n].detach().cpu().clone() for n in self.names(role)}

    def numpy(self, role: Role) -> dict[str, np.ndarray]:
        return {n: t.numpy() for n, t in self.tensors(role).items()}

    @torch.no_grad()
    def load(self, tensors: Mapping[str, torch.Tensor | np.ndarray], role: Role) -> None:
        """Copy values into this role's tensors; every name must match exactly (no silent partial load).

        Names stored under an earlier release's adapter name (``LEGACY_ADAPTER_NAMES``) are read as
        today's, so device states written before a rename still load."""
        expected = set(self.names(role))
        if set(tensors) != expected:
            renamed = {current_tensor_name(n): v for n, v in tensors.items()}
            if len(renamed) == len(tensors) and set(renamed) == expected:
                tensors = renamed
        if set(tensors) != expected:
            missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"{role.value} tensors do not match the layout: missing {missing[:3]}, unknown {unknown[:3]}")
        for name, value in tensors.items():
            param = self.params[name]
            param.copy_(torch.as_tensor(np.asarray(value)).to(param.dtype).reshape(param.shape))

    @torch.no_grad()
    def reset(self, role: Role) -> None:
        for name in self.names(role):
            self.params[name].copy_(self.initial[name])

    @contextmanager
    def private_strength(self, strength: float) -> Iterator[None]:
        """Temporarily set private tensors to ``initial + strength * (current - initial)``.

        0 gives the global model (base + shared), 1 the fully personal one, both exactly; in between, A
        and B of a private LoRA adapter both move, so its output changes smoothly but not linearly.
        """
        if strength == 1.0:  # exactly the trained tensors (initial + 1 * (x - initial) can differ by rounding)
            yield
            return
        names = self.names(Role.PRIVATE)
        saved = {n: self.params[n].detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                self.params[n].copy_(self.initial[n] + strength * (saved[n] - self.initial[n]))
        try:
            yield
        finally:
            with torch.no_grad():
                for n in names:
                    self.params[n].copy_(saved[n])
