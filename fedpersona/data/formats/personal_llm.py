"""PersonalLLM prompts with reward-model-scored responses, and simulated users over them
(Zollo et al., "PersonalLLM: Tailoring LLMs to Individual Preferences", arXiv 2409.20296; the
``namkoong-lab/PersonalLLM`` release).

Each row is one prompt with 8 responses, every response scored by 10 open reward models. Fields read:

* ``prompt`` (string);
* ``response_1`` .. ``response_N`` (string; a null response is unusable): N = the number of
  ``response_<i>`` keys of the first row, at least 2;
* the scores, in either column layout (chosen from the first row):

  - ``response_<i>_<rm>`` (the release's layout, e.g. ``response_3_gemma_7b``), or
  - ``<rm>_<i>`` (e.g. ``gemma_7b_3``), used only when the first row has no column of the first layout.

  The reward models are the suffixes (or prefixes) whose first-row value is a number or null; columns with
  string values (``response_<i>_model``, ``subset``, ``prompt_id``) are metadata and ignored. Every later
  row must have every score column; a null score makes that response unusable.

Simulated users (the paper's construction): each reward model's scores are z-normalised over all
non-null scores of the file (population standard deviation; a constant model gets 0), and user ``u``
draws weights ``w_u ~ Dirichlet(alpha, ..., alpha)`` over the reward models. The user's reward of a
response is ``w_u . z(response)``. For each of ``pairs_per_user`` pairs the user takes a prompt
(distinct prompts while there are enough, then with replacement) and two distinct usable responses of
it, chosen = the higher user reward (exact ties are skipped). Prompts come from the first
``prompt_pool`` prompts with at least two usable responses (0 = all): a small pool makes users
compare the same prompts, so their disagreement can be measured. User ``u``'s weights and pairs are a
function of ``(seed, u)`` only (``numpy.random.default_rng([seed, u])``): adding users never changes
existing ones. Small alpha gives users dominated by one reward model (strong disagreement), large alpha
users near the average (low disagreement). User ids: ``pllm-0000``, ``pllm-0001``, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpersona.data.formats.rows import (
    Row,
    SkipLog,
    is_number,
    iter_rows,
    no_pairs_error,
    require_field,
    require_object,
    require_str,
    usable_text,
)
from fedpersona.data.schema import PreferencePair
from fedpersona.errors import UsageError

NAME = "personalllm"
HINT = "PersonalLLM rows need prompt, response_1..response_N and score columns response_<i>_<reward model>"
RESPONSE_KEY = re.compile(r"^response_(\d+)$")
SCORE_KEY = re.compile(r"^response_(\d+)_(.+)$")
ALT_SCORE_KEY = re.compile(r"^(.+)_(\d+)$")


@dataclass(frozen=True)
class Layout:
    """The response indices and the score column of (response index, reward model), from the first row."""

    indices: tuple[int, ...]
    reward_models: tuple[str, ...]
    release_layout: bool

    def column(self, index: int, reward_model: str) -> str:
        return f"response_{index}_{reward_model}" if self.release_layout else f"{reward_model}_{index}"


@dataclass(frozen=True)
class ScoredPrompt:
    """One prompt, its responses and their raw scores (rows: responses; columns: reward models)."""

    where: str
    prompt: str
    responses: tuple[str | None, ...]
    scores: np.ndarray  # float, NaN = missing


def detect_layout(obj: dict[str, Any], where: str) -> Layout:
    """The column layout of the first row (see the module docstring)."""
    indices = sorted(int(m.group(1)) for key in obj if (m := RESPONSE_KEY.match(key)))
    if len(indices) < 2:
        raise UsageError(f"{where}: need at least two response columns response_1, response_2, ... ({HINT})")

    def numeric(value: object) -> bool:
        return value is None or is_number(value)

    release = {m.group(2) for key, v in obj.items() if (m := SCORE_KEY.match(key)) and m.group(2) != "model"
               and int(m.group(1)) == indices[0] and numeric(v)}
    if release:
        return Layout(tuple(indices), tuple(sorted(release)), True)
    alternative = {m.group(1) for key, v in obj.items() if (m := ALT_SCORE_KEY.match(key))
                   and m.group(1) != "response" and int(m.group(2)) == indices[0] and numeric(v)}
    if alternative:
        return Layout(tuple(indices), tuple(sorted(alternative)), False)
    raise UsageError(
        f"{where}: no reward-model score columns (expected response_{indices[0]}_<reward model> with numbers; {HINT})"
    )


def _scored_prompt(row: Row, layout: Layout) -> ScoredPrompt:
    obj = require_object(row, HINT)
    prompt = require_str(obj, "prompt", row.where, HINT)
    responses: list[str | None] = []
    scores = np.full((len(layout.indices), len(layout.reward_models)), np.nan)
    for i, index in enumerate(layout.indices):
        text = require_field(obj, f"response_{index}", row.where, HINT)
        if text is not None and not isinstance(text, str):
            raise UsageError(f"{row.where}: field 'response_{index}' must be a string, got {type(text).__name__}")
        responses.append(text)
        for j, model in enumerate(layout.reward_models):
            key = layout.column(index, model)
            value = require_field(obj, key, row.where, HINT)
            if value is not None:
                if not is_number(value):
                    raise UsageError(f"{row.where}: field '{key}' must be a number or null, got {value!r}")
                scores[i, j] = float(value)
    return ScoredPrompt(row.where, prompt, tuple(responses), scores)


def read_personal_llm(path: str | Path) -> tuple[tuple[str, ...], list[ScoredPrompt]]:
    """(reward model names, every row's prompt/responses/scores) of a PersonalLLM file."""
    layout: Layout | None = None
    prompts: list[ScoredPrompt] = []
    for row in iter_rows(path):
        if layout is None:
            layout = detect_layout(require_object(row, HINT), row.where)
        prompts.append(_scored_prompt(row, layout))
    if layout is None:
        raise UsageError(f"{path}: the file has no rows")
    return layout.reward_models, prompts


def zscores(prompts: list[ScoredPrompt]) -> list[np.ndarray]:
    """Per-prompt score matrices z-normalised per reward model over all non-null scores of the file.

    Population standard deviation; a reward model with constant (or no) scores maps to 0; NaN stays NaN.
    """
    stacked = np.concatenate([p.scores for p in prompts], axis=0)
    mask = ~np.isnan(stacked)
    count = mask.sum(axis=0)
    total = np.where(mask, stacked, 0.0).sum(axis=0)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    var = (np.where(mask, stacked - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count, 1)
    std = np.where(var > 0, np.sqrt(var), np.inf)
    return [(p.scores - mean) / std for p in prompts]


def _check_options(num_users: int, alpha: float, pairs_per_user: int, seed: int, prompt_pool: int) -> None:
    for name, value, low in (("num_users", num_users, 1), ("pairs_per_user", pairs_per_user, 1),
                             ("seed", seed, 0), ("prompt_pool", prompt_pool, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"option {name} must be an integer >= {low}, got {value!r}")
    if not is_number(alpha) or alpha <= 0:
        raise UsageError(f"option alpha must be a number > 0, got {alpha!r}")


def simulate_users(
    prompts: list[ScoredPrompt],
    *,
    num_users: int,
    alpha: float,
    pairs_per_user: int,
    seed: int,
    prompt_pool: int = 0,
    skipped: SkipLog | None = None,
) -> list[PreferencePair]:
    """Pairs of ``num_users`` Dirichlet-weighted simulated users (the rule in the module docstring)."""
    skipped = skipped if skipped is not None else SkipLog("PersonalLLM")
    normalised = zscores(prompts)
    pool: list[tuple[ScoredPrompt, np.ndarray, list[int]]] = []
    for prompt, z in zip(prompts, normalised):
        seen: set[str] = set()
        usable: list[int] = []
        for i, text in enumerate(prompt.responses):
            if usable_text(text) and not np.isnan(z[i]).any() and text not in seen:
                seen.add(text)  # type: ignore[arg-type]
                usable.append(i)
        if len(usable) >= 2 and usable_text(prompt.prompt):
            pool.append((prompt, z, usable))
        else:
            skipped.skip("prompts with fewer than two usable responses", prompt.where)
    if prompt_pool:
        pool = pool[:prompt_pool]
    pairs: list[PreferencePair] = []
    if not pool:
        return pairs
    width = max(4, len(str(num_users - 1)))
    num_models = normalised[0].shape[1]
    for user in range(num_users):
        rng = np.random.default_rng([seed, user])
        weights = rng.dirichlet(np.full(num_models, float(alpha)))
        replace = pairs_per_user > len(pool)
        picks = rng.choice(len(pool), size=pairs_per_user, replace=replace)
        user_id = f"pllm-{user:0{width}d}"
        for pick in picks:
            prompt, z, usable = pool[int(pick)]
            a, b = (usable[int(k)] for k in rng.choice(len(usable), size=2, replace=False))
            reward_a, reward_b = float(z[a] @ weights), float(z[b] @ weights)
            if reward_a == reward_b:
                skipped.skip("tied comparisons", user_id)
                continue
            win, lose = (a, b) if reward_a > reward_b else (b, a)
            chosen, rejected = str(prompt.responses[win]), str(prompt.responses[lose])  # usable: never None
            pairs.append(PreferencePair(user_id, prompt.prompt, chosen, rejected))
    return pairs


def load_personal_llm(
    path: str | Path,
    *,
    num_users: int = 100,
    alpha: float = 0.05,
    pairs_per_user: int = 40,
    seed: int = 0,
    prompt_pool: int = 0,
) -> list[PreferencePair]:
    """Simulated users' pairs over a PersonalLLM file (JSONL, JSON array, or Parquet with pyarrow)."""
    _check_options(num_users, alpha, pairs_per_user, seed, prompt_pool)
    _, prompts = read_personal_llm(path)
    skipped = SkipLog(str(path))
    pairs = simulate_users(prompts, num_users=num_users, alpha=alpha, pairs_per_user=pairs_per_user,
                           seed=seed, prompt_pool=prompt_pool, skipped=skipped)
    skipped.report()
    if not pairs:
        raise no_pairs_error(path, NAME, skipped)
    return pairs
