"""What the user reads: schemes x generation measures on a real model (judged pole shares, degeneration).

What it measures. A federation is trained in-process with the real round code (``train_cohort_rounds``
per round, FedAvg of the shared tensors weighted by pair counts, each user's private part in a
``MemoryStore``), on a generated scenario (``generated:styles`` by default: SmolLM2 writes an answer per
style pole; user ``u`` has persona ``u mod 8``). Then every user answers its held-out prompts with

* its personal model (base + shared + private; ``--strengths`` below 1 and ``--dera`` logit-mixing weights
  (arXiv 2402.02992) as extra rows),
* the global model (base + shared; the reference of every win rate),
* memory-only: the base model with the user's own chosen answers to the ``--memory-shots`` most similar
  training prompts in its prompt (``fedpersona.alignment.retrieval``; no training at all),

greedy and sampled (``--temperature``, the same seed for every model). Each answer is judged per dimension
(``fedpersona.alignment.judges``): the pole share is over (user, dimension, prompt) cases; rep3 is the mean
share of an answer's word 3-grams that repeat an earlier one; distinct-2 is pooled; cut is the share of
answers that hit ``--max-new-tokens``; win is the judged win rate over the global model. Accuracy is the
held-out pairwise accuracy (personalized / global).

Trained adapters are cached by configuration under ``--cache`` (training is the expensive part: rerun
decoding variants for free). Settings come from ``--config`` (default configs/smollm2.toml) and ``--set``.

    .venv/bin/python benchmarks/personal_generation.py --schemes split,pal,local,global --out runs/pgen.json
    .venv/bin/python benchmarks/personal_generation.py --users 0,3,4,7 --set 'loss=rpo(alpha=1.0)' --schemes split
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script from anywhere: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpersona.alignment.generation import Generation, decode, generate_batch  # noqa: E402
from fedpersona.alignment.judges import degeneration, judged_win_rate, pole_shares, user_poles  # noqa: E402
from fedpersona.alignment.retrieval import memory_prompts  # noqa: E402
from fedpersona.config import RunConfig  # noqa: E402
from fedpersona.io import atomic_write, atomic_write_text  # noqa: E402
from fedpersona.model.adapters import Role  # noqa: E402
from fedpersona.round.evaluate import PersonalViews  # noqa: E402
from fedpersona.round.resident import resident_for  # noqa: E402
from fedpersona.round.stores import MemoryStore  # noqa: E402
from fedpersona.round.train import train_cohort_rounds  # noqa: E402
from fedpersona.round.users import population_user  # noqa: E402
from fedpersona.simulations.launcher import prepare_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_config(args: argparse.Namespace, scheme: str) -> RunConfig:
    settings: dict[str, Any] = {"model": args.model, "data": args.data, "num_users": args.num_users,
                                "scheme": scheme, "rounds": args.rounds, "accelerator": "cpu", "gen_prompts": 0}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key.strip()] = value.strip()
    base = RunConfig.from_toml(args.config) if args.config else None
    config = RunConfig.from_flat(settings, base, source="benchmark")
    return prepare_config(config)


def _key(config: RunConfig, users: list[int]) -> str:
    flat = {k: v for k, v in config.to_flat().items() if not k.startswith("gen-")}
    return hashlib.sha256(json.dumps([flat, users], sort_keys=True, default=str).encode()).hexdigest()[:16]


def train(config: RunConfig, users: list[int], cache: Path) -> dict[str, Any]:
    """FedAvg rounds over ``users`` (every user every round): ``{"shared", "private": {user: tensors},
    "seconds", "accuracy": {user: {...}}}``, from the cache when this configuration was trained before."""
    path = cache / f"{_key(config, users)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    resident = resident_for(config)
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)
    shared = resident.adapters.tensors(Role.SHARED)
    data = {i: population_user(config, i) for i in users}
    stores = {i: MemoryStore() for i in users}
    started = time.perf_counter()
    for rnd in range(1, config.rounds + 1):
        results = []
        for first in range(0, len(users), config.cohort_size):
            cohort = [(i, data[i], stores[i]) for i in users[first:first + config.cohort_size]]
            results += train_cohort_rounds(config, cohort, rnd, shared, {"server-round": rnd})
        for result in results:
            if isinstance(result, Exception):
                raise result
        done = [r for r in results if not r.declined and r.shared]
        if done:
            total = sum(r.num_examples for r in done)
            shared = {n: sum(r.shared[n] * (r.num_examples / total) for r in done) for n in done[0].shared}
        print(f"  round {rnd}: {len(done)} users, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    out = {"shared": shared, "private": {i: stores[i].load_private() for i in users},
           "seconds": time.perf_counter() - started}
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(out, tmp))
    return out


def _load(config: RunConfig, trained: dict[str, Any], user: int):
    resident = resident_for(config)
    if resident.adapters.names(Role.SHARED):
        resident.adapters.load(trained["shared"], Role.SHARED)
    private = trained["private"].get(user)
    if private is None:
        resident.adapters.reset(Role.PRIVATE)
    else:
        resident.adapters.load(private, Role.PRIVATE)
    return resident


def _dera(resident, prompts: list[str], weight: float, args, temperature: float, seed: int) -> list[Generation]:
    out = []
    for k, prompt in enumerate(prompts):
        ids = list(decode(resident, resident.prompt_format.prompt_ids(prompt), method="logits", strength=weight,
                          max_new_tokens=args.max_new_tokens, temperature=temperature, seed=seed + k,
                          repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram))
        cut = len(ids) >= args.max_new_tokens
        out.append(Generation(resident.tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), cut))
    return out


def evaluate(config: RunConfig, users: list[int], trained: dict[str, Any], args,
             memory: dict[tuple[int, str], list[Generation]]) -> dict[str, Any]:
    """Per row (model variant) and decoding: the answers of every user, judged; plus accuracies."""
    decodings = {"greedy": 0.0, "sampled": args.temperature}
    answers: dict[tuple[str, str], dict[int, list[Generation]]] = {}
    accuracy: dict[int, dict[str, float]] = {}
    prompts_of: dict[int, list[str]] = {}
    knobs = {"repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram}
    global_cache: dict[tuple[str, tuple[str, ...]], list[Generation]] = {}  # base + shared: the same for all users
    for user in users:
        data = population_user(config, user)
        prompts = list(dict.fromkeys(p.prompt for p in data.test))[: args.prompts]
        prompts_of[user] = prompts
        resident = _load(config, trained, user)
        views = PersonalViews(resident)
        if not args.no_accuracy:
            accuracy[user] = views.evaluate(data.test, config.max_length)
        for name, temperature in decodings.items():
            gen = dict(max_new_tokens=args.max_new_tokens, temperature=temperature, seed=args.seed, **knobs)
            rows = {"personal": lambda: generate_batch(resident, prompts, strength=1.0, **gen)}
            for s in args.strengths:
                rows[f"strength {s:g}"] = lambda s=s: generate_batch(resident, prompts, strength=s, **gen)
            for w in args.dera:
                rows[f"dera {w:g}"] = lambda w=w: _dera(resident, prompts, w, args, temperature, args.seed)
            for row, make in rows.items():
                answers.setdefault((row, name), {})[user] = make()
            key = (name, tuple(prompts))
            if key not in global_cache:
                global_cache[key] = generate_batch(resident, prompts, strength=0.0, **gen)
            answers.setdefault(("global", name), {})[user] = global_cache[key]
            if args.memory_shots > 0:
                if (user, name) not in memory:
                    memory[(user, name)] = generate_batch(resident, memory_prompts(data.train, prompts,
                                                                                   args.memory_shots),
                                                          base=True, **gen)
                answers.setdefault(("memory-only", name), {})[user] = memory[(user, name)]
        print(f"  user {user}: evaluated", file=sys.stderr, flush=True)
    return {"answers": answers, "accuracy": accuracy, "prompts": prompts_of}


def summarise(config: RunConfig, users: list[int], result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    ids = {u: population_user(config, u).user_id for u in users}
    for (row, decoding), per_user in result["answers"].items():
        reference = result["answers"][("global", decoding)]
        shares: dict[str, list[float]] = {}
        wins = []
        texts, cuts = [], []
        for u, gens in per_user.items():
            t, c = [g.text for g in gens], [g.cut for g in gens]
            texts += t
            cuts += c
            poles = user_poles(ids[u])
            for dim, share in pole_shares(t, c, poles).items():
                shares.setdefault(dim, []).append(share)
            if poles:
                wins.append(judged_win_rate(t, [g.text for g in reference[u]], c, [g.cut for g in reference[u]],
                                            poles))
        by_dim = {d: statistics.fmean(v) for d, v in shares.items()}
        out = {"row": row, "decoding": decoding, **degeneration(texts, cuts),
               "pole": statistics.fmean(by_dim.values()) if by_dim else None,
               **{f"pole_{d}": v for d, v in by_dim.items()},
               "win_rate": statistics.fmean(wins) if wins else None,
               "examples": {ids[u]: [g.text for g in per_user[u][:1]] for u in list(per_user)[:2]}}
        if row in ("personal", "global") and result["accuracy"]:
            key = "personalized" if row == "personal" else "global"
            out["accuracy"] = statistics.fmean(a[key] for a in result["accuracy"].values())
        rows.append(out)
    return rows


def format_table(rows: list[dict[str, Any]], dims: list[str]) -> str:
    head = ("| scheme | model | decoding | accuracy | at pole | " + "".join(f"{d} | " for d in dims) +
            "win vs global | rep3 | distinct-2 | words | cut |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    for r in rows:
        lines.append(f"| {r['scheme']} | {r['row']} | {r['decoding']} | {f(r.get('accuracy'))} | {f(r['pole'])} | "
                     + "".join(f"{f(r.get(f'pole_{d}'))} | " for d in dims)
                     + f"{f(r['win_rate'])} | {r['rep3']:.3f} | {r['distinct2']:.3f} | {r['words']:.1f} | "
                       f"{r['cut']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="generated:styles")
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2.toml"), help="TOML settings ('' none)")
    parser.add_argument("--set", action="append", default=[], help="a setting key=value (repeatable)")
    parser.add_argument("--schemes", default="split", help="comma-separated schemes")
    parser.add_argument("--users", default="8", help="a count (users 0..N-1) or comma-separated user indices")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts per user")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7, help="of the sampled decoding")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed (the same for every model)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="default: the decoding default")
    parser.add_argument("--no-repeat-ngram", type=int, default=None, help="default: the decoding default")
    parser.add_argument("--strengths", type=float, nargs="*", default=[], help="extra weights rows (0..1)")
    parser.add_argument("--dera", type=float, nargs="*", default=[], help="extra logit-mixing rows (batch 1: slow)")
    parser.add_argument("--memory-shots", type=int, default=3, help="memory-only row's examples; 0: no row")
    parser.add_argument("--no-accuracy", action="store_true", help="skip held-out pairwise accuracy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "personal_generation" / "trained")
    parser.add_argument("--out", type=Path, help="write rows and answers as JSON here")
    args = parser.parse_args(argv)
    from fedpersona.alignment.settings import NO_REPEAT_NGRAM, REPETITION_PENALTY

    args.repetition_penalty = REPETITION_PENALTY if args.repetition_penalty is None else args.repetition_penalty
    args.no_repeat_ngram = NO_REPEAT_NGRAM if args.no_repeat_ngram is None else args.no_repeat_ngram
    args.user_list = (list(range(int(args.users))) if "," not in args.users and args.users.isdigit()
                      else [int(u) for u in args.users.split(",")])
    args.num_users = max(max(args.user_list) + 1, 2)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    memory: dict[tuple[int, str], list[Generation]] = {}
    dims: list[str] = []
    dumps: dict[str, Any] = {}
    for scheme in args.schemes.split(","):
        config = build_config(args, scheme)
        print(f"... {scheme}: training {len(args.user_list)} users x {config.rounds} rounds", file=sys.stderr)
        trained = train(config, args.user_list, args.cache)
        started = time.perf_counter()
        result = evaluate(config, args.user_list, trained, args, memory)
        seconds = time.perf_counter() - started
        for r in summarise(config, args.user_list, result):
            if r["row"] == "memory-only" and any(x["row"] == "memory-only" and x["decoding"] == r["decoding"]
                                                 for x in rows):
                continue
            rows.append({"scheme": "-" if r["row"] == "memory-only" else scheme, **r,
                         "train_s": trained["seconds"], "eval_s": seconds})
        dims = dims or [k[len("pole_"):] for k in rows[0] if k.startswith("pole_")]
        dumps[scheme] = {f"{row}/{dec}": {str(u): [g.text for g in gens] for u, gens in per_user.items()}
                         for (row, dec), per_user in result["answers"].items()}
    order = {"personal": 0, "global": 2, "memory-only": 3}
    rows.sort(key=lambda r: (r["decoding"], r["scheme"] == "-", r["scheme"], order.get(r["row"], 1), r["row"]))
    print(f"{len(args.user_list)} users of {args.data} ({args.model}), {args.rounds} rounds, settings "
          f"{' '.join(args.set) or '(config)'}; {args.prompts} held-out prompts, {args.max_new_tokens} new tokens, "
          f"sampled at {args.temperature}, repetition penalty {args.repetition_penalty}, no-repeat "
          f"{args.no_repeat_ngram}")
    print(format_table(rows, dims))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                                "answers": dumps}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
