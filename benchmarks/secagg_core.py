"""SecAgg+ core cost (issue 26): client and server CPU seconds and bytes of one round, against users and d.

Not a test: it prints figures. Each row is one real round in this process (``fedpersona.secagg.local
.run_round``: every user its own ``Client`` with fresh X25519 keys, Shamir shares and AES-CTR masks; one
``Server``), with a share of the users dropping out after key sharing (``--dropout``) so the server's
reconstruction of their masks is in the figures. d = 17,408 is the embedded model's shared adapter,
2,442,240 SmolLM2-135M's. Columns:

* ``k``, ``t``: neighbours per user and shares needed (the defaults of ``fedpersona.secagg.graph``);
* ``client s/user``: CPU seconds of one user's four stages (key agreements, sharing, encryption, mask
  expansion), the mean over the round's users; ``encode s/user``: ``QuantizationPlan.encode`` (clip,
  stochastic rounding) of one update, timed apart;
* ``server s``: CPU seconds of the server for the whole round (routing, summing the masked vectors,
  reconstructing and removing masks); ``plain sum s``: summing the same n float32 vectors, what plain
  FedAvg's server does at least;
* ``up KB/user``: bytes a user sends (masked vector as uint64: halve its part for 32-bit packing);
  ``down KB/user``: bytes it receives; plain FedAvg sends 4 d bytes up.

Usage::

    .venv/bin/python benchmarks/secagg_core.py                     # the default grid
    .venv/bin/python benchmarks/secagg_core.py --users 10 50 --dims 17408 --dropout 0

By default d = 2,442,240 runs only for n <= ``--max-users-large`` (50): a 1,000-user round at that size
expands about 31,000 masks of 19.5 MB on this machine's one core.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from fedpersona.secagg import QuantizationPlan, RoundStats, run_round
from fedpersona.secagg.graph import default_degree, default_threshold
from fedpersona.secagg.messages import MASKED_INPUT

EMBEDDED_D = 17_408
SMOLLM2_D = 2_442_240


def one_row(n: int, d: int, dropout: float, bits: int, seed: int) -> dict[str, float]:
    """Run one round of ``n`` users with ``d``-parameter updates and measure it."""
    rng = np.random.default_rng(seed)
    plan = QuantizationPlan(clip_norm=1.0, weight_cap=1.0, max_summands=n, modulus_bits=bits)
    update = rng.normal(size=d).astype(np.float32)
    plan.encode(update, 1.0, rng)  # warm-up: first-touch page faults are not the encoding's cost
    started = time.process_time()
    encoded = plan.encode(update, 1.0, rng)
    encode_seconds = time.process_time() - started
    users = list(range(n))
    inputs = {u: encoded for u in users}  # the cost does not depend on the values; one vector in memory
    dropped = users[:: max(1, round(1 / dropout))][: math.ceil(n * dropout)] if dropout > 0 else []
    stats = RoundStats()
    result = run_round(inputs, round_id=1, modulus_bits=bits, drop_before={MASKED_INPUT: dropped}, stats=stats)
    started = time.process_time()
    total = np.zeros(d, dtype=np.float32)
    for _ in range(n):
        total += update
    plain_seconds = time.process_time() - started
    k = default_degree(n)
    return {"n": n, "d": d, "k": k, "t": default_threshold(k), "dropped": len(result.dropped),
            "client_per_user": stats.client_seconds / n, "encode_per_user": encode_seconds,
            "server": stats.server_seconds, "plain_sum": plain_seconds,
            "up_kb_per_user": stats.bytes_up / n / 1e3, "down_kb_per_user": stats.bytes_down / n / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[10, 50, 200, 1000])
    parser.add_argument("--dims", type=int, nargs="+", default=[EMBEDDED_D, SMOLLM2_D])
    parser.add_argument("--dropout", type=float, default=0.05, help="share dropping after key sharing")
    parser.add_argument("--bits", type=int, default=32, help="bits per coordinate (modulus 2^b)")
    parser.add_argument("--max-users-large", type=int, default=50,
                        help=f"run d >= {SMOLLM2_D} only up to this many users")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header = (f"{'n':>5} {'d':>9} {'k':>3} {'t':>3} {'drop':>4} {'client s/user':>13} {'encode s/user':>13} "
              f"{'server s':>9} {'plain sum s':>11} {'up KB/user':>10} {'down KB/user':>12}")
    print(header)
    print("-" * len(header))
    for d in args.dims:
        for n in args.users:
            if d >= SMOLLM2_D and n > args.max_users_large:
                print(f"{n:>5} {d:>9}   (skipped: n > --max-users-large {args.max_users_large})")
                continue
            row = one_row(n, d, args.dropout, args.bits, args.seed)
            print(f"{row['n']:>5} {row['d']:>9} {row['k']:>3} {row['t']:>3} {row['dropped']:>4} "
                  f"{row['client_per_user']:>13.4f} {row['encode_per_user']:>13.4f} {row['server']:>9.3f} "
                  f"{row['plain_sum']:>11.4f} {row['up_kb_per_user']:>10.1f} {row['down_kb_per_user']:>12.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
