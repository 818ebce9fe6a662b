"""The real loading path: a model folder saved by transformers loads like a user's model would."""

import pytest
import torch

from fedpersona.errors import UsageError
from fedpersona.model.embedded import build_embedded, build_tokenizer
from fedpersona.model.loading import load_base, resolve_model_path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(["hello", "world", "user", "assistant", ":", "."])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_saved_folder_loads_frozen_in_eval_mode(tiny_model_dir):
    model, tokenizer = load_base(str(tiny_model_dir))
    assert model.config.hidden_size == 16
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids("hello"), tokenizer.convert_tokens_to_ids("world")]
    # cached per process: the same objects come back, nothing is reloaded
    again, _ = load_base(str(tiny_model_dir))
    assert again is model


def test_folder_without_config_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        load_base(str(tmp_path))


def test_local_paths_are_checked_before_loading(tmp_path, tiny_model_dir):
    with pytest.raises(UsageError, match="no such file or folder") as err:
        resolve_model_path(str(tmp_path / "missing"))
    assert "smollm2-135m-instruct" in str(err.value) and "\n" not in str(err.value)  # the choices, on one line
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(UsageError, match="a file, but not a .gguf checkpoint"):
        resolve_model_path(str(weights))
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_embedded_build_is_deterministic(tmp_path):
    build_embedded(tmp_path / "a", seed=3, steps=3, batch_size=4)
    build_embedded(tmp_path / "b", seed=3, steps=3, batch_size=4)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_embedded_default_generates_readable_text(split_resident):
    from fedpersona.alignment.generation import generate

    text = generate(split_resident, ["how do i get better at chess ?"], strength=0.0)[0]
    assert "<unk>" not in text and len(text.split()) >= 4
    assert text.split()[0] in {"certainly", "good", "hey", "sure"}  # a simulator-style opening


@pytest.fixture
def hub_out_of_reach(monkeypatch, tmp_path):
    """A Hub endpoint nothing listens on, and an empty HF cache of our own (no network involved)."""
    from fedpersona.model import loading

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    loading.hub_unreachable.cache_clear()
    yield cache
    loading.hub_unreachable.cache_clear()


def test_an_uncached_hub_id_fails_at_once_when_the_hub_is_out_of_reach(hub_out_of_reach, cli):
    """Issue 14: an unreachable HF id used to cost ten retry lines and about a minute; now one line, before
    any model work or Ray (a closed port, so no network is needed to run the test)."""
    for argv in (["simulate", "--model", "someorg/no-such-model", "--rounds", "1"],
                 ["simulate", "--model", "bad id!!", "--rounds", "1"]):
        code, out, err = cli(*argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and argv[2] in lines[0], err
    assert "out of reach" in cli("simulate", "--model", "someorg/no-such-model")[2]


def test_a_cached_hub_id_loads_from_its_snapshot_offline(hub_out_of_reach, tiny_model_dir, monkeypatch):
    import shutil

    from fedpersona.model import loading

    snapshot = hub_out_of_reach / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (hub_out_of_reach / "models--someorg--tiny" / "refs").mkdir()
    (hub_out_of_reach / "models--someorg--tiny" / "refs" / "main").write_text("0" * 40)
    assert resolve_model_path("someorg/tiny") == str(snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # same answer, without even a probe
    loading.hub_unreachable.cache_clear()
    assert loading.hub_unreachable() == "HF_HUB_OFFLINE is set"
    assert resolve_model_path("someorg/tiny") == str(snapshot)
    with pytest.raises(UsageError, match="not in the local Hugging Face cache"):
        resolve_model_path("someorg/other")


def test_a_hub_id_passes_through_untouched_when_the_hub_answers(hub_out_of_reach, monkeypatch):
    import socket

    from fedpersona.model import loading

    with socket.socket() as listener:  # a local stand-in for the Hub's port: reachable is all that is probed
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        loading.hub_unreachable.cache_clear()
        assert resolve_model_path("org/some-model") == "org/some-model"  # transformers downloads it


def test_check_model_refuses_at_once_and_builds_nothing(hub_out_of_reach, tiny_model_dir, tmp_path, monkeypatch):
    """``check_model``: what ``resolve_model_path`` would refuse, without building, converting or loading."""
    from fedpersona.model import loading

    monkeypatch.setattr(loading, "ensure_converted", lambda *a, **k: pytest.fail("check_model converted a GGUF"))
    monkeypatch.setenv("FEDPERSONA_CACHE", str(tmp_path / "cache"))
    loading.check_model("embedded")
    loading.check_model("embedded:7")  # another seed: built when a run loads it, not by the check
    loading.check_model(str(tiny_model_dir))
    assert not (tmp_path / "cache").exists()
    for model, message in (("embedded:abc", "whole number"), ("someorg/absent", "out of reach"),
                           (str(tmp_path / "none"), "no such file or folder"), ("bad id!!", "not a local path"),
                           (str(tmp_path / "x.gguf"), "no such GGUF file")):
        with pytest.raises(UsageError, match=message) as err:
            loading.check_model(model)
        assert "\n" not in str(err.value)
