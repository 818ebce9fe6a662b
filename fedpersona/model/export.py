"""Export a resident model's adapters in PEFT's own format, loadable with no fedpersona code.

One folder per adapter of the layout (``OUT/shared``, ``OUT/private``; ``OUT/single`` for one-adapter
schemes such as fedsa and ffa), each holding what ``PeftModel.save_pretrained`` writes:
``adapter_config.json`` (the adapter's LoraConfig, with ``base_model_name_or_path`` set to the base
model's id or absolute folder) and ``adapter_model.safetensors`` (tensor names from
``peft.get_peft_model_state_dict``, i.e. without the adapter name). ``OUT/README.txt`` says how to load
them and what they reproduce; ``OUT/fedpersona_export.json`` records what was exported for tools.

Adapters whose forward fedpersona changes with hooks PEFT knows nothing of (PAL: a private mixture
scales every prototype's ``lora_B`` by the user's gain) are materialized as ONE merged LoRA adapter,
``OUT/personal``, that plain PEFT computes exactly (:mod:`fedpersona.model.merge`).

Everything is written to temp files and folders first and renamed into place at the end, so an
interrupted export never leaves a half-written adapter under its final name; an export the file system
refuses (no space left, a read-only place, ``--out`` under a file) is one line (``UsageError``, exit 2)
and leaves nothing behind: no temp files, and no ``--out`` folder it created. Adapter folders and README are owner-only (0700 /
0600), like the state directory: the private adapter is derived from the user's feedback; ``chmod``
them to share.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from fedpersona.errors import UsageError
from fedpersona.model.merge import merged_adapter, mixed_adapters
from fedpersona.model.prompting import format_prompt
from fedpersona.model.resident import ResidentModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.txt"
MANIFEST_NAME = "fedpersona_export.json"
EXACT = "bit-identical tensors"
MERGED_EXACT = "equal up to float rounding (the merged adapter adds the same products in another order)"
MERGED_ADAPTER = "personal"  # the one adapter that materializes hooked (mixed) adapters, e.g. PAL's prototypes
NO_REPEAT_NGRAM = 3  # `fedpersona generate`'s decoding (fedpersona.alignment.settings.NO_REPEAT_NGRAM, a test keeps them equal)

# What the export of each scheme holds and reproduces (README.txt and the manifest's "notes").
SCHEME_NOTES: dict[str, str] = {
    "split": "The shared adapter (aggregated by the server) and your private adapter, active together: "
             "your personal model.",
    "global": "One shared adapter; this scheme has no private part, so your personal model is the global one.",
    "local": "Your private adapter alone; this scheme shares nothing.",
    "fedsa": "One adapter: its A matrices are shared (from the server), its B matrices are yours (private). "
             "At --strength 0 B is at its initial zero, i.e. the base model (FedSA has no global B).",
    "ffa": "One adapter: A frozen from the run's shared seed, B shared; this scheme has no private part, so "
           "your personal model is the global one.",
    "finetune": "The shared adapter only. NOT in this export: the fine-tuned personal copy that finetune fits "
                "in a simulation's final evaluation; it is never kept in a device state (only private tensors "
                "are), so neither `fedpersona generate` nor this export can use it. This is the global model.",
    "pal": "ONE merged adapter, 'personal': your mixture of the K shared prototype adapters, materialized "
           "(A = the prototypes' A stacked, B = each prototype's B times your mixture gain g_k, side by side; "
           "rank K*r). Loaded alone it computes base + sum_k g_k B_k A_k x as fedpersona's mixture does. The "
           "prototypes are not exported separately; `fedpersona export --strength 0` gives the global model "
           "(the uniform mixture, every g_k = 1).",
}


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


def _outside_roles(resident: ResidentModel) -> set[str]:
    """Roles of tensors that belong to no LoRA adapter of the layout (PAL's private mixture logits)."""
    adapters = list(resident.layout.ranks)
    return {role.value for name, role in resident.adapters.roles.items()
            if not any(f".{a}." in name for a in adapters)}


# ---------------------------------------------------------------------------- writing


def _check_out_dir(out_dir: Path, adapters: list[str], force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: exists and is not a folder; pass a new or empty folder")
    for parent in out_dir.absolute().parents:  # the nearest existing folder above must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {out_dir}: {parent} is a file, not a folder; choose an --out in a folder")
            break
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"--out {out_dir}: folder is not empty; pass --force to overwrite the export there, "
                         "or choose a new folder")
    for adapter in adapters:
        target = out_dir / adapter
        if target.exists() and not (target.is_dir() and (not any(target.iterdir())
                                                         or (target / CONFIG_NAME).exists())):
            raise UsageError(f"--out {out_dir}: {target} exists and is not an adapter folder; move it away "
                             "or choose another --out")


def _stage_adapter(name: str, config: Any, tensors: Mapping[str, torch.Tensor], out_dir: Path,
                   base_ref: str) -> Path:
    """Write one adapter folder (config + safetensors) into a temp folder in ``out_dir``; returns the temp
    folder (``_commit`` renames it into place). A failure removes it."""
    from safetensors.torch import save_file

    config = copy.deepcopy(config)
    config.base_model_name_or_path = base_ref
    config.inference_mode = True
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir))
    try:
        save_file(dict(tensors), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        from fedpersona.io import as_os_error

        if not isinstance(err, OSError) and (os_error := as_os_error(err, tmp / WEIGHTS_NAME)) is not None:
            raise os_error from err  # safetensors wraps ENOSPC & co in its own error
        raise
    return tmp


def _stage_text(path: Path, text: str) -> Path:
    """``text`` in a temp file beside ``path`` (renamed into place by ``_commit``)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _commit(tmp: Path, target: Path) -> Path:
    """Rename a staged file or folder into place (an earlier export's adapter folder is replaced)."""
    if target.is_dir() and tmp.is_dir():
        shutil.rmtree(target)  # checked by _check_out_dir: an earlier export's adapter folder
    os.replace(tmp, target)
    return target


def _write_adapter(name: str, config: Any, tensors: Mapping[str, torch.Tensor], out_dir: Path,
                   base_ref: str) -> Path:
    """One adapter folder written and renamed into place (``_stage_adapter`` then ``_commit``)."""
    return _commit(_stage_adapter(name, config, tensors, out_dir, base_ref), out_dir / name)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (what ``mkdir(parents=True)``
    creates), None if ``folder`` exists."""
    missing = None
    for candidate in (folder, *folder.absolute().parents):
        if candidate.exists():
            return missing
        missing = candidate
    return missing


def readme_text(adapters: list[str], base_ref: str, info: Mapping[str, Any]) -> str:
    """How to load this export with plain transformers + PEFT (the exact adapter names and order), and
    what it reproduces."""
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
    together = "All adapters are meant to be active TOGETHER on the frozen base model.\n" if rest else ""
    strength = info.get("strength")
    exact = info.get("exact", EXACT)
    same = (f"Greedy decoding this way gives the same text as `fedpersona generate --strength {strength}` "
            f"(the same model: {exact}).")
    if exact != EXACT:
        same = (f"This is the same model as `fedpersona generate --strength {strength}`, {exact}; greedy "
                "decoding gives the same text unless two tokens nearly tie.")
    same = textwrap.fill(same, 100)
    notes = "".join(f"- {_wrap(note)}\n" for note in info.get("notes", []))
    return f"""fedpersona adapter export
=========================

Model:    {info.get("model_id")} (base model folder or id: {base_ref})
Scheme:   {info.get("scheme")}
Adapters: {", ".join(f"{a} ({'/'.join(roles.get(a, []))})" for a in adapters)}
Strength: {strength} (private tensors scaled from global 0 to personal 1 at export time)

What this export holds ({info.get("scheme")} scheme):
{notes}
Each subfolder is a regular PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).
{together}Load with plain transformers + peft (no fedpersona needed):

    import os, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel

    OUT = "{info.get("out_dir", "OUT")}"
    BASE = "{base_ref}"
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(OUT, "{first}"), adapter_name="{first}")
{loads}    model.base_model.set_adapter([{names}], inference_mode=True){"  # all active at once" if rest else ""}
    model.eval()

Prompt format used in training (use the same for generation):

{prompt_code}    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=64, do_sample=False, no_repeat_ngram_size={NO_REPEAT_NGRAM},
                         pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())

{same}
{private_note}"""


def _wrap(text: str, width: int = 100) -> str:
    return "\n  ".join(textwrap.wrap(text, width - 2))


def export_adapters(resident: ResidentModel, out_dir: str | Path, *, base_model: str, strength: float = 1.0,
                    force: bool = False, info: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``resident``'s model (with its current tensors) to ``out_dir`` as PEFT adapters that plain
    PEFT loads into the same model as ``fedpersona generate --strength strength``.

    Every adapter of the layout gets its folder, except adapters run through hooks (PAL's prototypes,
    ``mixed_adapters``), which are materialized into ONE merged adapter, ``personal``. ``base_model`` is
    the base model's resolved local folder or hub id (recorded as ``base_model_name_or_path``).
    ``strength`` (0..1) scales the private tensors as ``fedpersona generate --strength`` does. Returns
    the adapter folders written.
    """
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"--strength {strength}: must be between 0 (global) and 1 (fully personal)")
    out_dir = Path(out_dir)
    mixed = mixed_adapters(resident)
    plain = [a for a in resident.layout.ranks if a not in mixed]
    adapters = plain + ([MERGED_ADAPTER] if mixed else [])
    _check_out_dir(out_dir, adapters, force)
    scheme = (info or {}).get("scheme")
    roles = {a: _roles(resident, a) for a in plain}
    notes = [SCHEME_NOTES.get(str(scheme), "The adapters of the layout, active together.")]
    details: dict[str, Any] = {}
    contents: dict[str, tuple[Any, dict[str, torch.Tensor]]] = {}
    # strength 1: the stored tensors bit for bit (initial + 1 * (x - initial) is not always x in floats)
    with nullcontext() if strength == 1.0 else resident.adapters.private_strength(strength):
        for adapter in plain:
            contents[adapter] = (resident.model.peft_config[adapter], adapter_state_dict(resident, adapter))
        if mixed:
            config, tensors, merged = merged_adapter(resident, mixed)
            contents[MERGED_ADAPTER] = (config, tensors)
            roles[MERGED_ADAPTER] = sorted({r for a in mixed for r in _roles(resident, a)} | _outside_roles(resident))
            details["merged"] = {MERGED_ADAPTER: merged}
    base_ref = base_model_reference(base_model)
    details = {**(info or {}), "base_model_name_or_path": base_ref, "strength": strength, "adapters": adapters,
               "roles": roles, "prompt_format": resident.prompt_format.name,
               "reproduces": f"fedpersona generate --strength {strength}",
               "exact": MERGED_EXACT if mixed else EXACT,
               "notes": notes, **details, "out_dir": str(out_dir.resolve())}
    manifest = {k: v for k, v in details.items() if k != "out_dir"}
    created = _first_missing(out_dir)
    staged: list[tuple[Path, Path]] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, (config, tensors) in contents.items():
            staged.append((_stage_adapter(name, config, tensors, out_dir, base_ref), out_dir / name))
        staged.append((_stage_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n"),
                       out_dir / MANIFEST_NAME))
        staged.append((_stage_text(out_dir / README_NAME, readme_text(adapters, base_ref, details)),
                       out_dir / README_NAME))
        written = [_commit(tmp, target) for tmp, target in staged]
    except OSError as err:
        for tmp, _ in staged:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)  # the folders this export made: nothing left behind
        from fedpersona.io import storage_error

        raise (storage_error(err, out_dir, f"export --out {out_dir}")
               or UsageError(f"export --out {out_dir}: cannot write there ({err.strerror or err}); choose another "
                             "folder; nothing was written")) from None
    return written[: len(contents)]
