"""`fedpersona export`: the adapters load with plain transformers + PEFT and behave like fedpersona's model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedpersona.client.device_state import DeviceState

PROMPT = "what should I cook tonight?"
MAX_NEW = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Iterator[Path]:
    """A device state after one brief local round (default model, scheme and ranks); resident reset after."""
    from fedpersona.client.local import resident_for, train_round
    from fedpersona.config import RunConfig
    from fedpersona.data.schema import UserData
    from fedpersona.data.synthetic import PreferenceSimulator
    from fedpersona.model.adapters import Role

    state = tmp_path_factory.mktemp("export") / "state"
    config = RunConfig(epochs=1, max_steps=4, batch_size=4, lr=2e-2, shared_lr=1e-2, device="cpu")
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
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
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
