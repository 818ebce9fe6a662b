"""Materialize adapters whose forward fedpersona changes with hooks (PAL's mixture) as ONE plain LoRA
adapter that PEFT computes exactly, for :mod:`fedpersona.model.export`.

For adapters k with ``delta_k(x) = s_k * B_k (g_k * A_k x)`` (``s_k`` PEFT's LoRA scaling, ``g_k`` the
gain a hook applies),

    sum_k delta_k(x) = [g_1 s_1 B_1 | ... | g_K s_K B_K] @ [A_1; ...; A_K] x,

a LoRA adapter of rank ``sum_k r_k`` with scaling 1. The weighted sum of rank-r deltas is in general
not rank r, so nothing smaller is exact. ``g_k B_k`` is read off the hooked layer itself (``lora_B_k``
applied to the identity runs its hooks), so the result follows the forward as it is, not a copy of its
formula. Anything that cannot be merged exactly (DoRA, LoRA bias, rank patterns, hooks on ``lora_A``)
is a UsageError, never an export that pretends.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fedpersona.errors import UsageError
from fedpersona.model.resident import ResidentModel


def _lora_layers(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Module]:
    """PEFT LoRA layers carrying ``adapter`` (module path -> layer)."""
    return {path: module for path, module in model.named_modules()
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and adapter in module.lora_A}


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


def mixed_adapters(resident: ResidentModel) -> list[str]:
    """Adapters whose ``lora_B`` layers carry hooks (a mixture scaling them): saved as they are, plain PEFT
    would load them without those hooks, i.e. a different model. A hook anywhere else in a LoRA layer
    cannot be materialized: UsageError saying so (no export that pretends to reproduce the model)."""
    mixed = []
    for adapter in resident.layout.ranks:
        for path, layer in _lora_layers(resident.model, adapter).items():
            if _hooked(layer.lora_A[adapter]) or _hooked(layer.lora_dropout[adapter]):
                raise UsageError(f"export: adapter {adapter!r} at {path} has a hook on its lora_A or dropout, "
                                 "which plain PEFT cannot reproduce; no exact PEFT export exists for this layout")
            if _hooked(layer.lora_B[adapter]) and adapter not in mixed:
                mixed.append(adapter)
    return mixed


@torch.no_grad()
def effective_b(linear: torch.nn.Module) -> torch.Tensor:
    """The weight a plain ``nn.Linear`` would need to compute what ``linear`` computes with its hooks:
    ``linear`` applied to the identity (its hooks run; they must act linearly on the input)."""
    eye = torch.eye(linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
    return linear(eye).T.detach().to("cpu").contiguous().clone()


def _mergeable(config: Any, adapter: str) -> None:
    problems = [what for what, bad in (
        ("DoRA", getattr(config, "use_dora", False)), ("lora_bias", getattr(config, "lora_bias", False)),
        ("rank_pattern", getattr(config, "rank_pattern", None)),
        ("alpha_pattern", getattr(config, "alpha_pattern", None))) if bad]
    if problems:
        raise UsageError(f"export: adapter {adapter!r} uses {', '.join(problems)}; merging it into one PEFT "
                         "adapter is not supported, so no exact export exists for this layout")


@torch.no_grad()
def merged_adapter(resident: ResidentModel, adapters: list[str]) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """ONE LoRA adapter computing what ``adapters`` compute together, hooks included (see the module
    docstring): ``(LoraConfig, tensors under PEFT's saved names, details for the manifest)``."""
    from peft import get_peft_model_state_dict

    configs = [resident.model.peft_config[a] for a in adapters]
    for adapter, config in zip(adapters, configs):
        _mergeable(config, adapter)
        for key in ("target_modules", "fan_in_fan_out", "bias", "modules_to_save", "task_type"):
            if getattr(config, key, None) != getattr(configs[0], key, None):
                raise UsageError(f"export: adapters {adapters[0]!r} and {adapter!r} differ in {key}; they "
                                 "cannot be merged into one PEFT adapter")
    layers = {a: _lora_layers(resident.model, a) for a in adapters}
    paths = list(layers[adapters[0]])
    tensors: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        if list(layers[adapter]) != paths:
            raise UsageError(f"export: adapters {adapters[0]!r} and {adapter!r} sit on different layers; "
                             "they cannot be merged into one PEFT adapter")
        saved = set(get_peft_model_state_dict(resident.model, adapter_name=adapter))
        expected = {f"{p}.lora_{m}.weight" for p in paths for m in "AB"}
        if saved != expected:
            extra = sorted(saved - expected)[:2] or sorted(expected - saved)[:2]
            raise UsageError(f"export: adapter {adapter!r} holds tensors beyond lora_A/lora_B ({extra}); "
                             "merging it into one PEFT adapter is not supported")
    gains: dict[str, float | None] = {}
    ranks = set()
    for path in paths:
        a_parts, b_parts = [], []
        for adapter in adapters:
            layer = layers[adapter][path]
            a = layer.lora_A[adapter].weight.detach().to("cpu")
            b = layer.lora_B[adapter].weight.detach().to("cpu")
            b_eff = effective_b(layer.lora_B[adapter])
            a_parts.append(a)
            b_parts.append(b_eff * float(layer.scaling[adapter]))
            if adapter not in gains:  # the gain the hooks apply, as measured on the first layer
                norm = float((b.double() ** 2).sum())
                gains[adapter] = round(float((b_eff.double() * b.double()).sum()) / norm, 6) if norm > 0 else None
        merged_a = torch.cat(a_parts, dim=0).contiguous()
        tensors[f"{path}.lora_A.weight"] = merged_a
        tensors[f"{path}.lora_B.weight"] = torch.cat(b_parts, dim=1).contiguous()
        ranks.add(merged_a.shape[0])
    (rank,) = ranks
    config = copy.deepcopy(configs[0])
    config.r, config.lora_alpha, config.use_rslora = rank, rank, False  # scaling 1: folded into B
    config.rank_pattern, config.alpha_pattern = {}, {}
    return config, tensors, {"from": adapters, "rank": rank, "gains": gains}


