"""The generated:stances scenario (content poles) through the generated-scenario construction, on a tiny random
chat model (it writes nonsense: enough for the cache, the pair file's shape and the personas' opposition)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedpersona.alignment.judges import user_poles
from fedpersona.config import RunConfig
from fedpersona.data import stance_prompts
from fedpersona.data.schema import load_users
from fedpersona.errors import UsageError
from fedpersona.model.embedded import build_tokenizer
from fedpersona.simulations import styles

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = "how do i save money time be careful cheap quick safe - . , !".split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
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


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDPERSONA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(styles, "GENERATION", styles.GenerationSettings(max_new_tokens=6))
    return tmp_path / "cache"


def quiet(_line: str) -> None:
    pass


def test_data_module_is_pure_and_its_personas_oppose():
    code = ("import sys, fedpersona.data.stance_prompts; "
            "print(sorted(m for m in ('torch', 'transformers', 'flwr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert len(stance_prompts.PERSONAS) == 4 and len(stance_prompts.POLES) == 4
    for persona in stance_prompts.PERSONAS:
        other = stance_prompts.PERSONAS[3 - persona.index]
        assert all(stance_prompts.OPPOSITE[a] == b for a, b in zip(persona.poles, other.poles, strict=True))


def test_stances_pair_file_beside_the_styles_cache(tiny_model, cache):
    path = styles.ensure_generated_pairs("stances", tiny_model, 5, 0, report=quiet)
    answers = styles.answers_path(tiny_model, 0, styles.STANCES)
    assert answers.name.startswith("stances-v1-") and path.name == f"{answers.stem}-users5.jsonl"
    meta, rows = styles.read_answers(answers, styles.STANCES)
    assert meta["content_digest"] == styles.content_digest(scenario=styles.STANCES) != styles.content_digest()
    assert len(rows) == 4 * len(stance_prompts.PROMPTS) and {r["pole"] for r in rows} == set(stance_prompts.POLES)
    users = load_users(path)
    assert [u.user_id for u in users][:4] == ["user0000-cautious-frugal", "user0001-bold-frugal",
                                              "user0002-cautious-convenient", "user0003-bold-convenient"]
    assert user_poles(users[3].user_id) == {"risk": "bold", "priority": "convenient"}
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    zero = [r for r in lines if r["user_id"] == users[0].user_id]
    three = [r for r in lines if r["user_id"] == users[3].user_id]
    assert zero and all(a["prompt"] == b["prompt"] and (a["chosen"], a["rejected"]) == (b["rejected"], b["chosen"])
                        for a, b in zip(zero, three, strict=True))
    assert not (cache / "data" / answers.name.replace("stances", "styles")).exists()  # styles untouched
    with pytest.raises(UsageError, match="unknown"):
        styles.ensure_generated_pairs("moods", tiny_model, 2, 0, report=quiet)


def test_generated_stances_spec_in_prepare_config(tiny_model, cache):
    from fedpersona.simulations.launcher import prepare_config

    config = prepare_config(RunConfig(model=tiny_model, data="generated:stances", num_users=4, rounds=1))
    assert Path(config.data).name.startswith("stances-v1-") and config.num_users == 4
