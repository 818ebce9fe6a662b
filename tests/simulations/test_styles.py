"""The generated:styles scenario (P-SOUPS construction, arXiv 2310.11564) on a tiny random chat model.

A one-layer Llama with a word-level tokenizer and a ChatML template is saved to a temp folder; it writes
nonsense, which is all these tests need: determinism, caching, the pair file's shape and the personas'
opposition. Every test has its own temp cache (FEDPERSONA_CACHE) and a short token cap.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedpersona.config import RunConfig
from fedpersona.data import style_prompts as data
from fedpersona.data.schema import load_users
from fedpersona.errors import UsageError
from fedpersona.model.embedded import build_tokenizer
from fedpersona.simulations import styles

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("how do i cook rice keep my houseplants alive water them when the top of soil is dry answer in one "
         "short sentence a list - . , ! ? sure here friend formal casual detailed").split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A random one-layer Llama and a ChatML tokenizer, saved as an HF folder; returns the folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = build_tokenizer(WORDS)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@dataclass
class Cache:
    root: Path
    generate_calls: list  # the seed of every generate_answers call


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Cache:
    """A fresh model/data cache and a short token cap; counts the calls of ``generate_answers``."""
    monkeypatch.setenv("FEDPERSONA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(styles, "GENERATION", styles.GenerationSettings(max_new_tokens=10))
    seen = Cache(tmp_path / "cache", [])
    real = styles.generate_answers

    def counting(*args, **kwargs):
        seen.generate_calls.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(styles, "generate_answers", counting)
    return seen


def quiet(_line: str) -> None:
    pass


def test_data_module_is_pure_and_personas_are_complete():
    code = ("import sys, fedpersona.data.style_prompts; "
            "print(sorted(m for m in ('torch', 'transformers', 'flwr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert len(data.PERSONAS) == 8 and len({p.poles for p in data.PERSONAS}) == 8
    for persona in data.PERSONAS:  # persona i and 7 - i disagree on every dimension
        other = data.PERSONAS[7 - persona.index]
        assert all(data.OPPOSITE[a] == b for a, b in zip(persona.poles, other.poles, strict=True))
    assert len(set(data.PROMPTS)) == len(data.PROMPTS) >= 30 and data.DEMO_PROMPT not in data.PROMPTS
    assert all(p.instruction and p.demo for p in data.POLES.values()) and len(data.POLES) == 6


def test_answers_are_deterministic_and_cached(tiny_model, cache, tmp_path, monkeypatch):
    first = styles.ensure_style_answers(tiny_model, 3, report=quiet)
    assert first.parent == cache.root / "data"
    assert first.name.startswith("styles-v1-") and first.name.endswith("-seed3.jsonl")
    mtime = first.stat().st_mtime_ns
    assert styles.ensure_style_answers(tiny_model, 3, report=quiet) == first  # read, not written again
    assert cache.generate_calls == [3] and first.stat().st_mtime_ns == mtime
    meta, rows = styles.read_answers(first)
    assert meta["model_key"] == styles.model_key(tiny_model) and len(rows) == 6 * len(data.PROMPTS)

    monkeypatch.setenv("FEDPERSONA_CACHE", str(tmp_path / "other-cache"))  # a second machine, same seed
    again = styles.ensure_style_answers(tiny_model, 3, report=quiet)
    assert again != first and again.read_bytes() == first.read_bytes()
    other_seed = styles.ensure_style_answers(tiny_model, 4, report=quiet)
    assert other_seed.read_bytes() != first.read_bytes()


def test_pair_file_loads_personas_oppose_and_test_prompts_are_held_out(tiny_model, cache):
    path = styles.ensure_style_pairs(tiny_model, 10, 0, report=quiet)
    assert styles.ensure_style_pairs(tiny_model, 10, 0, report=quiet) == path and len(cache.generate_calls) == 1
    users = load_users(path)  # the project's own loader validates every row
    assert [u.user_id for u in users] == [styles.user_id(i) for i in range(10)]
    assert users[7].user_id == "user0007-detailed-casual-list"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_user: dict[str, list[dict]] = {}
    for row in rows:
        by_user.setdefault(row["user_id"], []).append(row)
    zero, seven = by_user[styles.user_id(0)], by_user[styles.user_id(7)]
    assert len(zero) == len(seven) > 0  # same prompts and dimensions, in the same order
    for a, b in zip(zero, seven, strict=True):
        assert a["prompt"] == b["prompt"] and (a["chosen"], a["rejected"]) == (b["rejected"], b["chosen"])
    assert by_user[styles.user_id(8)] == [dict(r, user_id=styles.user_id(8)) for r in zero]  # persona 8 mod 8
    train = {r["prompt"] for r in rows if r["split"] == "train"}
    test = {r["prompt"] for r in rows if r["split"] == "test"}
    assert test and train and not train & test
    assert test == {p for i, p in enumerate(data.PROMPTS) if data.is_test_prompt(i)}
    assert set(data.PROMPTS) == train | test and not any("sentence" in r["prompt"] for r in rows)


def test_generated_spec_becomes_a_pair_file_in_prepare_config(tiny_model, cache):
    from fedpersona.simulations.launcher import prepare_config

    config = prepare_config(RunConfig(model=tiny_model, data="generated:styles", num_users=6, new_users=2,
                                      seed=1, rounds=1))
    assert Path(config.data).is_file() and config.data.endswith("-seed1-users8.jsonl")
    assert config.num_users == 6 and not config.is_generated  # the last two of 8 users are the new users
    assert len(load_users(config.data)) == 8


def test_stale_cache_is_refused(tiny_model, cache, monkeypatch):
    path = styles.ensure_style_answers(tiny_model, 0, report=quiet)
    monkeypatch.setattr(styles, "GENERATION", styles.GenerationSettings(max_new_tokens=11))
    monkeypatch.setattr(styles, "answers_path", lambda model, seed: path)  # same name, other settings
    with pytest.raises(UsageError, match="delete it to regenerate"):
        styles.ensure_style_answers(tiny_model, 0, report=quiet)


def test_cli_writes_the_pair_file_and_bad_arguments_exit_2(tiny_model, cache, tmp_path, cli):
    out = tmp_path / "pairs.jsonl"
    code, stdout, _ = cli("data", "styles", "--model", tiny_model, "--users", "3", "--seed", "2", "--out", str(out))
    assert code == 0 and len(load_users(out)) == 3
    assert "answers cache:" in stdout and "length:" in stdout
    for bad in (["--users", "0"], ["--model", str(tmp_path / "no-such-model")]):
        code, _, err = cli("data", "styles", *bad, "--out", str(tmp_path / "x.jsonl"))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.jsonl").exists()


def test_request_text_chat_and_plain(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pole = data.POLES["list"]
    chat = styles.request_text(tokenizer, pole, "How do I cook rice?")
    assert chat.index(pole.instruction) < chat.index(data.DEMO_PROMPT) < chat.index("How do I cook rice?")
    assert chat.endswith("<|im_start|>assistant\n")
    tokenizer.chat_template = None  # e.g. the embedded model: plain text, instruction after the prompt
    assert styles.request_text(tokenizer, pole, "How do I cook rice?") == \
        f"user : How do I cook rice? {pole.instruction} assistant :"


@pytest.mark.parametrize("text,finished,expected", [
    ("One. Two is cut", False, "One."),
    ("- a\n- b\n- c is cu", False, "- a\n- b"),
    ("1. Open it. 2. Rinse it. 9.", False, "1. Open it. 2. Rinse it."),
    ("no boundary at all", False, "no boundary at all"),
    ("Done here\n- \n###\n\n\n\nEnd", True, "Done here\n\nEnd"),
])
def test_clean_answer(text, finished, expected):
    assert styles.clean_answer(text, finished) == expected


def test_stats_tell_the_poles_apart():
    rows = [{"pole": "concise", "answer": "Short."}, {"pole": "detailed", "answer": "word " * 80},
            {"pole": "formal", "answer": "It is advisable to proceed."},
            {"pole": "casual", "answer": "Yeah, it's cool!"},
            {"pole": "prose", "answer": "A paragraph."}, {"pole": "list", "answer": "1. One. 2. Two."}]
    stats = styles.style_stats(rows)
    assert all(d["separated"] for d in stats["dimensions"].values())
    assert "length: words detailed 80.0 vs concise 1.0 -> separated" in styles.format_stats(stats)
