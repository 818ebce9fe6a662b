"""The embedded default model ships in the package: the recorded bits, found without a build, loadable."""

import hashlib
import importlib.util
import time
import tomllib
from pathlib import Path

import pytest
import torch

import fedpersona.model.embedded as embedded
from fedpersona.model.embedded import SUMS_NAME, read_sums, shipped_path
from fedpersona.model.loading import model_sha256, resolve_model_path

# The bits every machine starts from. Changes only when scripts/build_embedded_model.py re-makes the folder
# on purpose (then update this line, and the README's figures).
MODEL_SHA256 = "04124c5a8f86b78d3536179b3ac0b8d6dcfd97c33fb49adcca216d8884e7057a"
REPO = Path(__file__).resolve().parents[2]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_files_match_their_recorded_hashes():
    folder = shipped_path()
    sums = read_sums(folder)
    assert sums["model.safetensors"] == MODEL_SHA256
    assert {f.name for f in folder.iterdir()} == {*sums, SUMS_NAME}  # nothing unrecorded ships
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(sums)
    assert {name: sha256(folder / name) for name in sums} == sums
    assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000


def test_package_data_includes_the_shipped_folder():
    """Wheel and editable installs take what pyproject's package-data names (checked without a build)."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fedpersona.model"]
    package = REPO / "fedpersona" / "model"
    matched = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    assert matched >= set(shipped_path().iterdir())


def test_embedded_resolves_to_the_shipped_bits_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPERSONA_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(embedded, "build_embedded", lambda *a, **k: pytest.fail("built the embedded model"))
    embedded.shipped_sums.cache_clear()  # check the files again, as a fresh process would
    started = time.perf_counter()
    path = resolve_model_path("embedded")
    assert time.perf_counter() - started < 0.5
    assert Path(path) == shipped_path() == Path(resolve_model_path("embedded:0"))
    assert not (tmp_path / "empty-cache").exists()  # nothing written: a read-only install works
    assert model_sha256("embedded") == MODEL_SHA256
    assert model_sha256("embedded:7") is None  # another seed, not built here: no hash, and no build


def test_shipped_model_and_tokenizer_load_and_match_the_recipe():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpersona.data.synthetic import vocabulary

    path = resolve_model_path("embedded")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 92_416
    assert tokenizer.get_vocab() == embedded.build_tokenizer(vocabulary() + ["user", "assistant", ":"]).get_vocab()
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("the model is good", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "shipped"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes(name.encode())
    embedded.write_sums(folder)
    (folder / "model.safetensors").write_bytes(b"other bits")
    monkeypatch.setattr(embedded, "shipped_path", lambda: folder)
    embedded.shipped_sums.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="damaged .*model.safetensors.*reinstall"):
            embedded.ensure_embedded(0)
        assert model_sha256.__wrapped__("embedded") is None  # summary.json gets null, not a crash
    finally:
        embedded.shipped_sums.cache_clear()


def test_model_sha256_of_a_folder_is_its_weight_files_hash(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"second")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"first")
    (tmp_path / "training_args.bin").write_bytes(b"ignored: safetensors present")
    assert model_sha256(str(tmp_path)) == hashlib.sha256(b"firstsecond").hexdigest()


def test_the_build_script_writes_and_checks_the_folder(tmp_path, monkeypatch):
    """scripts/build_embedded_model.py with a 3-step recipe (the real one takes ~10 CPU-minutes: not in CI)."""
    spec = importlib.util.spec_from_file_location("build_embedded_model", REPO / "scripts" / "build_embedded_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    real = script.build_embedded
    monkeypatch.setattr(script, "build_embedded", lambda out, seed: real(out, seed=seed, steps=3, batch_size=4))
    target = tmp_path / "shipped" / "embedded-v1-seed0"
    monkeypatch.setattr(script, "shipped_path", lambda: target)
    assert script.main([]) == 0
    sums = read_sums(target)
    assert set(sums) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                         "tokenizer_config.json"}
    assert {name: sha256(target / name) for name in sums} == sums
    assert script.main(["--check"]) == 0  # a rebuild here is bit-identical
    assert sorted(p.name for p in target.parent.iterdir()) == ["embedded-v1-seed0"]  # no staging left
