"""Export a resident model's adapters in PEFT's own format, loadable with no fedpersona code.

One folder per adapter of the layout (``OUT/shared``, ``OUT/private``; ``OUT/lora`` for one-adapter
schemes such as fedsa), each holding what ``PeftModel.save_pretrained`` writes: ``adapter_config.json``
(the adapter's LoraConfig, with ``base_model_name_or_path`` set to the base model's id or absolute
folder) and ``adapter_model.safetensors`` (tensor names from ``peft.get_peft_model_state_dict``, i.e.
without the adapter name). ``OUT/README.txt`` says how to load them; ``OUT/fedpersona_export.json``
records what was exported for tools.

Each adapter folder is written to a temp folder and renamed into place, so an interrupted export never
leaves a half-written adapter under its final name. Adapter folders and README are owner-only (0700 /
0600), like the state directory: the private adapter is derived from the user's feedback; ``chmod``
them to share.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from fedpersona.errors import UsageError
from fedpersona.model.prompting import format_prompt
from fedpersona.model.resident import ResidentModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.txt"
MANIFEST_NAME = "fedpersona_export.json"


def adapter_state_dict(resident: ResidentModel, adapter: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors under the names PEFT saves them with (detached, CPU, contiguous copies)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(resident.model, adapter_name=adapter)
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}


def base_model_reference(resolved: str) -> str:
    """What ``base_model_name_or_path`` should hold: an absolute folder for local models, else the hub id."""
    local = Path(resolved).expanduser()
    return str(local.resolve()) if local.is_dir() else resolved


def _roles(resident: ResidentModel, adapter: str) -> list[str]:
    """The roles of an adapter's tensors (``["shared"]``, ``["private"]`` or e.g. ``["frozen", "shared"]``)."""
    roles = {role.value for name, role in resident.adapters.roles.items() if f".{adapter}." in name}
    return sorted(roles)


def _check_out_dir(out_dir: Path, adapters: list[str], force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: exists and is not a folder; pass a new or empty folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"--out {out_dir}: folder is not empty; pass --force to overwrite the export there, "
                         "or choose a new folder")
    for adapter in adapters:
        target = out_dir / adapter
        if target.exists() and not (target.is_dir() and (not any(target.iterdir())
                                                         or (target / CONFIG_NAME).exists())):
            raise UsageError(f"--out {out_dir}: {target} exists and is not an adapter folder; move it away "
                             "or choose another --out")


def _write_adapter(resident: ResidentModel, adapter: str, out_dir: Path, base_ref: str) -> Path:
    """Write one adapter folder (config + safetensors) atomically; returns its final path."""
    from safetensors.torch import save_file

    tensors = adapter_state_dict(resident, adapter)
    config = copy.deepcopy(resident.model.peft_config[adapter])
    config.base_model_name_or_path = base_ref
    config.inference_mode = True
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter}.", suffix=".tmp", dir=out_dir))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        target = out_dir / adapter
        if target.exists():
            shutil.rmtree(target)  # checked by _check_out_dir: an earlier export's adapter folder
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def readme_text(adapters: list[str], base_ref: str, info: Mapping[str, Any]) -> str:
    """How to load this export with plain transformers + PEFT (the exact adapter names and order)."""
    first, rest = adapters[0], adapters[1:]
    loads = "".join(f'    model.load_adapter(os.path.join(OUT, "{a}"), adapter_name="{a}")\n' for a in rest)
    names = ", ".join(f'"{a}"' for a in adapters)
    if info.get("prompt_format") == "chat":
        prompt_code = (
            '    messages = [{"role": "user", "content": "PROMPT"}]  # replace PROMPT with your prompt text\n'
            '    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n'
            '    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the tokenizer\'s chat template\n')
    else:
        prompt_code = (
            f'    ids = [tokenizer.bos_token_id] + tokenizer("{format_prompt("PROMPT")}", add_special_tokens=False)["input_ids"]\n'
            "    # (skip the BOS id if the tokenizer has none); replace PROMPT with your prompt text\n")
    roles = info.get("roles", {})
    personal = [a for a in adapters if "private" in roles.get(a, [])]
    private_note = ""
    if personal:
        others = [a for a in adapters if a not in personal]
        keep = f"Share only {', '.join('OUT/' + a for a in others)} to share nothing of yours." if others else \
            "Do not share this export if you want to share nothing of yours."
        private_note = (
            f"\nPrivacy: {', '.join(personal)} holds your private tensors, trained on your own feedback; they never\n"
            "left your device during federated training. Anyone you give them to can learn something about\n"
            f"your preferences. {keep}\n")
    return f"""fedpersona adapter export
=========================

Model:    {info.get("model_id")} (base model folder or id: {base_ref})
Scheme:   {info.get("scheme")}
Adapters: {", ".join(f"{a} ({'/'.join(roles.get(a, []))})" for a in adapters)}
Strength: {info.get("strength")} (private tensors scaled from global 0 to personal 1 at export time)

Each subfolder is a regular PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).
All adapters are meant to be active TOGETHER on the frozen base model. Load them with plain
transformers + peft (no fedpersona needed):

    import os, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel

    OUT = "{info.get("out_dir", "OUT")}"
    BASE = "{base_ref}"
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(OUT, "{first}"), adapter_name="{first}")
{loads}    model.base_model.set_adapter([{names}], inference_mode=True)  # all active at once
    model.eval()

Prompt format used in training (use the same for generation):

{prompt_code}    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())

Greedy decoding this way gives the same text as `fedpersona generate --strength {info.get("strength")}`.
{private_note}"""


def export_adapters(resident: ResidentModel, out_dir: str | Path, *, base_model: str, strength: float = 1.0,
                    force: bool = False, info: Mapping[str, Any] | None = None) -> list[Path]:
    """Write every adapter of ``resident`` (with its current tensors) to ``out_dir`` in PEFT's format.

    ``base_model`` is the base model's resolved local folder or hub id (recorded as
    ``base_model_name_or_path``). ``strength`` (0..1) scales the private tensors as
    ``fedpersona generate --strength`` does. Returns the adapter folders written.
    """
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"--strength {strength}: must be between 0 (global) and 1 (fully personal)")
    out_dir = Path(out_dir)
    adapters = list(resident.layout.ranks)
    _check_out_dir(out_dir, adapters, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_ref = base_model_reference(base_model)
    details = {**(info or {}), "base_model_name_or_path": base_ref, "strength": strength,
               "adapters": adapters, "roles": {a: _roles(resident, a) for a in adapters},
               "prompt_format": resident.prompt_format.name,
               "out_dir": str(out_dir.resolve())}
    written = []
    # strength 1: the stored tensors bit for bit (initial + 1 * (x - initial) is not always x in floats)
    scaled = nullcontext() if strength == 1.0 else resident.adapters.private_strength(strength)
    with scaled:
        for adapter in adapters:
            written.append(_write_adapter(resident, adapter, out_dir, base_ref))
    from fedpersona.io import atomic_write_text

    manifest = {k: v for k, v in details.items() if k != "out_dir"}
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    atomic_write_text(out_dir / README_NAME, readme_text(adapters, base_ref, details))
    return written

