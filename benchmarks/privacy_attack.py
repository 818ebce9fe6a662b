#!/usr/bin/env python
"""Privacy attack benchmark: canary exposure and membership inference, without DP and with pair-level DP.

What it does (one run, three settings, the same data and seeds in each):

1. Users ``0 .. users-1`` of ``synthetic:conflicting``; each user's training set is the first
   ``--max-train-pairs`` of its synthetic training pairs (the rest are never trained on), its
   non-members are its own 24 held-out test pairs.
2. Canaries (Carlini et al., 2019, "The Secret Sharer", arXiv 1802.08232): ``--canaries`` pairs spread
   over the first ``--canary-users`` users. A canary is a normal prompt whose *chosen* response is a
   string of ``--canary-length`` words drawn uniformly from the model's vocabulary (a "secret" that
   nothing else in the data predicts) and whose *rejected* response is a decoy from the same
   distribution (``--canary-rejected random``, the default; ``evasive`` uses an ordinary evasive answer,
   which DPO can beat by raising *every* random string, so the secret itself is memorized less). Each
   canary is planted once (one pair: the unit pair-level DP protects; k copies would get group privacy
   k*eps), and gets ``--candidates`` candidate strings from the same distribution, never trained on.
3. A few federated rounds simulated in-process (FedAvg over the shared adapter, every user every round,
   equal weights; each user's private adapter stays with it across rounds; so a pair is seen
   rounds x local epochs times, as in a real run, rather than in one long local run), each user's round
   run by the real client code (``fedpersona.round.train.train_round``: the ``--scheme``'s private part,
   ``train_local`` without DP or ``train_local_dp`` with the user's persistent ledger calibrated for
   exactly ``--rounds`` rounds: pair-level, default delta rule, reproducible seeds).
4. Attacks on each user's final personalized model (final shared + its own private part), i.e. an
   attacker with white-box access to what the user ends up with (the strongest position; the server
   sees less):

   * exposure: score = log pi(secret | prompt) - log pi_ref(secret | prompt) (the DPO implicit reward of
     the chosen side, up to beta). Candidates share the canary's prompt and rejected response, so the DPO
     implicit reward *margin* ranks them identically. rank = 1 + #candidates scoring >= the canary;
     exposure = log2(candidates + 1) - log2(rank); chance (never trained) is about log2(e) = 1.44 bits
     on average (the expected max over the canaries is reported too), the maximum log2(candidates + 1).
     An extrapolated exposure (-log2 of the Gaussian tail of the candidates' scores above the canary,
     Carlini's sec. 4.3 approximation) goes past that maximum.
   * membership inference: score = DPO implicit reward margin
     ``(log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))`` (a loss attack: the DPO loss is a
     decreasing function of it, and calibrating by the reference makes it a likelihood-ratio attack);
     members = the user's trained normal pairs, non-members = its held-out pairs, pooled over users.
     Reported: AUC, advantage = max over thresholds of TPR - FPR, and the 95th percentile of both
     under a label permutation (what "chance" looks like at this sample size: a finite-sample maximum
     over thresholds is never 0).
   * utility: held-out pairwise accuracy (``evaluate_user``) of the canary users and of all users.
   * for DP settings, what (eps, delta) alone would allow: the largest MIA advantage on one pair.

Run ``python benchmarks/privacy_attack.py --help``; see benchmarks/README.md ("Privacy attack").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from anywhere: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpersona.alignment.batching import collate, encode_pairs, sequence_logprobs  # noqa: E402
from fedpersona.alignment.evaluation import evaluate_user  # noqa: E402
from fedpersona.alignment.trainer import pair_policy_logps, reference_logps  # noqa: E402
from fedpersona.round.resident import resident_for  # noqa: E402
from fedpersona.round.stores import MemoryStore  # noqa: E402
from fedpersona.round.train import train_round  # noqa: E402
from fedpersona.round.users import population_user  # noqa: E402
from fedpersona.config import RunConfig  # noqa: E402
from fedpersona.data.schema import PreferencePair, UserData  # noqa: E402
from fedpersona.data.synthetic import EVASIVE, PROMPT_TEMPLATES, TOPICS  # noqa: E402
from fedpersona.model.adapters import Role  # noqa: E402

NOT_WORDS = {"user", "assistant", ":"}  # prompt-format tokens: not part of a secret


# ---- data ----------------------------------------------------------------------------------------------
@dataclass
class Canary:
    user: int
    pair: PreferencePair
    candidates: list[str]  # same-distribution secrets never trained on


@dataclass
class Population:
    users: dict[int, UserData]  # training sets include the planted canaries
    members: dict[int, list[PreferencePair]]  # normal trained pairs (MIA members)
    canaries: list[Canary] = field(default_factory=list)


def secret_words(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    return sorted(w for w in tokenizer.get_vocab() if w not in specials and w not in NOT_WORDS)


def build_population(config: RunConfig, args: argparse.Namespace, words: list[str]) -> Population:
    rng = np.random.default_rng([args.seed, 0xCA7A])
    canary_users = list(range(min(args.canary_users, args.users)))
    members: dict[int, list[PreferencePair]] = {}
    users: dict[int, UserData] = {}
    for index in range(args.users):
        data = population_user(config, index)
        members[index] = list(data.train[: args.max_train_pairs])
        users[index] = UserData(data.user_id, list(members[index]), list(data.test))
    canaries = []
    for k in range(args.canaries if canary_users else 0):
        index = canary_users[k % len(canary_users)]
        topic = str(rng.choice(TOPICS))
        prompt = str(rng.choice(PROMPT_TEMPLATES)).format(t=topic)
        draw = lambda: " ".join(rng.choice(words, size=args.canary_length))  # noqa: E731
        secret = draw()
        candidates: list[str] = []
        while len(candidates) < args.candidates:
            c = draw()
            if c != secret:
                candidates.append(c)
        decoy = draw()  # drawn every time, so the canaries do not depend on the rejected kind
        rejected = decoy if args.canary_rejected == "random" else str(rng.choice(EVASIVE)).format(t=topic)
        pair = PreferencePair(users[index].user_id, prompt, secret, rejected, "train")
        canaries.append(Canary(index, pair, candidates))
    for canary in canaries:  # planted at a random position of the user's training list
        train = users[canary.user].train
        train.insert(int(rng.integers(len(train) + 1)), canary.pair)
    return Population(users, members, canaries)


# ---- training: a few federated rounds, in-process ------------------------------------------------------
def mean_tensors(updates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([u[name] for u in updates]).mean(0) for name in updates[0]}


def train_setting(resident, config: RunConfig, pop: Population, epsilon: float, rounds: int) -> dict:
    """FedAvg over the shared adapter for ``rounds`` rounds, each user's round by the real client code
    (``train_round``: the scheme's private part, DP-SGD and the persistent ledger); returns final shared,
    private per user, stats."""
    from fedpersona.privacy.ledger import PrivacyLedger

    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)
    config = config.replace(dp_epsilon=epsilon, dp_reproducible=True, rounds=rounds)
    shared = resident.adapters.tensors(Role.SHARED)
    stores = {index: MemoryStore() for index in pop.users}
    steps: dict[int, int] = {i: 0 for i in pop.users}
    for rnd in range(1, rounds + 1):
        updates = []
        for index, user in pop.users.items():
            result = train_round(config, user, index, rnd, shared, stores[index], {"server-round": rnd})
            if result.declined:
                raise RuntimeError(f"user {index} declined round {rnd}: the ledger is over budget")
            steps[index] += result.stats.steps
            updates.append(result.shared)
        shared = mean_tensors(updates)
    out = {"shared": shared, "private": {i: s.private for i, s in stores.items()}, "steps": steps}
    if epsilon > 0:
        ledgers = {i: PrivacyLedger.from_json(s.ledger) for i, s in stores.items()}
        out["ledger"] = {i: {"epsilon": led.spent_epsilon(), "delta": led.delta, "noise": led.noise_multiplier,
                             "sample_rate": led.sample_rate, "steps": led.steps_taken} for i, led in ledgers.items()}
    return out


def use_model(resident, trained: dict, index: int) -> None:
    resident.adapters.load(trained["shared"], Role.SHARED)
    resident.adapters.load(trained["private"][index], Role.PRIVATE)
    resident.model.eval()


# ---- scores --------------------------------------------------------------------------------------------
@torch.no_grad()
def response_logps(resident, prompt: str, responses: list[str], max_length: int, *, reference: bool,
                   batch_size: int = 256) -> torch.Tensor:
    """Summed log-probs of each response to ``prompt`` under the policy (or the frozen reference)."""
    sides = [resident.prompt_format.encode(prompt, r, max_length) for r in responses]
    out = []
    for start in range(0, len(sides), batch_size):
        batch = collate(sides[start : start + batch_size], resident.pad_id, resident.device)
        if reference:
            with resident.model.disable_adapter():
                out.append(sequence_logprobs(resident.model, batch)[0])
        else:
            out.append(sequence_logprobs(resident.model, batch)[0])
    return torch.cat(out).cpu()


@torch.no_grad()
def pair_scores(resident, pairs: list[PreferencePair], max_length: int, batch_size: int = 64) -> np.ndarray:
    """DPO implicit reward margin of each pair under the current model: ``[N]``."""
    encoded = encode_pairs(resident.prompt_format, pairs, max_length)
    ref = reference_logps(resident, encoded, batch_size)
    margins = []
    for start in range(0, len(encoded), batch_size):
        pc, pr, _, _ = pair_policy_logps(resident, encoded[start : start + batch_size])
        r = ref[start : start + batch_size]
        margins.append(((pc.cpu() - r[:, 0]) - (pr.cpu() - r[:, 1])))
    return torch.cat(margins).numpy()


def exposure(canary_score: float, candidate_scores: np.ndarray) -> tuple[float, int, float]:
    """(rank exposure, rank, extrapolated exposure from a Gaussian fit of the candidates)."""
    rank = 1 + int(np.sum(candidate_scores >= canary_score))
    exp_rank = math.log2(len(candidate_scores) + 1) - math.log2(rank)
    mu, sd = float(candidate_scores.mean()), float(candidate_scores.std()) or 1e-12
    z = (canary_score - mu) / sd
    # -log2 P(N(0,1) >= z), stable for large z
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))
    exp_fit = -math.log2(tail) if tail > 0 else (z * z / 2 + math.log(z * math.sqrt(2 * math.pi))) / math.log(2)
    return exp_rank, rank, exp_fit


def chance_exposure(candidates: int) -> float:
    """Expected exposure of a canary never trained on (its rank uniform on 1..candidates+1): ~log2(e)."""
    total = candidates + 1
    return math.log2(total) - math.lgamma(total + 1) / math.log(2) / total


def exposure_null(candidates: int, canaries: int, mean: float, largest: float, seed: int,
                  draws: int = 20000) -> dict:
    """Never-trained canaries (ranks uniform on 1..candidates+1), Monte Carlo: the expected largest
    exposure among ``canaries`` of them, and one-sided p-values of the observed mean and largest."""
    if canaries < 1:
        return {"chance_max": math.nan, "p_mean": math.nan, "p_max": math.nan}
    ranks = np.random.default_rng([seed, 0xE4]).integers(1, candidates + 2, size=(draws, canaries))
    exp = math.log2(candidates + 1) - np.log2(ranks)
    null_mean, null_max = exp.mean(axis=1), exp.max(axis=1)
    return {"chance_max": float(null_max.mean()),
            "p_mean": float((1 + np.sum(null_mean >= mean - 1e-12)) / (1 + draws)),
            "p_max": float((1 + np.sum(null_max >= largest - 1e-12)) / (1 + draws))}


def auc_score(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(member score > non-member score) + 0.5 P(tie) (Mann-Whitney U / (m n))."""
    scores = np.concatenate([members, nonmembers])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    m, n = len(members), len(nonmembers)
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))


def roc(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) for 'member if score >= threshold' over every threshold, from (0,0) to (1,1)."""
    thresholds = np.unique(np.concatenate([members, nonmembers]))[::-1]
    tpr = np.array([0.0, *[(members >= t).mean() for t in thresholds]])
    fpr = np.array([0.0, *[(nonmembers >= t).mean() for t in thresholds]])
    return fpr, tpr


def advantage(members: np.ndarray, nonmembers: np.ndarray) -> float:
    fpr, tpr = roc(members, nonmembers)
    return float(np.max(tpr - fpr))


def permutation_null(members: np.ndarray, nonmembers: np.ndarray, times: int, seed: int) -> dict:
    """Membership labels shuffled ``times`` times: 95th percentiles of the advantage and of
    |AUC - 0.5| * 2, and one-sided p-values of the observed advantage and AUC (members score higher)."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([members, nonmembers])
    advs, aucs = [], []
    for _ in range(times):
        perm = rng.permutation(scores)
        m, n = perm[: len(members)], perm[len(members) :]
        advs.append(advantage(m, n))
        aucs.append(auc_score(m, n))
    if not advs:
        return {"advantage_p95": math.nan, "auc_gap_p95": math.nan, "p_advantage": math.nan, "p_auc": math.nan}
    advs, aucs = np.array(advs), np.array(aucs)
    adv, auc = advantage(members, nonmembers), auc_score(members, nonmembers)
    return {"advantage_p95": float(np.quantile(advs, 0.95)),
            "auc_gap_p95": float(np.quantile(np.abs(aucs - 0.5) * 2, 0.95)),
            "p_advantage": float((1 + np.sum(advs >= adv - 1e-12)) / (1 + times)),
            "p_auc": float((1 + np.sum(aucs >= auc - 1e-12)) / (1 + times))}


# ---- one setting ---------------------------------------------------------------------------------------
def attack_setting(resident, config: RunConfig, pop: Population, trained: dict, ref_cache: dict,
                   args: argparse.Namespace) -> dict:
    L = config.max_length
    canary_rows = []
    for k, canary in enumerate(pop.canaries):
        prompt = canary.pair.prompt
        texts = [canary.pair.chosen, *canary.candidates]
        if k not in ref_cache:
            ref_cache[k] = response_logps(resident, prompt, texts, L, reference=True)
        ref = ref_cache[k]
        row = {"user": canary.user}
        for who, index in (("owner", canary.user), ("other", _other_user(canary.user, pop))):
            if index is None:
                continue
            use_model(resident, trained, index)
            llr = (response_logps(resident, prompt, texts, L, reference=False) - ref).numpy()
            e_rank, rank, e_fit = exposure(float(llr[0]), llr[1:])
            if who == "owner":
                row.update(exposure=e_rank, rank=rank, exposure_extrapolated=e_fit, canary_llr=float(llr[0]),
                           candidates_llr_mean=float(llr[1:].mean()), candidates_llr_std=float(llr[1:].std()),
                           z=float((llr[0] - llr[1:].mean()) / (llr[1:].std() or 1e-12)))
            else:
                row.update(other_user=index, exposure_other_user=e_rank)
        canary_rows.append(row)

    members, nonmembers, per_user, accuracy = [], [], {}, {}
    for index, user in pop.users.items():
        use_model(resident, trained, index)
        m = pair_scores(resident, pop.members[index], L)
        n = pair_scores(resident, user.test, L)
        members.append(m)
        nonmembers.append(n)
        per_user[index] = {"members": len(m), "nonmembers": len(n), "auc": auc_score(m, n)}
        accuracy[index] = evaluate_user(resident, user.test, L)
    m_all, n_all = np.concatenate(members), np.concatenate(nonmembers)
    auc = auc_score(m_all, n_all)
    canary_users = sorted({c.user for c in pop.canaries})
    exps = [r["exposure"] for r in canary_rows]
    others = [r["exposure_other_user"] for r in canary_rows if "exposure_other_user" in r]
    fpr, tpr = roc(m_all, n_all)

    def mean_acc(indices, key="personalized"):
        vals = [accuracy[i][key] for i in indices]
        return float(np.mean(vals)) if vals else math.nan

    result = {
        "exposure": {
            "mean": float(np.mean(exps)) if exps else math.nan,
            "max": float(np.max(exps)) if exps else math.nan,
            "extrapolated_mean": (float(np.mean([r["exposure_extrapolated"] for r in canary_rows]))
                                  if exps else math.nan),
            "max_possible": math.log2(args.candidates + 1),
            "chance": chance_exposure(args.candidates),
            **(exposure_null(args.candidates, len(exps), float(np.mean(exps)), float(np.max(exps)), args.seed)
               if exps else exposure_null(args.candidates, 0, 0.0, 0.0, args.seed)),
            "other_user_mean": float(np.mean(others)) if others else math.nan,
            "canaries": canary_rows,
        },
        "mia": {
            "score": "dpo_implicit_reward_margin",
            "members": int(len(m_all)),
            "nonmembers": int(len(n_all)),
            "auc": auc,
            "auc_advantage": 2.0 * (auc - 0.5),
            "advantage": advantage(m_all, n_all),
            "null": permutation_null(m_all, n_all, args.permutations, args.seed),
            "member_score_mean": float(m_all.mean()),
            "nonmember_score_mean": float(n_all.mean()),
            "per_user": per_user,
        },
        "utility": {
            "canary_users_personalized": mean_acc(canary_users),
            "all_users_personalized": mean_acc(pop.users),
            "all_users_global": mean_acc(pop.users, "global"),
            "all_users_base": mean_acc(pop.users, "base"),
            "per_user": accuracy,
        },
        "_plot": {"members": m_all.tolist(), "nonmembers": n_all.tolist(), "fpr": fpr.tolist(), "tpr": tpr.tolist(),
                  "canary_z": [r["z"] for r in canary_rows]},
    }
    return result


def dp_bounds(eps: float, delta: float, candidates: int) -> dict:
    """What (eps, delta)-DP alone allows an attacker on one pair (Kairouz et al., 2015; the hypothesis
    testing view): TPR <= e^eps FPR + delta, hence TPR - FPR <= (e^eps - 1 + 2 delta) / (e^eps + 1);
    and P(rank <= r) <= e^eps r / (candidates + 1) + delta, hence P(exposure >= x) <= e^eps 2^-x + delta."""
    mia = (math.exp(eps) - 1 + 2 * delta) / (math.exp(eps) + 1)
    exposure_95 = math.log2(math.exp(eps) / (0.05 - delta)) if delta < 0.05 else math.inf
    return {"mia_advantage_max": min(1.0, mia), "exposure_bits_exceeded_with_prob_5pct": exposure_95,
            "exposure_max_possible": math.log2(candidates + 1)}


def _other_user(owner: int, pop: Population) -> int | None:
    """A user who never held this canary (the next index without canaries), for a leakage baseline."""
    holders = {c.user for c in pop.canaries}
    for index in sorted(pop.users):
        if index not in holders:
            return index
    return None


# ---- output --------------------------------------------------------------------------------------------
def print_table(results: list[dict]) -> None:
    head = (f"{'setting':<8} {'eps':>4} {'spent':>5} {'noise':>5} | {'exposure mean (p)':>17} {'max (p)':>13} "
            f"{'other':>5} | {'MIA adv (p)':>13} {'null95':>6} {'bound':>5} {'AUC':>5} | "
            f"{'acc canary':>10} {'acc all':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        led, e, m = r.get("ledger_summary") or {}, r["exposure"], r["mia"]
        print(f"{r['setting']:<8} {_fmt(r['epsilon_target'], 4, 1)} {_fmt(led.get('epsilon_max'), 5, 2)} "
              f"{_fmt(led.get('noise_mean'), 5, 1)} | {e['mean']:8.2f} {_p(e['p_mean']):>8} "
              f"{e['max']:5.2f} {_p(e['p_max']):>7} {e['other_user_mean']:5.2f} | "
              f"{m['advantage']:5.3f} {_p(m['null']['p_advantage']):>7} {m['null']['advantage_p95']:6.3f} "
              f"{_fmt((r.get('dp_bound') or {}).get('mia_advantage_max'), 5, 3)} {m['auc']:5.3f} | "
              f"{r['utility']['canary_users_personalized']:10.3f} {r['utility']['all_users_personalized']:7.3f}")
    e = results[0]["exposure"]
    print(f"exposure in bits: chance mean {e['chance']:.2f}, chance max of {len(e['canaries'])} canaries "
          f"{e['chance_max']:.2f}, max possible {e['max_possible']:.2f}; p = one-sided p-value against never-trained "
          f"canaries (exposure) or shuffled labels (MIA); other = mean exposure of the same canaries on a user "
          f"who never held them; null95 = 95th percentile of the advantage with shuffled labels; bound = the "
          f"largest advantage (eps, delta)-DP allows on one pair; acc = held-out pairwise accuracy, personalized")


def _p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return f"(p={p:.3f})" if p >= 0.001 else "(p<.001)"


def _fmt(value, width: int, digits: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float) and math.isinf(value):
        return f"{'inf':>{width}}"
    return f"{value:{width}.{digits}f}"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(results)
    fig, axes = plt.subplots(2, cols + 1, figsize=(4.2 * (cols + 1), 7.5), squeeze=False)
    for j, r in enumerate(results):
        p = r["_plot"]
        ax = axes[0, j]
        both = np.concatenate([p["members"], p["nonmembers"]])
        bins = np.linspace(np.quantile(both, 0.01), np.quantile(both, 0.99), 30)
        ax.hist(np.clip(p["nonmembers"], bins[0], bins[-1]), bins=bins, alpha=0.6, density=True,
                label="non-members (held out)")
        ax.hist(np.clip(p["members"], bins[0], bins[-1]), bins=bins, alpha=0.6, density=True, label="members (trained)")
        ax.set_title(f"{r['setting']}: MIA AUC {r['mia']['auc']:.2f}, adv {r['mia']['advantage']:.2f}")
        ax.set_xlabel("DPO implicit reward margin")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        grid = np.linspace(-4, 4, 200)
        ax.plot(grid, np.exp(-grid**2 / 2) / math.sqrt(2 * math.pi), color="gray", label="candidates (std. normal)")
        for k, z in enumerate(p["canary_z"]):
            ax.axvline(min(z, 12), color="crimson", alpha=0.7, label="planted canaries" if k == 0 else None)
        ax.set_xlim(-4, max(6, min(12, max(p["canary_z"], default=0) + 1)))
        ax.set_title(f"{r['setting']}: canaries, exposure mean {r['exposure']['mean']:.2f} bits")
        ax.set_xlabel("canary log-ratio, z vs its candidates (capped at 12)")
        ax.legend(fontsize=7)
    ax = axes[0, cols]
    for r in results:
        ax.plot(r["_plot"]["fpr"], r["_plot"]["tpr"], label=f"{r['setting']} (AUC {r['mia']['auc']:.2f})")
    ax.plot([0, 1], [0, 1], color="gray", ls=":")
    ax.set_xlabel("FPR")
    ax.set_ylabel("TPR")
    ax.set_title("membership inference ROC (pooled)")
    ax.legend(fontsize=7)
    ax = axes[1, cols]
    names = [r["setting"] for r in results]
    ax.bar(np.arange(cols) - 0.2, [r["exposure"]["mean"] for r in results], width=0.4, label="exposure mean")
    ax.bar(np.arange(cols) + 0.2, [r["exposure"]["max"] for r in results], width=0.4, label="exposure max")
    ax.axhline(results[0]["exposure"]["chance"], color="gray", ls=":", label="chance (mean)")
    ax.axhline(results[0]["exposure"]["chance_max"], color="gray", ls="-.", label="chance (max)")
    ax.axhline(results[0]["exposure"]["max_possible"], color="black", ls="--", label="max possible")
    ax.set_xticks(np.arange(cols), names)
    ax.set_ylabel("bits")
    ax.set_title("canary exposure")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Canary exposure and membership-inference attacks on personalized models trained "
                    "without DP and with pair-level DP-SGD (same data and seeds).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--users", type=int, default=6, help="users in the simulated federation")
    p.add_argument("--canary-users", type=int, default=3, help="the first this many users get canaries")
    p.add_argument("--canaries", type=int, default=6, help="canary pairs in all, spread over the canary users")
    p.add_argument("--candidates", type=int, default=1000, help="never-trained candidate secrets per canary")
    p.add_argument("--canary-length", type=int, default=6, help="words in a canary's secret (chosen) response")
    p.add_argument("--canary-rejected", choices=("random", "evasive"), default="random",
                   help="a canary's rejected response: another random string from the same distribution "
                        "(DPO must then learn the secret's own words) or an ordinary evasive answer (DPO can "
                        "then win the margin by raising every random string: weaker memorization)")
    p.add_argument("--config", help="a settings TOML (e.g. configs/dp-pal.toml): scheme, learning rates, DP options")
    p.add_argument("--scheme", default=None, help="personalization scheme (default: the config's, else split)")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds (every user trains every round)")
    p.add_argument("--epochs", type=int, default=4, help="local epochs per round (as RunConfig)")
    p.add_argument("--min-steps", type=int, default=16, help="minimum local steps per round (as RunConfig)")
    p.add_argument("--max-train-pairs", type=int, default=16, help="cap on each user's normal training pairs")
    p.add_argument("--epsilons", default="8,1",
                   help="comma-separated pair-level target epsilons to run after the no-DP setting ('' for none)")
    p.add_argument("--clip", type=float, default=None,
                   help="DP per-pair clipping norm C (default: RunConfig's dp_max_grad_norm)")
    p.add_argument("--permutations", type=int, default=200, help="label shuffles for the MIA chance level")
    p.add_argument("--seed", type=int, default=0, help="data, canary, LoRA-init and round seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG (MIA score histograms, ROC, canary z-scores, exposure) here")
    args = p.parse_args(argv)
    try:
        args.epsilon_list = [float(x) for x in args.epsilons.split(",") if x.strip()]
    except ValueError:
        p.error(f"--epsilons {args.epsilons!r}: expected numbers separated by commas")
    if any(not (e > 0 and math.isfinite(e)) for e in args.epsilon_list):
        p.error("--epsilons: every epsilon must be a finite number > 0")
    for name in ("users", "rounds", "epochs", "candidates", "canary_length", "max_train_pairs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.clip is not None and not (math.isfinite(args.clip) and args.clip > 0):
        p.error("--clip must be a finite number > 0")
    if args.canaries < 0 or args.canary_users < 0 or args.permutations < 0 or args.min_steps < 0:
        p.error("--canaries, --canary-users, --permutations and --min-steps must be >= 0")
    if args.canaries and (args.canary_users < 1 or args.canary_users > args.users):
        p.error("--canary-users must be in 1..--users when there are canaries")
    return args


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    clip = {} if args.clip is None else {"dp_max_grad_norm": args.clip}
    base = RunConfig.from_toml(args.config) if args.config else RunConfig()
    config = base.replace(seed=args.seed, num_users=args.users, rounds=args.rounds, epochs=args.epochs,
                          min_steps=args.min_steps, accelerator="cpu", gen_prompts=0, new_users=0,
                          fraction_train=1.0, dp_planned_rounds=0,  # every user trains every round
                          **({"scheme": args.scheme} if args.scheme else {}), **clip)
    resident = resident_for(config)
    pop = build_population(config, args, secret_words(resident.tokenizer))
    settings = [("no-dp", 0.0)] + [(f"dp-eps{e:g}", e) for e in args.epsilon_list]
    ref_cache: dict = {}
    results = []
    for name, eps in settings:
        t0 = time.perf_counter()
        trained = train_setting(resident, config, pop, eps, args.rounds)
        t1 = time.perf_counter()
        r = {"setting": name, "epsilon_target": eps if eps > 0 else None}
        r.update(attack_setting(resident, config, pop, trained, ref_cache, args))
        if eps > 0:
            r["dp_bound"] = dp_bounds(eps, max(v["delta"] for v in trained["ledger"].values()), args.candidates)
        if "ledger" in trained:
            led = trained["ledger"]
            r["ledger"] = led
            r["ledger_summary"] = {"epsilon_max": max(v["epsilon"] for v in led.values()),
                                   "noise_mean": float(np.mean([v["noise"] for v in led.values()])),
                                   "delta_max": max(v["delta"] for v in led.values())}
        r["local_steps_per_user"] = trained["steps"]
        r["seconds"] = {"train": t1 - t0, "attack": time.perf_counter() - t1}
        results.append(r)
        print(f"[{name}] trained in {t1 - t0:.1f}s, attacked in {time.perf_counter() - t1:.1f}s", flush=True)
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)
    return {
        "benchmark": "privacy_attack",
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "plot", "epsilon_list")},
        "setup": {
            "data": config.data, "model": config.model, "scheme": config.scheme, "loss": config.loss,
            "beta": config.beta, "lr": config.lr, "shared_lr": config.shared_lr, "batch_size": config.batch_size,
            "dp_max_grad_norm": config.dp_max_grad_norm, "dp_accountant": config.dp_accountant,
            "dp_private_clip_share": config.dp_private_clip_share, "pal_init_std": config.pal_init_std,
            "train_pairs_per_user": {i: len(u.train) for i, u in pop.users.items()},
            "canaries_per_user": {i: sum(c.user == i for c in pop.canaries) for i in pop.users},
            "aggregation": "unweighted mean of shared adapters, all users every round",
            "private_parameters_per_user": resident.adapters.count(Role.PRIVATE),
        },
        "results": results,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print()
    print_table(report["results"])
    print(f"total {report['seconds']:.1f}s")
    if args.plot:
        plot(report["results"], args.plot)
        print(f"plot: {args.plot}")
    if args.out:
        clean = {**report, "results": [{k: v for k, v in r.items() if k != "_plot"} for r in report["results"]]}
        Path(args.out).write_text(json.dumps(clean, indent=2, default=_json_default) + "\n", encoding="utf-8")
        print(f"json: {args.out}")
    return report


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


if __name__ == "__main__":
    main()
