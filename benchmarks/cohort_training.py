"""Cohort-batched training against one user after another (issue 15). Not a test: it prints figures.

The same users with the same pairs, seeds and starting tensors are trained two ways on the process's one
resident model, as a simulation worker trains the users of a cohort message:

* **sequential**: ``train_local`` per user (load the user's shared and private tensors, train, read them
  back), the path taken with ``cohort-batching=false`` or where batching is refused;
* **cohort of c**: ``train_stacked`` on c users at a time (one forward/backward per step for all of them;
  ``fedpersona.alignment.stacked``).

Both train ``--users`` users in all (a multiple of every cohort size), with the simulation's training
settings (``RunConfig`` defaults, ``--set`` to change them). Each timing is the best of ``--repeats``.
Printed side by side: users/s, pairs/s (pairs seen in optimizer steps per second) and the speed-up of
each cohort size over sequential; the largest per-element difference from the sequential tensors shows
that both trained the same thing.

Usage::

    python benchmarks/cohort_training.py                          # embedded model, cohorts 1 4 16, CPU
    python benchmarks/cohort_training.py --device cuda --threads 0
    python benchmarks/cohort_training.py --cohorts 1 4 16 32 --users 32

Writes ``--out`` (JSON) beside the printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from fedpersona.alignment.stacked import StackedJob, batch_schedule, stacking_supported, train_stacked
from fedpersona.alignment.trainer import train_local
from fedpersona.round.resident import resident_for
from fedpersona.round.users import population_user, round_seed
from fedpersona.config import RunConfig
from fedpersona.model.adapters import Role


def _jobs(config: RunConfig, resident, users: int) -> list[StackedJob]:
    shared = resident.adapters.tensors(Role.SHARED)
    generator = torch.Generator().manual_seed(config.seed)
    jobs = []
    for u in range(users):
        # a private start of its own per user (as after earlier rounds), so no two slices are alike
        private = {n: t + 0.01 * torch.randn(t.shape, generator=generator)
                   for n, t in resident.adapters.tensors(Role.PRIVATE).items()}
        jobs.append(StackedJob(pairs=population_user(config, u).train, seed=round_seed(config, u, 1),
                              shared=shared, private=private))
    return jobs


def sequential(resident, jobs, settings) -> tuple[float, list[dict[str, torch.Tensor]]]:
    start = time.perf_counter()
    out = []
    for job in jobs:
        resident.adapters.load(job.shared, Role.SHARED)
        resident.adapters.load(job.private, Role.PRIVATE)
        train_local(resident, job.pairs, settings, job.seed)
        out.append({**resident.adapters.tensors(Role.SHARED), **resident.adapters.tensors(Role.PRIVATE)})
    return time.perf_counter() - start, out


def batched(resident, jobs, settings, size: int) -> tuple[float, list[dict[str, torch.Tensor]]]:
    start = time.perf_counter()
    out = []
    for first in range(0, len(jobs), size):
        for result in train_stacked(resident, jobs[first : first + size], settings):
            out.append({**result.shared, **result.private})
    return time.perf_counter() - start, out


def compute_floor(resident, jobs, settings, batch: int, repeats: int = 3) -> float:
    """Seconds per pair of one plain forward/backward (the resident's own forward, no optimizer step, no
    per-user weights) on ``batch`` pairs: the arithmetic a step cannot do without. Where a sequential step
    already runs at this floor, batching users can only save the per-step overhead above it."""
    from fedpersona.alignment.batching import encode_pairs
    from fedpersona.alignment.trainer import pair_losses, reference_logps

    pairs = [p for job in jobs for p in job.pairs][:batch]
    encoded = encode_pairs(resident.prompt_format, pairs, settings.max_length)
    ref = reference_logps(resident, encoded)
    resident.model.train()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pair_losses(resident, encoded, ref, settings).sum().backward()
        best = min(best, time.perf_counter() - start)
    resident.model.zero_grad(set_to_none=True)
    resident.model.eval()
    return best / len(encoded)


def max_difference(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> float:
    return max(float((x[n] - y[n]).abs().max()) for x, y in zip(a, b, strict=True) for n in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohorts", type=int, nargs="+", default=[1, 4, 16], help="cohort sizes (default 1 4 16)")
    parser.add_argument("--users", type=int, default=16, help="users trained per measurement (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per way; the best is kept (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: one simulation actor's CPU; 0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="RunConfig settings")
    parser.add_argument("--out", type=Path, default=Path("runs/cohort_training.json"))
    args = parser.parse_args()
    if any(args.users % c for c in args.cohorts):
        parser.error(f"--users {args.users} must be a multiple of every cohort size {args.cohorts}")
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = dict(item.split("=", 1) for item in args.set)
    config = RunConfig.from_flat(overrides, base=RunConfig(num_users=args.users, accelerator=args.device), source="--set")
    resident = resident_for(config)
    settings = config.train_settings
    if (reason := stacking_supported(resident, settings)) is not None:
        sys.exit(f"cohort training is refused for these settings: {reason}")
    jobs = _jobs(config, resident, args.users)
    pairs_seen = sum(len(b) for job in jobs for b in batch_schedule(len(job.pairs), settings, job.seed))
    batched(resident, jobs[: min(args.cohorts)], settings, min(args.cohorts))  # warm-up (reference cache, allocator)

    seq_seconds, reference = min((sequential(resident, jobs, settings) for _ in range(args.repeats)),
                                 key=lambda r: r[0])
    rows = [{"way": "sequential", "cohort": 1, "seconds": seq_seconds, "max_diff": 0.0}]
    for size in args.cohorts:
        seconds, tensors = min((batched(resident, jobs, settings, size) for _ in range(args.repeats)),
                               key=lambda r: r[0])
        rows.append({"way": f"cohort of {size}", "cohort": size, "seconds": seconds,
                     "max_diff": max_difference(tensors, reference)})
    for row in rows:
        row |= {"users_per_s": args.users / row["seconds"], "pairs_per_s": pairs_seen / row["seconds"],
                "speedup": seq_seconds / row["seconds"]}

    floors = {b: compute_floor(resident, jobs, settings, b)
              for b in sorted({settings.batch_size, settings.batch_size * max(args.cohorts)})}
    print(f"{config.model} on {args.device}, {torch.get_num_threads()} thread(s), {args.users} users, "
          f"{pairs_seen} pairs seen in steps, scheme {config.scheme}, loss {config.loss}, best of {args.repeats}")
    print(f"{'way':<14} {'seconds':>8} {'users/s':>8} {'pairs/s':>8} {'speed-up':>9} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['way']:<14} {r['seconds']:>8.2f} {r['users_per_s']:>8.2f} {r['pairs_per_s']:>8.0f} "
              f"{r['speedup']:>8.2f}x {r['max_diff']:>11.1e}")
    print("compute floor (one plain forward/backward, no step): "
          + ", ".join(f"{1000 * f:.2f} ms/pair at {b} pairs" for b, f in floors.items())
          + f"; sequential spent {1000 * seq_seconds / pairs_seen:.2f} ms/pair in all")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "device": args.device, "users": args.users, "pairs_seen": pairs_seen, "rows": rows,
              "compute_floor_s_per_pair": {str(b): f for b, f in floors.items()}}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(args.out)
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
