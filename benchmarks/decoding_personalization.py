"""Inference-time personalization: strength scaling (weights) vs logit mixing (DeRa), on synthetic users.

What it measures. A small federation is trained in-process: users of ``synthetic:conflicting`` (the
default scenario: two persona groups that want opposite styles), FedAvg over the shared adapter, every
user every round, each user's round by the real client code (``fedpersona.round.train.train_round`` on
the resident model, the scheme's private part kept per user). Then every user answers its held-out
prompts with

* the global model (base + shared; the reference of every win rate);
* ``weights`` at strength s: the private tensors scaled from their initial values (s = 1: the personal model);
* ``logits`` at weight w: the next token drawn from softmax(w log p_personal + (1 - w) log p_global)
  (Decoding-time Realignment, arXiv 2402.02992; ``fedpersona.alignment.mixing``); w = 1 is the personal
  model itself (the ``weights 1`` row), w > 1 extrapolates.

Every answer is sampled (``--temperature``, the simulations' generation check uses 0.7) through the same
token loop (``fedpersona.alignment.generation.decode``) with the same seed per (user, prompt, sample)
for every method (common random numbers), and scored with the user's hidden utility
(``PreferenceSimulator.utility_of``). Win rate vs global: the share of (prompt, sample) where the
method's answer scores higher than the global model's (ties count half), per user, then averaged over
users; ± is the standard error over users. Tokens/s: generated tokens over wall time of generation
(batch 1, KV cache, this machine's threads); logit mixing runs two forwards per token.

    .venv/bin/python benchmarks/decoding_personalization.py --out runs/decoding_personalization.json
    .venv/bin/python benchmarks/decoding_personalization.py --users 2 --rounds 1 --prompts 2 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script from anywhere: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpersona.alignment.generation import decode  # noqa: E402
from fedpersona.round.evaluate import win_rate  # noqa: E402
from fedpersona.round.resident import resident_for  # noqa: E402
from fedpersona.round.stores import MemoryStore  # noqa: E402
from fedpersona.round.train import train_round  # noqa: E402
from fedpersona.round.users import population_user  # noqa: E402
from fedpersona.config import RunConfig  # noqa: E402
from fedpersona.data.sources import SYNTHETIC_PREFIX, simulator  # noqa: E402
from fedpersona.model.adapters import Role  # noqa: E402

DEFAULT_STRENGTHS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_WEIGHTS = (0.5, 1.5, 2.0, 3.0)


def mean_tensors(updates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([u[name] for u in updates]).mean(0) for name in updates[0]}


def train(config: RunConfig, users: dict[int, Any]) -> tuple[dict[str, torch.Tensor], dict[int, MemoryStore], float]:
    """FedAvg over the shared adapter, every user every round: (shared, stores with the private tensors, seconds)."""
    resident = resident_for(config)
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)
    shared = resident.adapters.tensors(Role.SHARED)
    stores = {index: MemoryStore() for index in users}
    started = time.perf_counter()
    for rnd in range(1, config.rounds + 1):
        updates = []
        for index, user in users.items():
            result = train_round(config, user, index, rnd, shared, stores[index], {"server-round": rnd})
            updates.append(result.shared)
        shared = mean_tensors(updates)
    return shared, stores, time.perf_counter() - started


def methods(args: argparse.Namespace) -> list[tuple[str, float]]:
    """The table's rows: (method, strength or weight); ("global", 0) is the reference."""
    return [("global", 0.0), *(("weights", s) for s in args.strengths), *(("logits", w) for w in args.weights)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    config = RunConfig(num_users=args.users, rounds=args.rounds, seed=args.seed, accelerator="cpu",
                       data="synthetic:conflicting", gen_temperature=args.temperature)
    users = {i: population_user(config, i) for i in range(args.users)}
    shared, stores, train_seconds = train(config, users)
    sim = simulator(config.data[len(SYNTHETIC_PREFIX):], config.num_users + config.new_users, config.seed,
                    config.dirichlet_alpha)
    resident = resident_for(config)
    rows = methods(args)
    utilities: dict[tuple[str, float], dict[int, list[float]]] = {row: {} for row in rows}
    tokens = {row: 0 for row in rows}
    seconds = {row: 0.0 for row in rows}
    examples: dict[tuple[str, float], str] = {}
    for index, user in users.items():
        resident.adapters.load(shared, Role.SHARED)
        resident.adapters.load(stores[index].private, Role.PRIVATE)
        prompts = list(dict.fromkeys(p.prompt for p in user.test))[: args.prompts]
        for row in rows:
            method, weight = row
            scores = utilities[row].setdefault(index, [])
            for k, prompt in enumerate(prompts):
                ids = resident.prompt_format.prompt_ids(prompt)
                for sample in range(args.samples):
                    seed = args.seed * 1_000_003 + index * 10_007 + k * 101 + sample  # the same for every row
                    started = time.perf_counter()
                    out = list(decode(resident, ids, method="weights" if method == "global" else method,
                                      strength=weight, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, seed=seed))
                    seconds[row] += time.perf_counter() - started
                    tokens[row] += len(out)
                    text = resident.tokenizer.decode(out, skip_special_tokens=True).strip()
                    scores.append(sim.utility_of(index, text))
                    if index == 0 and k == 0 and sample == 0:
                        examples[row] = text
    resident.adapters.reset(Role.SHARED)  # the process's resident model as it was found
    resident.adapters.reset(Role.PRIVATE)
    reference = utilities[("global", 0.0)]
    table = []
    for row in rows:
        rates = [win_rate(utilities[row][i], reference[i]) for i in users]
        mean = sum(rates) / len(rates)
        se = math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1) / len(rates)) if len(rates) > 1 else 0.0
        scores = [u for per_user in utilities[row].values() for u in per_user]
        table.append({"method": row[0], "weight": row[1], "win_rate": mean, "win_rate_se": se,
                      "mean_utility": sum(scores) / len(scores),
                      "tokens": tokens[row], "seconds": seconds[row],
                      "tokens_per_s": tokens[row] / seconds[row] if seconds[row] > 0 else 0.0,
                      "forwards_per_token": 2 if row[0] == "logits" and row[1] not in (0.0, 1.0) else 1,
                      "example_user0": examples.get(row, "")})
    return {"settings": {"users": args.users, "rounds": args.rounds, "prompts": args.prompts, "samples": args.samples,
                         "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed,
                         "threads": args.threads, "model": config.model, "scheme": config.scheme,
                         "data": config.data},
            "train_seconds": train_seconds, "rows": table}


def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"{s['users']} users x {s['prompts']} held-out prompts x {s['samples']} samples, {s['rounds']} rounds "
             f"of FedAvg ({s['scheme']}, {s['model']}), temperature {s['temperature']}, {s['max_new_tokens']} "
             f"new tokens, {s['threads']} thread(s); trained in {result['train_seconds']:.0f} s",
             "",
             "| method | weight | win rate vs global | mean utility | tokens/s |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        name = {"global": "global (reference)", "weights": "strength scaling (weights)",
                "logits": "logit mixing (DeRa)"}[r["method"]]
        lines.append(f"| {name} | {r['weight']:g} | {r['win_rate']:.3f} ± {r['win_rate_se']:.3f} | "
                     f"{r['mean_utility']:.3f} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8, help="synthetic users (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds, every user each round (default 5)")
    parser.add_argument("--prompts", type=int, default=6, help="held-out prompts per user (default 6)")
    parser.add_argument("--samples", type=int, default=2, help="sampled answers per prompt (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--strengths", type=float, nargs="+", default=list(DEFAULT_STRENGTHS),
                        help="strength-scaling rows (0..1)")
    parser.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS),
                        help="logit-mixing rows (0..4; 1 is the personal model, the 'weights 1' row)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.users < 1 or args.rounds < 1 or args.prompts < 1 or args.samples < 1:
        parser.error("--users, --rounds, --prompts and --samples must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nresults: {args.out}")
    print(json.dumps({"rows": [{k: r[k] for k in ("method", "weight", "win_rate", "tokens_per_s")}
                               for r in result["rows"]]}))
    return result


if __name__ == "__main__":
    main()
