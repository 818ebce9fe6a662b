"""Every supported architecture family trains and evaluates through the normal loading path.

For each family a tiny random model (hidden 16, one layer) is saved with a word-level tokenizer to a
temp folder, then one user's round runs as a client would run it: ``train_round`` then
``evaluate_round`` on a small pair file. Some tokenizers carry a ChatML template so the chat prompt path
runs too; GPT-2 (whose attention and MLP are ``Conv1D``, not ``nn.Linear``) and one more family run
under DP-SGD.
"""

import json
import math

import pytest
import torch

from fedpersona.round.evaluate import evaluate_round

from fedpersona.round.resident import resident_for

from fedpersona.round.stores import MemoryStore

from fedpersona.round.train import train_round

from fedpersona.round.users import population_user
from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.model.adapters import Role
from fedpersona.model.targets import DEFAULT_TARGETS

SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)

# family -> (config class name, its tiny-size arguments, ChatML template?, DP-SGD?)
FAMILIES = {
    "llama": ("LlamaConfig", dict(SMALL, num_key_value_heads=1), False, True),
    "mistral": ("MistralConfig", dict(SMALL, num_key_value_heads=1), True, False),
    "qwen2": ("Qwen2Config", dict(SMALL, num_key_value_heads=1), True, False),
    "gemma": ("GemmaConfig", dict(SMALL, num_key_value_heads=1, head_dim=8), False, False),
    "phi3": ("Phi3Config", dict(SMALL, num_key_value_heads=2), True, False),
    "gpt2": ("GPT2Config", dict(n_embd=16, n_layer=1, n_head=2, n_positions=128), False, True),
    "gpt_neox": ("GPTNeoXConfig", dict(SMALL), True, False),
}


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    """Two users who prefer opposite answer styles; 4 training and 2 test pairs each."""
    prompts = ["how do i cook rice", "how do i bake bread", "how do i learn chess", "how do i plan a trip",
               "how do i write code", "how do i fix my bike"]
    short, long = "sure . short answer : boil water", "here is a long answer with steps : first add salt , then wait"
    rows = []
    for user, (chosen, rejected) in {"alice": (short, long), "bob": (long, short)}.items():
        for i, prompt in enumerate(prompts):
            rows.append({"user_id": user, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "split": "test" if i >= 4 else "train"})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(model_dir, pair_file, **changes) -> RunConfig:
    settings = dict(model=str(model_dir), data=str(pair_file), num_users=2, rounds=1, epochs=1, min_steps=2,
                    batch_size=4, max_length=40, max_tokens_per_batch=160, shared_rank=2, private_rank=1,
                    lr=1e-2, shared_lr=1e-2, gen_prompts=0, accelerator="cpu")
    return RunConfig(**{**settings, **changes})


def lora_targets(model) -> set[str]:
    """Last name of every module PEFT put LoRA on."""
    from peft.tuners.lora import LoraLayer

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_and_evaluates(tiny_model, family, pair_file, tmp_path):
    config_class, sizes, chat, dp = FAMILIES[family]
    folder = tiny_model(tmp_path / family, config_class, sizes, chat)
    config = run_config(folder, pair_file, dp_epsilon=8.0 if dp else 0.0)
    resident = resident_for(config)
    assert resident.model.config.model_type == family
    assert lora_targets(resident.model) == set(DEFAULT_TARGETS[family])
    assert resident.prompt_format.chat == chat

    user = population_user(config, 0)
    before, store = resident.adapters.tensors(Role.SHARED), MemoryStore()
    result = train_round(config, user, 0, 1, before, store)
    assert not result.declined
    assert result.shared.keys() == before.keys()
    assert any(not torch.equal(result.shared[n], before[n]) for n in before), "training left shared tensors as they were"
    assert all(torch.isfinite(t).all() for t in result.shared.values())
    assert (result.epsilon is not None and 0 < result.epsilon <= 8.0 + 1e-6) if dp else result.epsilon is None

    evaluation = evaluate_round(config, user, result.shared, store, index=0, extras={"server-round": 1})
    assert set(evaluation.accuracies) == {"personalized", "global", "base"}
    assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in evaluation.accuracies.values())
    assert evaluation.metrics["private-params"] > 0


@pytest.fixture(scope="module")
def biogpt_dir(tiny_model, tmp_path_factory):
    """A tiny BioGPT: an architecture with no default LoRA targets in fedpersona.model.targets."""
    return tiny_model(tmp_path_factory.mktemp("biogpt"), "BioGptConfig", dict(SMALL), False)


def test_unknown_architecture_needs_targets(biogpt_dir, pair_file):
    assert "biogpt" not in DEFAULT_TARGETS
    with pytest.raises(UsageError, match="'biogpt' has no default LoRA targets.*lora-target-modules") as err:
        resident_for(run_config(biogpt_dir, pair_file))
    assert "\n" not in str(err.value)


def test_all_linear_override_covers_an_unknown_architecture(biogpt_dir, pair_file):
    config = run_config(biogpt_dir, pair_file, lora_target_modules="all-linear")
    resident = resident_for(config)
    # every linear layer of attention and MLP; never the LM head (output_projection)
    assert lora_targets(resident.model) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    user = population_user(config, 1)
    result = train_round(config, user, 1, 1, resident.adapters.tensors(Role.SHARED), MemoryStore())
    assert not result.declined and all(torch.isfinite(t).all() for t in result.shared.values())


def test_wrong_target_name_is_a_usage_error(tiny_model, pair_file, tmp_path):
    folder = tiny_model(tmp_path / "llama", *FAMILIES["llama"][:3])
    with pytest.raises(UsageError, match="lora-target-modules.*not found") as err:
        resident_for(run_config(folder, pair_file, lora_target_modules="no_such_proj"))
    assert "\n" not in str(err.value)


def test_simulate_a_tiny_gpt2_with_dp_through_the_cli(tiny_model, cli, pair_file, tmp_path):
    """A real `fedpersona simulate` (Flower on Ray) on a GPT-2 folder, DP-SGD on, 2 users, 1 round."""
    folder = tiny_model(tmp_path / "gpt2", *FAMILIES["gpt2"][:3])
    out = tmp_path / "out"
    code, stdout, stderr = cli(
        "simulate", "--model", str(folder), "--data", str(pair_file), "--users", "2", "--rounds", "1",
        "--fraction", "1.0", "--dp", "--target-epsilon", "8", "--set", "epochs=1", "--set", "min-steps=2",
        "--set", "batch-size=4", "--set", "max-length=40", "--set", "max-tokens-per-batch=160",
        "--set", "shared-rank=2", "--set", "private-rank=1", "--set", "device=cpu",
        "--out", str(out), "--quiet", "--json")
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_users"] == 2 and summary["rounds"] == 1
    assert summary["epsilon_max"] is not None and 0 < summary["epsilon_max"] <= 8.0 + 1e-6
    for key in ("personalized_accuracy_mean", "global_accuracy_mean", "base_accuracy_mean"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["shared_parameters"] > 0 and summary["private_parameters_per_user"] > 0
