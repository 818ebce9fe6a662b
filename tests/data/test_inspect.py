"""Data-set inspection: exact numbers on a hand-made set with one disagreement, and the text table;
how the default model encodes the pairs (tests/model/test_signal.py tests the counting itself)."""

from __future__ import annotations

import numpy as np
import pytest

from fedpersona.model.inspect import NO_OVERLAP_NOTE, format_inspection, inspect_pairs, percentile
from fedpersona.data.schema import PreferencePair, assign_split

P = PreferencePair


def hand_made() -> list[PreferencePair]:
    """4 users with 1, 2, 3 and 4 pairs; two comparisons shared, one of them disputed."""
    return [
        P("u1", "P", "a", "b", "test"),   # u1 says a > b ...
        P("u2", "P", "b", "a", "train"),  # ... u2 says b > a: a disagreement
        P("u2", "Q", "c", "d", "test"),   # u2, u3, u4 agree on c > d
        P("u3", "Q", "c", "d", "train"),
        P("u3", "S", "g", "h", "train"),
        P("u3", "T", "i", "j", "test"),
        P("u4", "Q", "c", "d", "train"),
        P("u4", "R", "e", "f", "train"),
        P("u4", "P", "a", "c", "train"),  # same prompt, other response pair: a different comparison
        P("u4", "U", "k", "l", "train"),
    ]


def test_inspect_exact_numbers() -> None:
    info = inspect_pairs(hand_made(), min_pairs=2, model=None)
    assert info == {
        "users": 4,
        "pairs": 10,
        "prompts": 6,
        "pairs_per_user": {"min": 1, "p10": pytest.approx(1.3), "median": 2.5, "p90": pytest.approx(3.7), "max": 4},
        "train": 7,
        "test": 3,
        "split_given": 10,
        "users_usable": 2,  # u2 and u3: >= 2 pairs with a train and a test pair
        "test_fraction": 0.2,
        "min_pairs": 2,
        "shared_comparisons": 2,
        "disagreeing_comparisons": 1,
        "disagreement": 0.5,
        "note": None,
    }


def test_inspect_uses_the_training_split_rule_for_pairs_without_split() -> None:
    pairs = [P(f"u{i % 3}", f"prompt {i}", f"c{i}", f"r{i}") for i in range(50)]
    info = inspect_pairs(pairs, test_fraction=0.3, model=None)
    expected_test = sum(assign_split(p, 0.3) == "test" for p in pairs)
    assert (info["train"], info["test"], info["split_given"]) == (50 - expected_test, expected_test, 0)


def test_inspect_without_overlap_has_a_note() -> None:
    info = inspect_pairs([P("u1", "p", "a", "b"), P("u2", "q", "a", "b"), P("u2", "p", "a", "c")], model=None)
    assert (info["shared_comparisons"], info["disagreement"], info["note"]) == (0, None, NO_OVERLAP_NOTE)
    text = format_inspection(info)
    assert "user disagreement   n/a" in text and text.endswith(f"note: {NO_OVERLAP_NOTE}")


def test_inspect_empty() -> None:
    info = inspect_pairs([], model=None)
    assert (info["users"], info["pairs"], info["pairs_per_user"]["median"]) == (0, 0, None)
    assert "min -  p10 -  median -  p90 -  max -" in format_inspection(info)


def test_format_inspection_table() -> None:
    text = format_inspection(inspect_pairs(hand_made(), min_pairs=2, model=None))
    assert text.splitlines() == [
        "users               4",
        "pairs               10",
        "distinct prompts    6",
        "pairs per user      min 1  p10 1.3  median 2.5  p90 3.7  max 4",
        "train / test pairs  7 / 3  (split given on 10, hash split at test fraction 0.2 for the rest)",
        "usable users        2  (>= 2 pairs with a train and a test pair)",
        "shared comparisons  2  (same prompt and response pair, >= 2 users)",
        "user disagreement   0.500 (1 of 2 shared comparisons)",
    ]


@pytest.mark.parametrize("values", [[5], [1, 2], [3, 1, 4, 1, 5, 9, 2, 6], list(range(37))])
def test_percentile_matches_numpy(values: list[int]) -> None:
    ordered = sorted(values)
    for q in (0, 10, 50, 90, 100):
        assert percentile(ordered, q) == pytest.approx(float(np.percentile(values, q)))


def test_inspect_empty_with_encoding() -> None:
    info = inspect_pairs([])
    assert (info["encoding"]["pairs_checked"], info["encoding"]["unknown_share"], info["warnings"]) == (0, None, [])
    assert "no-signal pairs     0 of 0 pairs checked" in format_inspection(info)


def test_inspect_encoding_rows_and_warnings() -> None:
    """By default the pairs are encoded as `simulate` would (embedded model, max-length 96): two table rows,
    then one warning line per problem; --json carries the same numbers."""
    from fedpersona.model.signal import SAMPLE_PAIRS

    words = " ".join(["you can start with a short habit"] * 16)
    pairs = [P(f"u{i % 3}", f"how should i start {i} ?", words + " yoga", words + " chess")
             for i in range(SAMPLE_PAIRS + 5)]
    pairs += [P("u0", "how should i start ?", "i like 😀", "i like 😢")]
    info = inspect_pairs(pairs)
    encoding = info["encoding"]
    assert (encoding["pairs_total"], encoding["pairs_checked"]) == (SAMPLE_PAIRS + 6, SAMPLE_PAIRS)
    assert encoding["identical_after_truncation"] + encoding["identical_ids"] == SAMPLE_PAIRS  # no pair has signal
    lines = format_inspection(info).splitlines()
    assert lines[8].startswith("no-signal pairs     ") and f"(a sample of {SAMPLE_PAIRS + 6})" in lines[8]
    assert lines[9].startswith("unknown tokens      ") and "<unk> to model embedded" in lines[9]
    warned = [line for line in lines if line.startswith("warning: ")]
    assert warned == [f"warning: {w}" for w in info["warnings"]] and 1 <= len(warned) <= 2
    assert "max-length" in warned[0] and "(simulate --set max-length=" in warned[0]
