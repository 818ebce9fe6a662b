"""The ``generated:styles`` scenario: users with opposite style preferences over the run model's own text.

Construction of P-SOUPS (Jang et al. 2023, "Personalized Soups", arXiv 2310.11564): the base model writes
one answer per (everyday prompt, style pole) of ``fedpersona.data.style_prompts``, the pole's instruction
in the system turn with a one-shot demonstration; a persona picks one pole per dimension; for each of its
prompts and each dimension a user's pair is (plain prompt, chosen = its pole's answer, rejected = the
opposite pole's answer). Held-out prompts are test pairs for every user.

Two caches under ``cache_root()/data`` (written once each, atomically, under a file lock):

* ``styles-v1-<model key>-seed<S>.jsonl``: the generated answers (the expensive part: minutes to tens of
  minutes on a CPU for a 135M model), one meta line then one line per (prompt, pole);
* ``styles-v1-<model key>-seed<S>-users<N>.jsonl``: the pair file for ``N`` users, built from the first
  in milliseconds. The simulation driver makes it before Ray starts (``launcher.prepare_config``); the
  workers read it as an ordinary pair file.

Generation is deterministic given the seed on one machine type (sampling is seeded per batch, batches are
fixed); a different BLAS or thread count can change a sampled token, which is why it is cached once.

The same construction serves every generated scenario (``GENERATED``: ``styles``, and ``stances``, whose
poles differ in content, ``fedpersona.data.stance_prompts``): a scenario is a data module with the same
names (``POLES``, ``PROMPTS``, ``DEMO_PROMPT``, ``persona_of``, ...), its caches named after it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedpersona.alignment.judges import answer_features, pole_feature_means
from fedpersona.data import stance_prompts
from fedpersona.data import style_prompts as data
from fedpersona.data.schema import PreferencePair, validate_row
from fedpersona.errors import UsageError
from fedpersona.io import atomic_write_text
from fedpersona.model.embedded import cache_root
from fedpersona.model.prompting import format_prompt

STYLES_VERSION = 1  # in every cache name: bump it when the construction changes in a way the digest misses
__all__ = ["GENERATED", "Scenario", "answer_features", "ensure_generated_pairs", "ensure_style_pairs"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model")

Report = Callable[[str], None]


def _stderr(line: str) -> None:
    # generation runs for minutes, once: the person waiting must see it move even where logging is not set up
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GenerationSettings:
    """How the answers are sampled. Part of the cache's content digest: a cache sampled otherwise is refused."""

    max_new_tokens: int = 128
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    top_k: int = 50
    no_repeat_ngram_size: int = 6  # a 135M model loops on long outputs; this cuts exact repeats short
    batch_size: int = 20  # fixed: the batch composition (and so the padding) is part of determinism


GENERATION = GenerationSettings()


@dataclass(frozen=True)
class Scenario:
    """A generated scenario: its name (``generated:<name>``), cache version and data module (``POLES``,
    ``PROMPTS``, ``DEMO_PROMPT``, ``TEST_EVERY``, ``is_test_prompt``, ``persona_of``, ``OPPOSITE``)."""

    name: str
    version: int
    data: Any


STYLES = Scenario("styles", STYLES_VERSION, data)
STANCES = Scenario("stances", 1, stance_prompts)
GENERATED: dict[str, Scenario] = {s.name: s for s in (STYLES, STANCES)}


# ---- rendering and cleaning -------------------------------------------------------------------------
def request_text(tokenizer: Any, pole: data.Pole, prompt: str, demo_prompt: str = data.DEMO_PROMPT) -> str:
    """The text the model continues for ``prompt`` under ``pole``.

    With a chat template: system turn = the pole's instruction, then the demo question and the pole's demo
    answer as a first exchange, then the prompt, rendered with ``add_generation_prompt=True`` (a system
    turn also replaces a default one such as SmolLM2's). Without one (the embedded toy model): the plain
    format with the instruction after the prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": pole.instruction},
                    {"role": "user", "content": demo_prompt},
                    {"role": "assistant", "content": pole.demo},
                    {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return format_prompt(f"{prompt} {pole.instruction}")


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
_LIST_NUMBER = re.compile(r"(?:^|\s)\d+\.$")
_EMPTY_ITEM = re.compile(r"^\s*(?:[-*\u2022]|#+|\d+[.)])\s*$")  # a bullet, number or heading with no text


def clean_answer(text: str, finished: bool) -> str:
    """Strip the answer; drop lines that are only a list marker or heading; when generation stopped at the
    token cap (not ``finished``), cut back to the last full sentence or line. Text with no such boundary is
    kept whole (a cut answer beats none)."""
    lines = [line.rstrip() for line in text.strip().splitlines() if not _EMPTY_ITEM.match(line)]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if finished or not text:
        return text
    # a period right after a bare number ends a list label ("9."), not a sentence
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if not _LIST_NUMBER.search(text, 0, m.start() + 1)]
    cut = max(ends[-1] if ends else 0, text.rfind("\n"))
    return text[:cut].strip() if cut > 0 else text


# ---- generation --------------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, *, seed: int, settings: GenerationSettings | None = None,
                     report: Report = _stderr, scenario: Scenario = STYLES) -> list[dict[str, Any]]:
    """One answer per (prompt, pole): a list of ``{"prompt_index", "prompt", "split", "dimension", "pole",
    "answer", "finished"}`` in (pole, prompt) order, 6 x ``len(PROMPTS)`` rows.

    ``model`` and ``tokenizer`` as ``fedpersona.model.loading.load_base`` gives them (frozen, eval mode).
    Rows are left-padded by hand (the shared tokenizer is not mutated) and sampled in fixed batches of
    ``settings.batch_size`` (default: the module's ``GENERATION``), each seeded from ``seed`` and its batch
    number; the global RNG is restored. ``scenario``: whose poles and prompts (default ``STYLES``)."""
    settings = settings or GENERATION
    sd = scenario.data
    jobs = [(pole, i, prompt) for pole in sd.POLES.values() for i, prompt in enumerate(sd.PROMPTS)]
    # batches never mix poles: a pole's answers have similar lengths, so a batch of concise answers stops early
    size, per_pole = settings.batch_size, len(sd.PROMPTS)
    batches = [jobs[first + k:first + min(k + size, per_pole)]
               for first in range(0, len(jobs), per_pole) for k in range(0, per_pole, size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    sampling = ({"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                 "top_k": settings.top_k} if settings.temperature > 0 else {"do_sample": False})
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for number, batch in enumerate(batches):
        encoded = [tokenizer(request_text(tokenizer, pole, prompt, sd.DEMO_PROMPT), add_special_tokens=False)["input_ids"]
                   for pole, _, prompt in batch]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + number)
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                 no_repeat_ngram_size=settings.no_repeat_ngram_size, pad_token_id=pad,
                                 eos_token_id=eos, **sampling)
        for (pole, index, prompt), new in zip(batch, out[:, width:].tolist(), strict=True):
            finished = eos is not None and eos in new
            if finished:
                new = new[: new.index(eos)]
            answer = clean_answer(tokenizer.decode(new, skip_special_tokens=True), finished)
            rows.append({"prompt_index": index, "prompt": prompt,
                         "split": "test" if sd.is_test_prompt(index) else "train",
                         "dimension": pole.dimension, "pole": pole.name, "answer": answer, "finished": finished})
        report(f"  {scenario.name}: batch {number + 1}/{len(batches)} done ({time.perf_counter() - start:.0f} s)")
    return rows


# ---- how different the poles are ---------------------------------------------------------------------
def style_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per pole: mean ``words``, ``list_share``, ``informal`` per 100 words, ``cut_share`` (answers that hit
    the token cap); per dimension: the gap between its poles on its own feature and whether it separates."""
    poles: dict[str, Any] = {}
    for name in data.POLES:
        feats = [answer_features(r["answer"]) for r in rows if r["pole"] == name]
        finished = [bool(r.get("finished", True)) for r in rows if r["pole"] == name]
        if not feats:
            continue
        poles[name] = {"answers": len(feats),
                       "words": round(statistics.fmean(f["words"] for f in feats), 1),
                       "list_share": round(statistics.fmean(f["is_list"] for f in feats), 2),
                       "informal": round(statistics.fmean(f["informal"] for f in feats), 2),
                       "cut_share": round(1 - statistics.fmean(finished), 2)}
    checks = {  # dimension: (feature, the pole that should score higher, the other, least gap that counts)
        "length": ("words", "detailed", "concise", None),
        "tone": ("informal", "casual", "formal", None),
        "format": ("list_share", "list", "prose", 0.3),
    }
    dims: dict[str, Any] = {}
    for dim, (feature, high, low, least) in checks.items():
        if high in poles and low in poles:
            a, b = poles[high][feature], poles[low][feature]
            ok = (a - b >= least) if least is not None else a >= 1.5 * b and a > b
            dims[dim] = {"feature": feature, high: a, low: b, "separated": bool(ok)}
    return {"poles": poles, "dimensions": dims}


def format_stats(stats: dict[str, Any]) -> str:
    """A small table of ``style_stats``, one pole a line, then one line per dimension."""
    lines = [f"{'pole':<9} {'answers':>7} {'words':>6} {'list':>5} {'informal/100w':>13} {'cut':>5}"]
    for name, s in stats["poles"].items():
        lines.append(f"{name:<9} {s['answers']:>7} {s['words']:>6.1f} {s['list_share']:>5.2f} "
                     f"{s['informal']:>13.2f} {s['cut_share']:>5.2f}")
    for dim, d in stats["dimensions"].items():
        a, b = [k for k in d if k not in ("feature", "separated")]
        verdict = "separated" if d["separated"] else "NOT separated"
        lines.append(f"{dim}: {d['feature']} {a} {d[a]} vs {b} {d[b]} -> {verdict}")
    return "\n".join(lines)


# ---- caches ------------------------------------------------------------------------------------------
def model_key(model: str) -> str:
    """12 hex of a digest of what decides the model's text: the resolved folder's ``config.json`` bytes and
    the names and sizes of its weight and tokenizer files (an HF id that is not a local folder: the id).
    Resolving builds or converts the model once if needed (``resolve_model_path``)."""
    from fedpersona.model.loading import resolve_model_path

    path = Path(resolve_model_path(model))
    digest = hashlib.sha256()
    if (path / "config.json").is_file():
        digest.update((path / "config.json").read_bytes())
        for file in sorted(path.iterdir()):
            if file.is_file() and (file.suffix in _WEIGHT_SUFFIXES or file.name in _TOKENIZER_FILES):
                digest.update(f"\x00{file.name}\x00{file.stat().st_size}".encode())
    else:
        digest.update(str(path).encode())
    return digest.hexdigest()[:12]


def content_digest(settings: GenerationSettings | None = None, scenario: Scenario = STYLES) -> str:
    """Digest of the scenario's prompts, poles, demo and generation settings (default ``GENERATION``): a
    cache written from other ones is stale."""
    settings, sd = settings or GENERATION, scenario.data
    payload = json.dumps({"prompts": sd.PROMPTS, "demo": sd.DEMO_PROMPT, "test_every": sd.TEST_EVERY,
                          "poles": [asdict(p) for p in sd.POLES.values()], "generation": asdict(settings)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def answers_path(model: str, seed: int, scenario: Scenario = STYLES) -> Path:
    """Where the generated answers of ``model`` and ``seed`` are cached."""
    return cache_root() / "data" / f"{scenario.name}-v{scenario.version}-{model_key(model)}-seed{seed}.jsonl"


def _locked_once(path: Path, build: Callable[[], str]) -> None:
    """Write ``build()``'s text to ``path`` unless it exists: one builder across processes (an flock on a
    sibling lock file; the others wait, then find it written), and atomically (temp file + rename)."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            atomic_write_text(path, build())
            path.chmod(0o644)  # mkstemp's 0600 would hide it from other users of a shared cache root


def _check_meta(meta: object, path: Path, scenario: Scenario = STYLES) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("kind") != "meta":
        raise UsageError(f"{path}: not a {scenario.name} answers cache (no meta line); delete it to regenerate")
    if meta.get("content_digest") != content_digest(scenario=scenario):
        raise UsageError(f"{path}: written from other prompts, styles or generation settings than this version; "
                         "delete it to regenerate")
    return meta


def read_answers(path: Path, scenario: Scenario = STYLES) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(meta, rows)`` of an answers cache (rows as ``generate_answers`` returns them). Raises UsageError
    when the file was written from other prompts, poles or settings than this code's (delete it to
    regenerate)."""
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    meta = _check_meta(lines[0] if lines else None, path, scenario)
    return meta, lines[1:]


def ensure_style_answers(model: str, seed: int, *, report: Report = _stderr) -> Path:
    """The answers cache of ``model`` and ``seed``, generating it once (prints progress and the pole stats).

    Loads the base through ``load_base`` semantics but without keeping it in this process's model cache
    (the simulation driver does not need a 135M model resident while Ray workers load their own)."""
    return _ensure_answers(STYLES, answers_path(model, seed), model, seed, report)


def _ensure_answers(scenario: Scenario, path: Path, model: str, seed: int, report: Report) -> Path:
    sd = scenario.data

    def build() -> str:
        from fedpersona.model.loading import load_base

        report(f"{scenario.name}: generating {len(sd.POLES) * len(sd.PROMPTS)} answers with {model} "
               f"(once; cached in {path})")
        start = time.perf_counter()
        base, tokenizer = load_base.__wrapped__(model)  # functools.cache's original: not kept resident
        rows = generate_answers(base, tokenizer, seed=seed, report=report, scenario=scenario)
        stats = (format_stats(style_stats(rows)) if scenario is STYLES else
                 "\n".join(f"{pole:<11} {v['measure']:7.2f} at pole {v['at_pole']:.2f}"
                           for pole, v in pole_feature_means(rows).items()))
        report(f"{scenario.name}: generated in {time.perf_counter() - start:.0f} s\n{stats}")
        meta = {"kind": "meta", "version": scenario.version, "model": model, "model_key": model_key(model),
                "seed": seed, "content_digest": content_digest(scenario=scenario), "generation": asdict(GENERATION),
                "chat_template": bool(getattr(tokenizer, "chat_template", None))}
        return "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in [meta, *rows])

    _locked_once(path, build)
    with path.open(encoding="utf-8") as handle:  # a cache from older prompts or settings must not pass silently
        _check_meta(json.loads(handle.readline() or "null"), path, scenario)
    return path


# ---- pairs -------------------------------------------------------------------------------------------
def user_id(user: int, scenario: Scenario = STYLES) -> str:
    """``"user0007-detailed-casual-list"``: the index and the persona, readable in any listing (the
    judges of ``fedpersona.alignment.judges`` read the user's poles from it)."""
    return f"user{user:04d}-{scenario.data.persona_of(user).slug}"


def build_pairs(rows: Sequence[dict[str, Any]], num_users: int,
                scenario: Scenario = STYLES) -> tuple[list[PreferencePair], int]:
    """``(pairs, skipped)``: for each user, prompt and dimension, (prompt, its pole's answer, the opposite
    pole's answer), in user, prompt, dimension order. A pair whose answers are empty or identical (possible
    with a tiny random model) is skipped and counted."""
    sd = scenario.data
    answer = {(r["prompt_index"], r["pole"]): r for r in rows}
    pairs: list[PreferencePair] = []
    skipped = 0
    for user in range(num_users):
        persona = sd.persona_of(user)
        for index, prompt in enumerate(sd.PROMPTS):
            for pole in persona.poles:
                mine, other = answer[(index, pole)], answer[(index, sd.OPPOSITE[pole])]
                row = {"user_id": user_id(user, scenario), "prompt": prompt, "chosen": mine["answer"],
                       "rejected": other["answer"], "split": mine["split"]}
                try:
                    pairs.append(validate_row(row, scenario.name))
                except UsageError:
                    skipped += 1
    return pairs, skipped


def pairs_path(model: str, num_users: int, seed: int, scenario: Scenario = STYLES) -> Path:
    """Where the pair file for ``num_users`` users is cached (beside the answers it is built from)."""
    answers = answers_path(model, seed) if scenario is STYLES else answers_path(model, seed, scenario)
    return answers.with_name(f"{answers.stem}-users{num_users}.jsonl")


def ensure_style_pairs(model: str, num_users: int, seed: int, *, report: Report = _stderr) -> Path:
    """The pair file (JSONL rows ``user_id, prompt, chosen, rejected, split``; see
    ``fedpersona.data.schema``) of ``num_users`` users over ``model``'s answers for ``seed``: generates the
    answers once if needed, builds the pairs from them once, returns the path.

    Raises UsageError for ``num_users < 1``, a model that cannot be resolved or loaded, or a stale cache."""
    if num_users < 1:
        raise UsageError(f"users {num_users}: need at least 1 user")
    answers = ensure_style_answers(model, seed, report=report)
    return _ensure_pairs(STYLES, answers, pairs_path(model, num_users, seed), num_users, report)


def _ensure_pairs(scenario: Scenario, answers: Path, path: Path, num_users: int, report: Report) -> Path:
    def build() -> str:
        _, rows = read_answers(answers, scenario)
        pairs, skipped = build_pairs(rows, num_users, scenario)
        if skipped:
            report(f"{scenario.name}: skipped {skipped} pairs whose two answers were empty or identical")
        return "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs)

    _locked_once(path, build)
    return path


def ensure_generated_pairs(name: str, model: str, num_users: int, seed: int, *, report: Report = _stderr) -> Path:
    """The pair file of the generated scenario ``name`` (``generated:<name>``; ``GENERATED``) for
    ``num_users`` users over ``model``'s answers for ``seed``, generated and cached once.

    Args:
        name: ``styles`` or ``stances``.
        model: the run's model (it writes the answers).
        num_users: users; user ``u`` has the scenario's persona ``u mod`` (its persona count).
        seed: sampling seed of the answers.
        report: where progress lines go (default stderr).

    Returns:
        The pair file's path.

    Raises:
        UsageError: an unknown scenario, ``num_users < 1``, a model that cannot be loaded, a stale cache.
    """
    if name not in GENERATED:
        raise UsageError(f"generated:{name}: unknown; choose one of {', '.join(GENERATED)}")
    if name == STYLES.name:
        return ensure_style_pairs(model, num_users, seed, report=report)
    if num_users < 1:
        raise UsageError(f"users {num_users}: need at least 1 user")
    scenario = GENERATED[name]
    answers = _ensure_answers(scenario, answers_path(model, seed, scenario), model, seed, report)
    return _ensure_pairs(scenario, answers, pairs_path(model, num_users, seed, scenario), num_users, report)
