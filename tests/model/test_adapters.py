"""Shared and private adapters on one base, and the split policy that labels every tensor."""

import numpy as np
import pytest
import torch

from fedpersona.model.adapters import Role


def test_split_policy_labels_every_adapter_tensor(split_resident):
    state = split_resident.adapters
    shared, private = state.names(Role.SHARED), state.names(Role.PRIVATE)
    assert shared and private
    assert all(".shared." in n for n in shared) and all(".private." in n for n in private)
    assert set(shared) | set(private) == set(state.params)
    assert all(p.requires_grad for p in state.params.values())
    base = [p for n, p in split_resident.model.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)


def test_load_rejects_partial_or_foreign_tensors(split_resident):
    state = split_resident.adapters
    shared = state.tensors(Role.SHARED)
    partial = dict(list(shared.items())[1:])
    with pytest.raises(ValueError, match="do not match"):
        state.load(partial, Role.SHARED)
    with pytest.raises(ValueError, match="do not match"):
        state.load(state.tensors(Role.PRIVATE), Role.SHARED)


def test_private_strength_interpolates_and_restores(split_resident):
    state = split_resident.adapters
    trained = {n: torch.randn_like(t) for n, t in state.tensors(Role.PRIVATE).items()}
    state.load(trained, Role.PRIVATE)
    with state.private_strength(0.0):
        assert all(torch.equal(state.params[n], state.initial[n]) for n in trained)
    with state.private_strength(0.5):
        n = next(iter(trained))
        assert torch.allclose(state.params[n], state.initial[n] + 0.5 * (trained[n] - state.initial[n]))
    assert all(torch.equal(state.params[n], trained[n]) for n in trained)
    state.load({n: np.asarray(t) for n, t in trained.items()}, Role.PRIVATE)  # numpy in works too


def test_no_adapter_name_is_contained_in_peft_prefix():
    """PEFT warns ("should not be contained in the prefix 'lora_' ... reinitialization") for such names."""
    from fedpersona.model.adapters import PEFT_LORA_PREFIX, check_adapter_name
    from fedpersona.strategies.schemes import _PROBE, SCHEMES, get_scheme

    for scheme in (get_scheme(n) for n in SCHEMES):
        for name in scheme.layout(_PROBE).ranks:
            assert name not in PEFT_LORA_PREFIX, (scheme.name, name)
    for bad in ("lora", "lora_", "ra", ""):
        with pytest.raises(ValueError, match="contained in PEFT's prefix"):
            check_adapter_name(bad)


def test_tensors_stored_under_the_old_adapter_name_still_load():
    """fedsa/ffa states written when their one adapter was named 'lora' load into today's 'single'."""
    from fedpersona.round.resident import resident_for
    from fedpersona.config import RunConfig
    from fedpersona.model.adapters import current_tensor_name

    assert current_tensor_name("m.q_proj.lora_B.lora.weight") == "m.q_proj.lora_B.single.weight"
    assert current_tensor_name("m.q_proj.lora_B.shared.weight") == "m.q_proj.lora_B.shared.weight"
    resident = resident_for(RunConfig(scheme="fedsa", shared_rank=2), keep=False)
    state = resident.adapters
    private = state.tensors(Role.PRIVATE)
    assert private and all(".lora_B.single." in n for n in private)
    values = {n: torch.randn_like(t) for n, t in private.items()}
    state.load({n.replace(".single.", ".lora."): v for n, v in values.items()}, Role.PRIVATE)
    assert all(torch.equal(state.params[n], v) for n, v in values.items())
    with pytest.raises(ValueError, match="do not match"):  # a partial old-name set is still refused
        state.load({n.replace(".single.", ".lora."): v for n, v in list(values.items())[1:]}, Role.PRIVATE)
