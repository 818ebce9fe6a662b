"""`fedpersona export`: the adapters load with plain transformers + PEFT and behave like fedpersona's model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedpersona.device.state import DeviceState

PROMPT = "what should I cook tonight?"
MAX_NEW = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Iterator[Path]:
    """A device state after one brief local round (default model, scheme and ranks); resident reset after."""
    from fedpersona.round.resident import resident_for
    from fedpersona.round.train import train_round
    from fedpersona.config import RunConfig
    from fedpersona.data.schema import UserData
    from fedpersona.data.synthetic import PreferenceSimulator
    from fedpersona.model.adapters import Role

    state = tmp_path_factory.mktemp("export") / "state"
    config = RunConfig(epochs=1, max_steps=4, batch_size=4, lr=2e-2, shared_lr=1e-2, accelerator="cpu")
    data = PreferenceSimulator("conflicting", 2, 0).user_data(0)
    user = UserData(data.user_id, data.train[:12], data.test[:4])
    resident = resident_for(config)
    with DeviceState(state) as st:
        st.bind(config.model, config.scheme)
        resident.adapters.reset(Role.SHARED)
        result = train_round(config, user, 0, 1, resident.adapters.tensors(Role.SHARED), st)
        st.save_shared(result.shared, server_round=1)
    yield state
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)


def plain_peft(out: Path):
    """Load an export with transformers + peft only (what README.txt tells a user to do)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = json.loads((out / "shared" / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "shared"), adapter_name="shared")
    model.load_adapter(str(out / "private"), adapter_name="private")
    model.base_model.set_adapter(["shared", "private"], inference_mode=True)
    model.eval()
    return model, tokenizer


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The documented prompt format, written out here on purpose (no fedpersona code)."""
    ids = tokenizer(f"user : {prompt} assistant :", add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id, *ids]])


def greedy(model, tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=MAX_NEW,
                             do_sample=False, no_repeat_ngram_size=3, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)  # the README's decoding: `fedpersona generate`'s
    return out[0, input_ids.shape[1]:]


def test_export_loads_with_plain_peft_and_matches(trained: Path, tmp_path: Path, cli) -> None:
    from safetensors import safe_open

    from fedpersona.commands.device import load_state_resident
    from fedpersona.model.loading import resolve_model_path

    out = tmp_path / "export"
    code, stdout, err = cli("export", "--state", str(trained), "--out", str(out))
    assert code == 0, err
    assert "shared, private" in stdout
    for adapter in ("shared", "private"):
        assert {p.name for p in (out / adapter).iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
        config = json.loads((out / adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(Path(resolve_model_path("embedded")).resolve())
        assert (config["peft_type"], config["r"], config["inference_mode"]) == ("LORA", 8 if adapter == "shared" else 2, True)
    readme = (out / "README.txt").read_text()
    assert 'load_adapter(os.path.join(OUT, "private"), adapter_name="private")' in readme
    from fedpersona.alignment.settings import NO_REPEAT_NGRAM

    assert f"no_repeat_ngram_size={NO_REPEAT_NGRAM}," in readme  # the README decodes as `fedpersona generate` does
    assert json.loads((out / "fedpersona_export.json").read_text())["adapters"] == ["shared", "private"]

    # tensor names in PEFT's saved format: the state's names without the adapter name
    with DeviceState(trained) as st:
        stored = st.load_private()
    with safe_open(str(out / "private" / "adapter_model.safetensors"), framework="pt") as handle:
        exported = {name: handle.get_tensor(name) for name in handle.keys()}
    assert stored is not None
    assert set(exported) == {n.replace(".private.", ".") for n in stored}
    for name, tensor in stored.items():
        assert torch.equal(exported[name.replace(".private.", ".")], tensor)

    model, tokenizer = plain_peft(out)
    ids = prompt_ids(tokenizer, PROMPT)
    with DeviceState(trained) as st:
        resident, _, _ = load_state_resident(st, "cpu")
    with torch.no_grad():
        want = resident.model(input_ids=ids).logits
        got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        model.base_model.set_adapter(["shared"], inference_mode=True)  # the private adapter matters
        assert not torch.allclose(model(input_ids=ids).logits, want, atol=1e-4)
        model.base_model.set_adapter(["shared", "private"], inference_mode=True)

    tokens = greedy(model, tokenizer, ids)
    assert torch.equal(tokens, greedy(resident.model, resident.tokenizer, ids))
    code, text, _ = cli("generate", PROMPT, "--state", str(trained), "--device", "cpu",
                        "--max-new-tokens", str(MAX_NEW))
    assert code == 0
    assert text.strip() == tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_export_strength_zero_is_the_global_model(trained: Path, tmp_path: Path, cli) -> None:
    from fedpersona.commands.device import load_state_resident
    from fedpersona.model.adapters import Role

    out = tmp_path / "global"
    assert cli("export", "--state", str(trained), "--out", str(out), "--strength", "0")[0] == 0
    model, tokenizer = plain_peft(out)
    ids = prompt_ids(tokenizer, PROMPT)
    with DeviceState(trained) as st:
        resident, _, _ = load_state_resident(st, "cpu")
    resident.adapters.reset(Role.PRIVATE)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, resident.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_export_refusals(trained: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli("export", "--state", str(trained), "--out", str(out))
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert cli("export", "--state", str(trained), "--out", str(out), "--force")[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "shared" / "adapter_model.safetensors").exists()
    assert cli("export", "--state", str(trained), "--out", str(out), "--force")[0] == 0  # again: replaced
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    (out / "private").rename(out / "moved")
    (out / "private").write_text("not an adapter folder")
    code, _, err = cli("export", "--state", str(trained), "--out", str(out), "--force")
    assert code == 2 and "not an adapter folder" in err

    empty = tmp_path / "empty"
    DeviceState(empty).close()
    code, _, err = cli("export", "--state", str(empty), "--out", str(tmp_path / "x"))
    assert code == 2 and "no adapters yet" in err and not (tmp_path / "x").exists()
    code, _, err = cli("export", "--state", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert code == 2 and "no device state here" in err


# ---------------------------------------------------------------------------- every scheme, plain PEFT

# the schemes of fedpersona.strategies.schemes, spelled out: a new scheme must be added here on purpose
SCHEME_NAMES = ("split", "global", "local", "fedsa", "ffa", "finetune", "pal")
TINY_WORDS = ("user assistant : how do i cook rice bake bread learn chess sure here is a short long answer "
              "with steps first then finally . , !").split()


def save_tiny(folder: Path, family: str) -> Path:
    """A random one-layer model of ``family`` (llama: nn.Linear; gpt2: Conv1D) with a word-level tokenizer."""
    import transformers

    from fedpersona.model.embedded import build_tokenizer

    tokenizer = build_tokenizer(TINY_WORDS)
    sizes = (dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1) if family == "llama" else dict(n_embd=16, n_layer=1, n_head=2, n_positions=64))
    config = getattr(transformers, "LlamaConfig" if family == "llama" else "GPT2Config")(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **sizes)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(root / family, family) for family in ("llama", "gpt2")}


def personal_resident(model_dir: Path, scheme: str, seed: int = 0, prototypes: int = 3):
    """A fresh (not kept) resident model of ``scheme`` whose shared and private tensors are random and
    non-zero, as after training (frozen tensors keep their seeded start, as `generate` loads them)."""
    from fedpersona.round.resident import resident_for
    from fedpersona.config import RunConfig
    from fedpersona.model.adapters import Role

    config = RunConfig(model=str(model_dir), scheme=scheme, shared_rank=2, private_rank=1, pal_prototypes=prototypes,
                       seed=seed, accelerator="cpu")
    resident = resident_for(config, keep=False)
    generator = torch.Generator().manual_seed(1234 + seed)
    for role in (Role.SHARED, Role.PRIVATE):
        values = {n: torch.randn(t.shape, generator=generator) * (0.3 if n.endswith("logits") else 0.5)
                  for n, t in resident.adapters.tensors(role).items()}
        if values:
            resident.adapters.load(values, role)
    resident.model.eval()
    return resident, config


def load_plain(out: Path):
    """An export loaded the way README.txt says, with transformers + peft only (adapter list from the manifest)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = json.loads((out / "fedpersona_export.json").read_text())["adapters"]
    base_path = json.loads((out / adapters[0] / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / adapters[0]), adapter_name=adapters[0])
    for adapter in adapters[1:]:
        model.load_adapter(str(out / adapter), adapter_name=adapter)
    model.base_model.set_adapter(adapters, inference_mode=True)
    model.eval()
    return model


def reinit_warnings(records) -> list[str]:
    return [str(w.message) for w in records
            if "reinitializ" in str(w.message) or "should not be contained" in str(w.message)]


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_every_scheme_export_is_the_personal_model(scheme: str, tiny_models, tmp_path: Path) -> None:
    """Plain PEFT on the export == the resident personal model (`generate --strength 1`), for every scheme;
    no PEFT warning about adapter names on the way (fedsa/ffa once used an adapter named 'lora')."""
    import warnings

    from fedpersona.alignment.generation import generate
    from fedpersona.model.adapters import Role
    from fedpersona.model.export import export_adapters
    from fedpersona.strategies.schemes import SCHEMES

    assert set(SCHEME_NAMES) == set(SCHEMES)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        resident, config = personal_resident(tiny_models["llama"], scheme)
        out = tmp_path / scheme
        export_adapters(resident, out, base_model=config.model, info={"scheme": scheme, "model_id": config.model})
        model = load_plain(out)
        ids = prompt_ids(resident.tokenizer, "how do i cook rice")
        assert ids[0].tolist() == resident.prompt_format.prompt_ids("how do i cook rice")
        with torch.no_grad():
            want = resident.model(input_ids=ids).logits
            got = model(input_ids=ids).logits
            with resident.adapters.private_strength(0.0):
                global_logits = resident.model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if resident.adapters.names(Role.PRIVATE):  # the private part matters, so the comparison above bites
            assert not torch.allclose(want, global_logits, atol=1e-3)
        text = tokenizer_text(resident.tokenizer, greedy(model, resident.tokenizer, ids))
        assert text == generate(resident, ["how do i cook rice"], strength=1.0, max_new_tokens=MAX_NEW)[0]
    assert not reinit_warnings(records), reinit_warnings(records)

    manifest = json.loads((out / "fedpersona_export.json").read_text())
    readme = (out / "README.txt").read_text()
    assert manifest["scheme"] == scheme and manifest["reproduces"] == "fedpersona generate --strength 1.0"
    assert manifest["notes"] and manifest["notes"][0].split(":")[0] in " ".join(readme.split())
    if scheme == "pal":
        assert manifest["adapters"] == ["personal"]
        merged = manifest["merged"]["personal"]
        assert merged["from"] == ["proto0", "proto1", "proto2"] and merged["rank"] == 3 * config.shared_rank
        gains = [merged["gains"][p] for p in merged["from"]]
        assert sum(gains) == pytest.approx(3.0, abs=1e-4) and max(gains) - min(gains) > 0.1
        assert json.loads((out / "personal" / "adapter_config.json").read_text())["r"] == 6
        assert manifest["roles"]["personal"] == ["private", "shared"] and "Privacy: personal" in readme
    elif scheme in ("fedsa", "ffa"):
        assert manifest["adapters"] == ["single"]
    if scheme == "finetune":
        assert "NOT in this export" in readme


def tokenizer_text(tokenizer, tokens: torch.Tensor) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize(("family", "scheme", "strength"),
                         [("llama", "pal", 0.5), ("llama", "pal", 0.0), ("llama", "split", 0.5),
                          ("llama", "fedsa", 0.0), ("gpt2", "pal", 1.0), ("gpt2", "fedsa", 1.0)])
def test_export_at_a_strength_is_generate_at_that_strength(family: str, scheme: str, strength: float, tiny_models,
                                                            tmp_path: Path) -> None:
    """--strength s: the export is the resident model under private_strength(s); PAL at 0 is the uniform
    mixture (the global model); GPT-2's Conv1D layers (fan_in_fan_out) merge the same way."""
    from fedpersona.model.export import export_adapters

    resident, config = personal_resident(tiny_models[family], scheme, seed=1)
    out = tmp_path / "out"
    export_adapters(resident, out, base_model=config.model, strength=strength, info={"scheme": scheme})
    model = load_plain(out)
    ids = prompt_ids(resident.tokenizer, "how do i bake bread")
    with torch.no_grad(), resident.adapters.private_strength(strength):
        want = resident.model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    if scheme == "pal" and strength == 0.0:
        gains = json.loads((out / "fedpersona_export.json").read_text())["merged"]["personal"]["gains"]
        assert all(g == pytest.approx(1.0, abs=1e-6) for g in gains.values())


def test_old_pal_export_would_be_the_global_model(tiny_models, tmp_path: Path) -> None:
    """What the old export wrote for PAL (every prototype adapter as it is, all loaded together) is the
    uniform mixture, i.e. the global model, not the user's: the equality checked above fails on it."""
    from fedpersona.model.export import _write_adapter, adapter_state_dict

    resident, config = personal_resident(tiny_models["llama"], "pal", seed=2)
    names = list(resident.layout.ranks)
    for name in names:
        _write_adapter(name, resident.model.peft_config[name], adapter_state_dict(resident, name), tmp_path,
                       config.model)
    (tmp_path / "fedpersona_export.json").write_text(json.dumps({"adapters": names}))
    model = load_plain(tmp_path)
    ids = prompt_ids(resident.tokenizer, "how do i cook rice")
    with torch.no_grad():
        old = model(input_ids=ids).logits
        personal = resident.model(input_ids=ids).logits
        with resident.adapters.private_strength(0.0):
            uniform = resident.model(input_ids=ids).logits
    torch.testing.assert_close(old, uniform, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(old, personal, atol=1e-3)


@pytest.mark.parametrize(("scheme", "old_names"), [("pal", False), ("fedsa", False), ("ffa", False),
                                                  ("fedsa", True), ("ffa", True)])
def test_cli_export_of_a_device_state_matches_cli_generate(scheme: str, old_names: bool, tiny_models, tmp_path: Path,
                                                           cli) -> None:
    """The commands end to end: a device state's `fedpersona export`, loaded with plain PEFT, greedy-decodes
    what `fedpersona generate` prints; neither command nor the loading warns about adapter names. A state
    written when fedsa/ffa's adapter was named 'lora' still loads (its tensors, the same model)."""
    import warnings

    from fedpersona.model.adapters import Role

    resident, config = personal_resident(tiny_models["llama"], scheme, seed=3, prototypes=2)  # pal: the default K
    state = tmp_path / "state"

    def stored(tensors: dict) -> dict:  # old_names: as the state files of the release before the rename
        return {n.replace(".single.", ".lora."): t for n, t in tensors.items()} if old_names else tensors

    with DeviceState(state) as st:
        st.bind(config.model, scheme)
        st.save_shared(stored(resident.adapters.tensors(Role.SHARED)), server_round=1)
        private = stored(resident.adapters.tensors(Role.PRIVATE))
        if old_names:
            assert all(".lora." in n for n in [*private, *stored(resident.adapters.tensors(Role.SHARED))])
        if private:
            st.save_private(private, 1, server_round=1)
    out = tmp_path / "export"
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        code, stdout, err = cli("export", "--state", str(state), "--out", str(out))
        assert code == 0, err
        assert stdout.startswith(f"exported {'personal' if scheme == 'pal' else 'single'} to ")
        code, text, err = cli("generate", "how do i cook rice", "--state", str(state), "--device", "cpu",
                              "--max-new-tokens", str(MAX_NEW))
        assert code == 0, err
        model = load_plain(out)
        tokens = greedy(model, resident.tokenizer, prompt_ids(resident.tokenizer, "how do i cook rice"))
    assert not reinit_warnings(records), reinit_warnings(records)
    assert text.strip() == tokenizer_text(resident.tokenizer, tokens)
    from fedpersona.commands.device import load_state_resident

    with DeviceState(state) as st:  # what `generate` runs: the state's model (its seed: ffa's frozen A)
        loaded, _, has_private = load_state_resident(st, "cpu")
    assert has_private == bool(private)
    ids = prompt_ids(resident.tokenizer, "how do i cook rice")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, loaded.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    if old_names and private:  # the old-name tensors were loaded, not left at their initial values
        assert torch.equal(loaded.adapters.tensors(Role.PRIVATE)[next(iter(resident.adapters.tensors(Role.PRIVATE)))],
                           next(iter(private.values())))
