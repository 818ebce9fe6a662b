"""What a preference data set looks like to a model before training: users, sizes, splits, how much users
disagree, and how the model encodes the pairs (it sits beside the encoding checks it uses, :mod:`fedpersona.model.signal`).

Backs ``fedpersona data inspect FILE [--format F]``. :func:`inspect_pairs` returns plain JSON-ready
numbers; :func:`format_inspection` renders them as a two-column text table.

Disagreement: a *comparison* is (prompt, {response a, response b}) regardless of which side was chosen.
Among comparisons labelled by two or more users, the disagreement rate is the fraction where the users do
not all choose the same response. It measures real preference heterogeneity (the regime that separates
global from personalized models); when no comparison is shared it cannot be measured and a note says so.

Encoding (``model``, by default the embedded one that ``simulate`` uses, at ``max_length`` 96): on a
sample of the pairs, how many become the same token ids (no preference signal: cut by max-length, or text
the tokenizer does not tell apart) and what share of the tokens the model cannot read (``<unk>``); see
:mod:`fedpersona.model.signal` (imported only then: this module itself needs no tokenizer).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from fedpersona.data.schema import PreferencePair, assign_split

NO_OVERLAP_NOTE = (
    "no comparison (prompt, response pair) was labelled by two or more users, so disagreement between "
    "users cannot be measured from this data"
)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of ascending values, linearly interpolated (numpy's default rule)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    position = (len(sorted_values) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low))


DEFAULT_MODEL = "embedded"  # what `simulate` trains by default (RunConfig.model)
DEFAULT_MAX_LENGTH = 96  # RunConfig.max_length's default (a test keeps them equal)
MAX_LENGTH_SETTING = "max-length {n} (simulate --set max-length={n})"  # how a warning names the setting


def inspect_pairs(
    pairs: Iterable[PreferencePair], *, test_fraction: float = 0.2, min_pairs: int = 4,
    model: str | None = DEFAULT_MODEL, max_length: int = DEFAULT_MAX_LENGTH, chat_template: bool = True,
) -> dict[str, Any]:
    """Summary numbers of a pair collection.

    Keys: ``users``, ``pairs``, ``prompts`` (distinct), ``pairs_per_user`` (``min``, ``p10``,
    ``median``, ``p90``, ``max``; None values when empty), ``train`` / ``test`` (each pair's own split, else
    the stable hash split that training uses with ``test_fraction``), ``split_given`` (pairs with their own
    split), ``users_usable`` (users that training keeps: at least ``min_pairs`` pairs with a train and a
    test pair), ``test_fraction``, ``min_pairs``, ``shared_comparisons`` (labelled by >= 2 users),
    ``disagreeing_comparisons``, ``disagreement`` (their ratio, None without overlap) and ``note``;
    with a ``model``, ``encoding`` (``SignalReport.to_json()`` of a sample of the pairs encoded by that
    model's tokenizer at ``max_length``) and ``warnings`` (its one-line warnings), else neither key.
    """
    reservoir = None
    if model is not None:
        from fedpersona.model.signal import Reservoir

        reservoir = Reservoir()
    per_user: Counter[str] = Counter()
    user_splits: dict[str, set[str]] = defaultdict(set)
    prompts: set[str] = set()
    splits: Counter[str] = Counter()
    given = 0
    votes: dict[tuple[str, frozenset[str]], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for pair in pairs:
        per_user[pair.user_id] += 1
        prompts.add(pair.prompt)
        split = assign_split(pair, test_fraction)
        splits[split] += 1
        user_splits[pair.user_id].add(split)
        given += pair.split is not None
        votes[(pair.prompt, frozenset((pair.chosen, pair.rejected)))][pair.user_id].add(pair.chosen)
        if reservoir is not None:
            reservoir.add(pair)

    counts = sorted(per_user.values())
    if counts:
        sizes: dict[str, float | None] = {
            "min": counts[0], "p10": percentile(counts, 10), "median": percentile(counts, 50),
            "p90": percentile(counts, 90), "max": counts[-1],
        }
    else:
        sizes = dict.fromkeys(("min", "p10", "median", "p90", "max"))
    shared = [by_user for by_user in votes.values() if len(by_user) >= 2]
    disagreeing = sum(1 for by_user in shared if len(set().union(*by_user.values())) > 1)
    usable = sum(1 for user, n in per_user.items() if n >= min_pairs and len(user_splits[user]) == 2)
    info: dict[str, Any] = {
        "users": len(per_user),
        "pairs": sum(counts),
        "prompts": len(prompts),
        "pairs_per_user": sizes,
        "train": splits["train"],
        "test": splits["test"],
        "split_given": given,
        "users_usable": usable,
        "test_fraction": test_fraction,
        "min_pairs": min_pairs,
        "shared_comparisons": len(shared),
        "disagreeing_comparisons": disagreeing,
        "disagreement": disagreeing / len(shared) if shared else None,
        "note": None if shared else NO_OVERLAP_NOTE,
    }
    if reservoir is not None and model is not None:
        from fedpersona.model.signal import check_pairs, load_prompt_format

        report = check_pairs(load_prompt_format(model, chat_template), reservoir.pairs, max_length, model=model,
                             total=reservoir.total)
        info["encoding"] = report.to_json()
        info["warnings"] = report.warnings(MAX_LENGTH_SETTING)
    return info


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def format_inspection(info: dict[str, Any]) -> str:
    """A readable two-column table of :func:`inspect_pairs` output (ends without a newline)."""
    sizes = info["pairs_per_user"]
    if info["disagreement"] is None:
        disagreement = "n/a"
    else:
        disagreement = (f"{info['disagreement']:.3f} ({info['disagreeing_comparisons']} of "
                        f"{info['shared_comparisons']} shared comparisons)")
    rows = [
        ("users", str(info["users"])),
        ("pairs", str(info["pairs"])),
        ("distinct prompts", str(info["prompts"])),
        ("pairs per user", "  ".join(f"{k} {_num(sizes[k])}" for k in ("min", "p10", "median", "p90", "max"))),
        ("train / test pairs", f"{info['train']} / {info['test']}  (split given on {info['split_given']}, "
                               f"hash split at test fraction {info['test_fraction']:g} for the rest)"),
        ("usable users", f"{info['users_usable']}  (>= {info['min_pairs']} pairs with a train and a test pair)"),
        ("shared comparisons", f"{info['shared_comparisons']}  (same prompt and response pair, >= 2 users)"),
        ("user disagreement", disagreement),
        *_encoding_rows(info.get("encoding")),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    if info.get("note"):
        lines.append(f"note: {info['note']}")
    lines += [f"warning: {line}" for line in info.get("warnings") or ()]
    return "\n".join(lines)


def _encoding_rows(encoding: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The table rows of ``inspect_pairs``'s ``encoding`` (none without it)."""
    if not encoding:
        return []
    checked = f"{encoding['pairs_checked']} pairs checked" + (
        f" (a sample of {encoding['pairs_total']})" if encoding["pairs_checked"] < encoding["pairs_total"] else "")
    same = encoding["identical_after_truncation"] + encoding["identical_ids"]
    share = encoding["unknown_share"]
    return [
        ("no-signal pairs", f"{same} of {checked}: chosen and rejected encode the same with model "
                            f"{encoding['model']} ({encoding['identical_after_truncation']} cut at max-length "
                            f"{encoding['max_length']}, {encoding['identical_ids']} same ids at any length)"),
        ("unknown tokens", "n/a (the tokenizer has no unknown token)" if share is None else
                           f"{share:.1%} of {encoding['tokens']} tokens (<unk> to model {encoding['model']})"),
    ]
