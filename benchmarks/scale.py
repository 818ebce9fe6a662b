"""Scale: simulations of 100 to 10,000 users, side by side (issue 15). Not a test: it prints figures.

For each population it runs the real command line (``fedpersona simulate``: Ray, the Flower engine, a
pool of worker nodes training and evaluating cohorts of users) with about ``--trained`` users trained
per round, and reports, side by side:

* wall time of the whole run and of each round (from ``metrics.jsonl``); a middle round trains and
  evaluates about ``--trained`` users each, the last one evaluates every user (and runs the generation
  check on ``gen-users`` of them);
* users/s of the final evaluation (users evaluated / that round's seconds) and client-rounds/s of the
  training rounds;
* framework overhead: a middle round's wall time over the pure compute of the same client work (the same
  users trained and evaluated, one after another, in this process on one resident model);
* peak memory (RSS) of the whole process tree (the command, Ray and its workers), sampled every 0.5 s.

Usage::

    python benchmarks/scale.py --users 100 1000 10000 --rounds 3 --trained 10
    python benchmarks/scale.py --users 100 --rounds 3            # a quick look

Writes ``--out/scale.json`` beside the printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_simulation(users: int, rounds: int, trained: int, out: Path, extra: list[str]) -> dict:
    fraction = min(1.0, trained / users)
    cmd = [str(Path(sys.executable).with_name("fedpersona")), "simulate", "--users", str(users), "--rounds", str(rounds),
           "--fraction", f"{fraction:.6g}", "--set", "min-users=1", "--out", str(out), *extra]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0}
    watcher = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            peak["rss"] = max(peak["rss"], tree_rss(watcher))
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    thread.join()
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{users} users: the run failed (exit {proc.returncode}):\n{output[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ends = [r["wall_seconds"] for r in rows]
    round_seconds = [b - a for a, b in zip([0.0, *ends], ends)]
    summary = json.loads((out / "summary.json").read_text())
    return {"users": users, "wall_seconds": round(wall, 1), "round_seconds": [round(s, 2) for s in round_seconds],
            "rows": rows, "summary": summary, "peak_rss_gb": round(peak["rss"] / 2**30, 2), "fraction": fraction}


def pure_compute(users: int, trained: int, rounds: int, threads: int) -> float:
    """Seconds to train ``trained`` users and evaluate as many, one after another in this process on
    ``threads`` torch threads (a worker's share: Ray gives an actor of ``--num-cpus`` N that many threads):
    the client work of a middle round without any framework around it."""
    import torch

    torch.set_num_threads(threads)
    from fedpersona.round.evaluate import evaluate_round
    from fedpersona.round.resident import resident_for
    from fedpersona.round.stores import MemoryStore
    from fedpersona.round.train import train_round
    from fedpersona.round.users import population_user
    from fedpersona.config import RunConfig
    from fedpersona.model.adapters import Role

    config = RunConfig(num_users=users, rounds=rounds)
    resident = resident_for(config)
    shared = resident.adapters.tensors(Role.SHARED)
    picked = list(range(0, users, max(users // trained, 1)))[:trained]
    train_round(config, population_user(config, picked[0]), picked[0], 1, shared, MemoryStore())  # warm-up
    started = time.perf_counter()
    for index in picked:
        store = MemoryStore()
        train_round(config, population_user(config, index), index, 2, shared, store)
        evaluate_round(config, population_user(config, index), shared, store, index=index,
                       extras={"server-round": 2})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trained", type=int, default=10, help="users trained per round (about)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark-scale"))
    parser.add_argument("--set", action="append", default=[], help="extra `fedpersona simulate --set` settings")
    parser.add_argument("--num-cpus", type=int, default=1,
                        help="CPUs per worker (simulate --num-cpus); the machine's CPUs / this = workers. With "
                             "one worker (2 on a 2-core machine) the overhead compares like with like")
    args = parser.parse_args()
    extra = [f"--set={s}" for s in args.set] + ["--num-cpus", str(args.num_cpus)]
    workers = max(1, (os.cpu_count() or 1) // args.num_cpus)
    results = []
    for users in args.users:
        result = run_simulation(users, args.rounds, args.trained, args.out / f"users-{users}", extra)
        result["pure_compute_seconds"] = round(pure_compute(users, args.trained, args.rounds, args.num_cpus), 2)
        results.append(result)
        print(f"{users} users: {result['wall_seconds']} s, rounds {result['round_seconds']}", flush=True)
    first_middle = {r["users"]: (r["round_seconds"][1] if len(r["round_seconds"]) > 2 else r["round_seconds"][0])
                    for r in results}
    base = first_middle[results[0]["users"]]
    header = (f"{'users':>7} {'whole run s':>11} {'round s (middle)':>16} {'vs first':>8} {'final eval s':>12} "
              f"{'ms/user final':>13} {'users/s final':>13} {'client-rounds/s':>15} {'overhead':>8} {'peak GB':>7}")
    print(f"{workers} worker(s) of {args.num_cpus} CPU(s); overhead = middle round / the same client work "
          f"one after another in one process on {args.num_cpus} thread(s) - 1"
          + (" (negative: the workers run side by side)" if workers > 1 else ""))
    print(header)
    for r in results:
        middle, final = first_middle[r["users"]], r["round_seconds"][-1]
        trained = sum(row.get("train_replies", 0) for row in r["rows"])
        train_time = sum(r["round_seconds"][:-1]) or 1e-9
        r["middle_round_seconds"] = middle
        r["overhead"] = middle / r["pure_compute_seconds"] - 1
        r["final_ms_per_user"] = 1000 * final / r["users"]
        print(f"{r['users']:>7} {r['wall_seconds']:>11.1f} {middle:>16.1f} {middle / base:>7.2f}x {final:>12.1f} "
              f"{r['final_ms_per_user']:>13.1f} {r['users'] / final:>13.1f} {trained / train_time:>15.2f} "
              f"{r['overhead']:>+7.0%} {r['peak_rss_gb']:>7.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    for r in results:
        r.pop("rows")
    (args.out / "scale.json").write_text(json.dumps({"command": " ".join(sys.argv), "cpus": os.cpu_count(),
                                                     "workers": workers, "num_cpus_per_worker": args.num_cpus,
                                                     "results": results}, indent=2))
    print(f"json: {args.out / 'scale.json'}")


if __name__ == "__main__":
    main()
