"""Which modules of a base model carry LoRA: a default per architecture family, overridable by a setting.

Defaults follow the common practice of the LoRA / QLoRA literature (Hu et al., 2021, arXiv 2106.09685;
Dettmers et al., 2023, arXiv 2305.14314: adapters on every linear projection of attention and MLP
blocks, never on the embeddings or the LM head), spelled with each family's own module names:

* Llama, Mistral, Mixtral, Qwen2/3, Gemma 1-3, OLMo, Granite, SmolLM3, Cohere, StableLM, Starcoder2-like
  decoders with ``q/k/v/o_proj`` attention;
* Phi-3 (fused ``qkv_proj``, ``gate_up_proj``), Phi-1/2 (``dense``, ``fc1``/``fc2``);
* GPT-2 and GPT-BigCode (``Conv1D``/fused ``c_attn``, ``c_proj``, ``c_fc``), GPT-NeoX / Pythia
  (``query_key_value``, ``dense``, ``dense_h_to_4h``, ``dense_4h_to_h``), Falcon, OPT, BLOOM, GPT-J.

An architecture with no entry needs ``lora-target-modules`` (names or ``all-linear``, PEFT's
every-linear-layer-but-the-head); without it :func:`resolve_targets` raises a UsageError.
"""

from __future__ import annotations

from fedpersona.errors import UsageError

CONV1D_FAMILIES = ("gpt2", "gpt_bigcode")  # transformers' Conv1D (weight stored [in, out]) in place of Linear
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{family: _LLAMA_LIKE for family in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere", "stablelm", "exaone4")},
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_bigcode": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
}


def resolve_targets(model_config, override: str | tuple[str, ...] = "") -> str | list[str]:
    """PEFT ``target_modules`` for a model: ``override`` ("all-linear", "a,b,c" or a tuple) if given, else
    the default of ``model_config.model_type``. Raises UsageError for an architecture with no default."""
    if isinstance(override, tuple):
        return list(override)
    if override.strip() == "all-linear":
        return "all-linear"
    if override.strip():
        return [name.strip() for name in override.split(",") if name.strip()]
    family = getattr(model_config, "model_type", None)
    if family not in DEFAULT_TARGETS:
        raise UsageError(f"model architecture {family!r} has no default LoRA targets; set lora-target-modules "
                         "(e.g. --set lora-target-modules=all-linear, or the names of its linear layers)")
    return list(DEFAULT_TARGETS[family])
