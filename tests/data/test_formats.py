"""Published-format loaders on hand-written fixtures, their error messages, detection and the registry."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpersona.data.formats import FORMATS, detect_format, load_format
from fedpersona.data.formats.hh_rlhf import load_hh_rlhf
from fedpersona.data.formats.personal_llm import ScoredPrompt, load_personal_llm, read_personal_llm, zscores
from fedpersona.data.formats.prism import load_prism
from fedpersona.data.formats.psoups import load_psoups
from fedpersona.data.formats.rows import iter_rows
from fedpersona.data.schema import PreferencePair
from fedpersona.errors import UsageError

FIXTURES = Path(__file__).parent / "fixtures"
PERSONALLLM = FIXTURES / "personalllm.jsonl"
PSOUPS = FIXTURES / "psoups.jsonl"
PSOUPS_ALLCOMBO = FIXTURES / "psoups_allcombo.json"
PRISM = FIXTURES / "prism_conversations.jsonl"
HH = FIXTURES / "hh_rlhf.jsonl"
PAIRS = FIXTURES / "pairs.jsonl"


def fixture_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def usage_error(call, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(UsageError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "a usage error is one line"
    return message


def per_user(pairs: list[PreferencePair]) -> dict[str, int]:
    return dict(Counter(p.user_id for p in pairs))


# ----------------------------------------------------------------------------------------- PersonalLLM


def test_personalllm_fixture_simulates_users() -> None:
    pairs = load_personal_llm(PERSONALLLM, num_users=3, pairs_per_user=4, seed=0)
    rows = fixture_rows(PERSONALLLM)
    assert len(pairs) == 12
    assert per_user(pairs) == {"pllm-0000": 4, "pllm-0001": 4, "pllm-0002": 4}
    assert pairs[0] == PreferencePair("pllm-0000", rows[0]["prompt"], rows[0]["response_1"], rows[0]["response_3"])
    responses = {r["prompt"]: [r[f"response_{i}"] for i in range(1, 9)] for r in rows}
    for pair in pairs:
        assert pair.chosen in responses[pair.prompt] and pair.rejected in responses[pair.prompt]
        # response_8 is the worst answer for every reward model: no positive weighting prefers it
        assert pair.chosen != responses[pair.prompt][7]
        if pair.prompt == rows[0]["prompt"]:  # there response_1 is the best for every reward model
            assert pair.rejected != rows[0]["response_1"]


def test_personalllm_reads_the_release_columns() -> None:
    models, prompts = read_personal_llm(PERSONALLLM)
    assert models == tuple(sorted([
        "gemma_2b", "gemma_7b", "mistral_raft", "llama3_sfairx", "oasst_deberta_v3", "beaver_7b",
        "oasst_pythia_7b", "oasst_pythia_1b", "mistral_ray", "mistral_weqweasdas",
    ]))
    assert len(prompts) == 3 and prompts[0].scores.shape == (8, 10)
    assert prompts[0].scores[2, models.index("gemma_7b")] == fixture_rows(PERSONALLLM)[0]["response_3_gemma_7b"]


def test_personalllm_users_are_seeded_and_stable() -> None:
    base = load_personal_llm(PERSONALLLM, num_users=3, pairs_per_user=4, seed=0)
    assert load_personal_llm(PERSONALLLM, num_users=3, pairs_per_user=4, seed=0) == base
    assert load_personal_llm(PERSONALLLM, num_users=5, pairs_per_user=4, seed=0)[:12] == base
    assert load_personal_llm(PERSONALLLM, num_users=3, pairs_per_user=4, seed=1) != base


def test_personalllm_alpha_controls_disagreement() -> None:
    from fedpersona.model.inspect import inspect_pairs

    def disagreement(alpha: float) -> float:
        pairs = load_personal_llm(PERSONALLLM, num_users=30, pairs_per_user=30, alpha=alpha, seed=0)
        return inspect_pairs(pairs)["disagreement"]

    assert disagreement(0.05) > 0.1 > disagreement(100.0)


def scored_row(prompt: str, responses: list[str | None], scores: list[list[float | None]],
               models: tuple[str, ...] = ("rm_a", "rm_b"), release: bool = True) -> dict[str, Any]:
    row: dict[str, Any] = {"prompt": prompt}
    for i, (text, values) in enumerate(zip(responses, scores), start=1):
        row[f"response_{i}"] = text
        for model, value in zip(models, values):
            row[f"response_{i}_{model}" if release else f"{model}_{i}"] = value
    return row


def test_personalllm_exact_pair_when_one_response_dominates(tmp_path: Path) -> None:
    row = scored_row("Q?", ["great", "poor", None], [[2.0, 5.0], [1.0, -3.0], [None, None]])
    path = write_jsonl(tmp_path / "pllm.jsonl", [row])
    pairs = load_personal_llm(path, num_users=2, pairs_per_user=3, seed=7)
    assert pairs == [PreferencePair(u, "Q?", "great", "poor") for u in ("pllm-0000",) * 3 + ("pllm-0001",) * 3]


def test_personalllm_alternative_column_layout_gives_the_same_pairs(tmp_path: Path) -> None:
    responses = ["a", "b", "c", "d"]
    scores = [[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]]
    release = write_jsonl(tmp_path / "release.jsonl", [scored_row("Q", responses, scores)])
    alternative = write_jsonl(tmp_path / "alt.jsonl", [scored_row("Q", responses, scores, release=False)])
    kwargs = {"num_users": 4, "pairs_per_user": 5, "alpha": 0.1, "seed": 3}
    assert load_personal_llm(release, **kwargs) == load_personal_llm(alternative, **kwargs)


def test_zscores_normalise_each_reward_model_over_the_file() -> None:
    prompts = [
        ScoredPrompt("f:1", "p", ("a", "b"), np.array([[1.0, 5.0], [3.0, 5.0]])),
        ScoredPrompt("f:2", "q", ("c", "d"), np.array([[5.0, 5.0], [np.nan, 5.0]])),
    ]
    z = zscores(prompts)
    std = np.std([1.0, 3.0, 5.0])
    np.testing.assert_allclose(z[0][:, 0], [(1 - 3) / std, 0.0])
    np.testing.assert_allclose(z[1][0, 0], (5 - 3) / std)
    assert np.isnan(z[1][1, 0])
    np.testing.assert_array_equal(z[0][:, 1], [0.0, 0.0])  # a constant reward model carries no signal


@pytest.mark.parametrize(
    ("mutate", "line", "expected"),
    [
        (lambda r: r.pop("prompt"), 2, "missing field 'prompt'"),
        (lambda r: r.pop("response_5_gemma_2b"), 2, "missing field 'response_5_gemma_2b'"),
        (lambda r: r.update(response_3_beaver_7b="high"), 2, "field 'response_3_beaver_7b' must be a number or null"),
        (lambda r: r.update(response_2=7), 2, "field 'response_2' must be a string"),
        (lambda r: r.update(prompt=["x"]), 2, "field 'prompt' must be a string"),
    ],
)
def test_personalllm_malformed_rows(tmp_path: Path, mutate, line: int, expected: str) -> None:
    rows = fixture_rows(PERSONALLLM)
    mutate(rows[1])
    path = write_jsonl(tmp_path / "bad_pllm.jsonl", rows)
    message = usage_error(load_personal_llm, path)
    assert message.startswith(f"{path}:{line}: ") and expected in message


def test_personalllm_structural_errors(tmp_path: Path) -> None:
    not_json = write_jsonl(tmp_path / "notjson.jsonl", [fixture_rows(PERSONALLLM)[0], "{oops"])
    assert usage_error(load_personal_llm, not_json).startswith(f"{not_json}:2: not valid JSON")
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "response_1": "a", "response_1_rm": 1.0}])
    assert "need at least two response columns" in usage_error(load_personal_llm, one)
    unscored = write_jsonl(tmp_path / "unscored.jsonl", [{"prompt": "p", "response_1": "a", "response_2": "b"}])
    assert usage_error(load_personal_llm, unscored).startswith(f"{unscored}:1: no reward-model score columns")
    same = write_jsonl(tmp_path / "same.jsonl", [scored_row("p", ["x", "x"], [[1.0, 1.0], [2.0, 2.0]])])
    message = usage_error(load_personal_llm, same)
    assert "no usable preference pairs" in message and "1 prompts with fewer than two usable responses" in message


@pytest.mark.parametrize(
    ("option", "value"),
    [("num_users", 0), ("alpha", 0.0), ("alpha", "big"), ("pairs_per_user", -1), ("seed", 1.5), ("prompt_pool", -2)],
)
def test_personalllm_bad_options(option: str, value: Any) -> None:
    assert f"option {option} must be" in usage_error(load_personal_llm, PERSONALLLM, **{option: value})


def test_personalllm_prompt_pool_limits_prompts() -> None:
    rows = fixture_rows(PERSONALLLM)
    pairs = load_personal_llm(PERSONALLLM, num_users=4, pairs_per_user=3, prompt_pool=1)
    assert {p.prompt for p in pairs} == {rows[0]["prompt"]}


# ----------------------------------------------------------------------------------------------- P-SOUPS


def test_psoups_fixture() -> None:
    pairs = load_psoups(PSOUPS)
    rows = fixture_rows(PSOUPS)
    assert len(pairs) == 8
    assert per_user(pairs) == {"1": 2, "2": 2, "3": 1, "4": 1, "5": 1, "6": 1}
    assert pairs[1] == PreferencePair("2", rows[1]["prompt"], rows[1]["chosen"], rows[1]["rejected"])
    assert pairs[0].chosen == pairs[1].rejected  # opposite poles of one dimension disagree


def test_psoups_allcombo_json_array_layout() -> None:
    pairs = load_psoups(PSOUPS_ALLCOMBO)
    assert per_user(pairs) == {"1": 1, "2": 1, "5": 1}
    assert pairs[0] == PreferencePair(
        "1", "Give me a tip for learning Python.",
        "Write a tiny program every day, like a calculator or a to-do list.",
        "Master the descriptor protocol and metaclasses before writing applications.",
    )


def test_psoups_user_options(tmp_path: Path) -> None:
    assert {p.user_id for p in load_psoups(PSOUPS, user="P1A")} == {"P1A"}
    rows = [{"combination": "P1A+P2B", "prompt": "p", "chosen": "c", "rejected": "r", "split": "test"}]
    path = write_jsonl(tmp_path / "combo.jsonl", rows)
    assert load_psoups(path, user_field="combination") == [PreferencePair("P1A+P2B", "p", "c", "r", "test")]
    assert "missing field 'combination'" in usage_error(load_psoups, PSOUPS, user_field="combination")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.pop("uid"), "missing field 'uid'"),
        (lambda r: r.update(uid=True), "field 'uid' must be a non-empty string or an integer"),
        (lambda r: r.pop("prompt"), "missing field 'prompt'"),
        (lambda r: r.pop("rejected"), "missing field 'rejected'"),
        (lambda r: r.update(chosen={"text": "x"}), "field 'chosen' must be a string, got dict"),
        (lambda r: r.update(split="dev"), "field 'split' must be \"train\" or \"test\""),
    ],
)
def test_psoups_malformed_rows(tmp_path: Path, mutate, expected: str) -> None:
    rows = fixture_rows(PSOUPS)
    mutate(rows[2])
    path = write_jsonl(tmp_path / "bad_psoups.jsonl", rows)
    message = usage_error(load_psoups, path)
    assert message.startswith(f"{path}:3: ") and expected in message


def test_psoups_bad_json_array_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"uid": 1, "prompt": "p", "chosen": "c", "rejected": "r"},\n  {"uid": 2,,}\n]\n')
    assert usage_error(load_psoups, path).startswith(f"{path}:3: not valid JSON")
    path.write_text('[{"uid": 1, "prompt": "p", "chosen": "c", "rejected": "r"}, 5]')
    assert usage_error(load_psoups, path).startswith(f"{path}: row 2: expected a JSON object, got int")


def test_psoups_quirky_rows_are_skipped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {"uid": 1, "prompt": "p", "chosen": "same", "rejected": "same"},
        {"uid": 1, "prompt": "p", "chosen": "", "rejected": "r"},
        {"uid": 2, "prompt": "p", "chosen": "c", "rejected": "r"},
    ]
    path = write_jsonl(tmp_path / "quirks.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="fedpersona.data.formats"):
        assert load_psoups(path) == [PreferencePair("2", "p", "c", "r")]
    [record] = caplog.records
    assert f"{path}: skipped 2:" in record.getMessage() and f"first at {path}:1" in record.getMessage()
    only_bad = write_jsonl(tmp_path / "only_bad.jsonl", rows[:2])
    message = usage_error(load_psoups, only_bad)
    assert message.startswith(f"{only_bad}: no usable preference pairs in this psoups file")


# ------------------------------------------------------------------------------------------------- PRISM


def test_prism_fixture_pairs_within_turns() -> None:
    pairs = load_prism(PRISM)
    assert len(pairs) == 7
    assert per_user(pairs) == {"user12": 5, "user31": 2}
    opening = "I want to start a vegetable garden on my balcony. Where do I begin?"
    first_reply = ("Check how many hours of sun your balcony gets, then start with easy containers: "
                   "herbs, lettuce and cherry tomatoes.")
    assert [p.rejected for p in pairs[:3]] == [
        "Start small: two or three pots, good potting mix, and plants that like your light.",
        "Balcony gardening is a rewarding hobby! First, consider the weight limits of your balcony.",
        "You can grow vegetables.",
    ]
    assert all(p.prompt == opening and p.chosen == first_reply for p in pairs[:3])
    assert pairs[3] == PreferencePair(
        "user12",
        f"User: {opening}\n\nAssistant: {first_reply}\n\n"
        "User: It gets about four hours of afternoon sun. What should I plant?",
        "Four hours suits leafy greens and herbs: lettuce, spinach, parsley, mint and chives.",
        "Tomatoes and peppers need full sun, so try them anyway and see.",
    )
    # equal top scores: the participant's if_chosen answer is the chosen one; the tied one is no pair
    homework = [p for p in pairs if p.user_id == "user31"]
    assert {p.chosen for p in homework} == {
        "There are good arguments on both sides; light reading at home can help without heavy assignments."}
    assert [p.rejected for p in homework] == ["Yes, homework should be banned.", "Homework is work done at home."]


def test_prism_history_turns_zero_keeps_only_the_message() -> None:
    pairs = load_prism(PRISM, history_turns=0)
    assert pairs[3].prompt == "It gets about four hours of afternoon sun. What should I plant?"
    assert "option history_turns must be" in usage_error(load_prism, PRISM, history_turns=-1)


def test_prism_unscored_turn_uses_if_chosen(tmp_path: Path) -> None:
    history = [
        {"turn": 0, "role": "user", "content": "hi"},
        {"turn": 0, "role": "model", "content": "hello!", "score": None, "if_chosen": True},
        {"turn": 0, "role": "model", "content": "what", "score": None, "if_chosen": False},
    ]
    path = write_jsonl(tmp_path / "unscored.jsonl", [{"user_id": 9, "conversation_history": history}])
    assert load_prism(path) == [PreferencePair("9", "hi", "hello!", "what")]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.pop("user_id"), "missing field 'user_id'"),
        (lambda c: c.pop("conversation_history"), "missing field 'conversation_history'"),
        (lambda c: c.update(conversation_history="hi"), "field 'conversation_history' must be a list"),
        (lambda c: c["conversation_history"][1].pop("role"), "conversation_history[1]: missing field 'role'"),
        (lambda c: c["conversation_history"][1].update(role="assistant"),
         "conversation_history[1]: field 'role' must be \"user\" or \"model\""),
        (lambda c: c["conversation_history"][2].update(score="80"),
         "conversation_history[2]: field 'score' must be a number or null"),
        (lambda c: c["conversation_history"][2].pop("if_chosen"), "conversation_history[2]: missing field 'if_chosen'"),
        (lambda c: c["conversation_history"][0].update(turn="0"),
         "conversation_history[0]: field 'turn' must be an integer"),
        (lambda c: c["conversation_history"].append(3), "expected a JSON object, got int"),
    ],
)
def test_prism_malformed_conversations(tmp_path: Path, mutate, expected: str) -> None:
    rows = fixture_rows(PRISM)
    mutate(rows[1])
    path = write_jsonl(tmp_path / "bad_prism.jsonl", rows)
    message = usage_error(load_prism, path)
    assert message.startswith(f"{path}:2: ") and expected in message


# ---------------------------------------------------------------------------------------------- HH-RLHF


def test_hh_rlhf_fixture_round_robin() -> None:
    pairs = load_hh_rlhf(HH, users=3, assign="round-robin")
    assert len(pairs) == 6
    assert per_user(pairs) == {"hh-0": 2, "hh-1": 2, "hh-2": 2}
    assert pairs[1] == PreferencePair(
        "hh-1", "Human: How do I make a cup of tea?",
        "Boil water, pour it over a tea bag, steep for three to five minutes, then remove the bag.",
        "Put tea in water.",
    )
    assert pairs[2].prompt == (
        "Human: Can you recommend a book?\n\nAssistant: Sure, what genres do you like?\n\nHuman: Science fiction.")
    assert pairs[2].chosen == "Try The Left Hand of Darkness by Ursula K. Le Guin."


def test_hh_rlhf_hash_users_do_not_depend_on_file_order(tmp_path: Path) -> None:
    pairs = load_hh_rlhf(HH, users=12)
    assert len(pairs) == 6 and all(p.user_id.startswith("hh-") and len(p.user_id) == 5 for p in pairs)
    reversed_file = write_jsonl(tmp_path / "reversed.jsonl", list(reversed(fixture_rows(HH))))
    by_prompt = sorted(pairs, key=lambda p: p.prompt)
    assert sorted(load_hh_rlhf(reversed_file, users=12), key=lambda p: p.prompt) == by_prompt
    assert {p.user_id for p in load_hh_rlhf(HH, users=1)} == {"hh-0"}


def test_hh_rlhf_errors_and_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = fixture_rows(HH)
    missing = write_jsonl(tmp_path / "missing.jsonl", [rows[0], {"chosen": rows[1]["chosen"]}])
    assert usage_error(load_hh_rlhf, missing).startswith(f"{missing}:2: missing field 'rejected'")
    no_turn = write_jsonl(tmp_path / "noturn.jsonl", [{"chosen": "Human: hi", "rejected": "Human: hey"}])
    assert "field 'chosen' has no" in usage_error(load_hh_rlhf, no_turn)
    wrong_type = write_jsonl(tmp_path / "type.jsonl", [{"chosen": rows[0]["chosen"], "rejected": 1}])
    assert usage_error(load_hh_rlhf, wrong_type).startswith(f"{wrong_type}:1: field 'rejected' must be a string")
    quirks = [
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        {"chosen": "\n\nHuman: a\n\nAssistant: same", "rejected": "\n\nHuman: a\n\nAssistant: same"},
        rows[3],
    ]
    path = write_jsonl(tmp_path / "quirks.jsonl", quirks)
    with caplog.at_level(logging.WARNING, logger="fedpersona.data.formats"):
        assert len(load_hh_rlhf(path)) == 1
    assert "skipped 2:" in caplog.records[0].getMessage()
    assert "option users must be" in usage_error(load_hh_rlhf, HH, users=0)
    assert "option assign must be one of hash, round-robin" in usage_error(load_hh_rlhf, HH, assign="random")


# ------------------------------------------------------------------------------- detection and registry


def test_registry_names() -> None:
    assert set(FORMATS) == {"pairs", "personalllm", "psoups", "prism", "hh-rlhf"}


@pytest.mark.parametrize(
    ("path", "fmt"),
    [(PAIRS, "pairs"), (PERSONALLLM, "personalllm"), (PSOUPS, "psoups"), (PSOUPS_ALLCOMBO, "psoups"),
     (PRISM, "prism"), (HH, "hh-rlhf")],
)
def test_detect_format(path: Path, fmt: str) -> None:
    assert detect_format(path) == fmt


def test_detect_format_failures(tmp_path: Path) -> None:
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    message = usage_error(detect_format, unknown)
    assert message.startswith(f"{unknown}:1: cannot tell the dataset format") and "answer, question" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert usage_error(detect_format, empty) == f"{empty}: the file has no rows"
    assert "not found" in usage_error(detect_format, tmp_path / "missing.jsonl")


def test_load_format_dispatch_and_options() -> None:
    assert load_format(PAIRS) == load_format(PAIRS, "pairs") and len(load_format(PAIRS)) == 3
    assert load_format(HH, "hh-rlhf", users=3, assign="round-robin") == load_hh_rlhf(HH, users=3, assign="round-robin")
    assert load_format(PSOUPS, None, users=None, alpha=None) == load_psoups(PSOUPS)
    assert len(load_format(PERSONALLLM, num_users=2, pairs_per_user=2)) == 4
    assert "--format csv: unknown data format" in usage_error(load_format, PAIRS, "csv")
    message = usage_error(load_format, PRISM, "prism", users=3)
    assert message == "option users does not apply to format 'prism' (it takes: history_turns)"


def test_parquet_needs_pyarrow_or_reads(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        assert "needs pyarrow" in usage_error(lambda: list(iter_rows(path)))
        return
    pq.write_table(pa.Table.from_pylist(fixture_rows(PSOUPS)), path)
    assert load_psoups(path) == load_psoups(PSOUPS)


def test_a_data_spec_names_its_format_or_is_a_pair_file(tmp_path):
    """``FORMAT:PATH`` (a registered format, ``auto``, options, a plug-in) or a path; an existing file wins."""
    from fedpersona.data.sources import parse_data_spec

    assert parse_data_spec("hh-rlhf:x.jsonl") == ("hh-rlhf", "x.jsonl")
    assert parse_data_spec("auto:x.jsonl") == ("auto", "x.jsonl")
    assert parse_data_spec("prism(history_turns=2):x.jsonl") == ("prism(history_turns=2)", "x.jsonl")
    assert parse_data_spec("my.pkg:Fmt:x.jsonl") == ("my.pkg:Fmt", "x.jsonl")
    assert parse_data_spec("nosuch:x.jsonl") == (None, "nosuch:x.jsonl")
    odd = tmp_path / "hh-rlhf:odd.jsonl"
    odd.write_text("{}\n")
    assert parse_data_spec(str(odd)) == (None, str(odd))
