"""Real models vs the embedded toy: memory and speed of a client-round, bounded log-probs vs full softmax.

For each model (default: the embedded model on ``synthetic:conflicting`` and SmolLM2-135M-Instruct on the
real-model scenario ``generated:styles``), each log-prob implementation runs in a fresh subprocess (so the
peak resident memory is that implementation's own) doing what a simulated node does: ``train_round`` then
``evaluate_round`` of the real client code (``fedpersona.round``) for ``--users`` users, one
client-round each. Printed side by side:

* train and evaluate seconds per client-round (the first includes the user's reference log-probs);
* training tokens per second (non-padding tokens through the model with autograd on, forward+backward);
* peak resident memory of the worker process (``ru_maxrss``);
* the ratio of the bounded implementation (``fedpersona.alignment.logprobs.sequence_logprobs``) to the
  straightforward full-softmax one (``full_softmax_logprobs``) at the same settings.

With ``--simulate``, it then runs ``fedpersona simulate`` for each model as its own process tree and
samples the memory of every process in it (driver, Ray's processes, every worker) every second: the
peak of the sum of their PSS (shared pages split between the processes that map them) is the whole run's
peak; the peak of the summed RSS (shared pages counted once per process) is printed beside it.

    .venv/bin/python benchmarks/real_models.py --out runs/real_models.json
    .venv/bin/python benchmarks/real_models.py --models smollm2-135m-instruct --simulate --users 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_DATA = {"embedded": "synthetic:conflicting", "smollm2-135m-instruct": "generated:styles"}
REAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2.toml"


def _config_for(model: str, args) -> dict:
    settings = {"model": model, "data": args.data or DEFAULT_DATA.get(model, "synthetic:conflicting"),
                "num_users": max(args.users, 2), "rounds": 1, "max_steps": args.steps, "min_steps": args.steps,
                "max_length": args.max_length, "eval_every": 1, "gen_prompts": 0,
                "max_train_pairs": args.pairs, "max_test_pairs": max(args.pairs // 2, 1)}
    if args.max_tokens:
        settings["max_tokens_per_batch"] = args.max_tokens
    return settings


# ---- one worker: a few client-rounds in this process ---------------------------------------------------
def worker(settings: dict, impl: str, users: int, config_file: str | None) -> dict:
    import torch

    from fedpersona.alignment import trainer
    from fedpersona.alignment.logprobs import causal_lm, full_softmax_logprobs
    from fedpersona.round.evaluate import evaluate_round
    from fedpersona.round.resident import resident_for
    from fedpersona.round.stores import MemoryStore
    from fedpersona.round.train import train_round
    from fedpersona.round.users import population_user
    from fedpersona.config import RunConfig
    from fedpersona.model.adapters import Role
    from fedpersona.simulations.launcher import prepare_config

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base = RunConfig.from_toml(config_file) if config_file else None
    config = prepare_config(RunConfig.from_flat(settings, base))
    if impl == "full":
        trainer.sequence_logprobs = full_softmax_logprobs  # every client path calls it through trainer
    resident = resident_for(config)
    trained_tokens = [0]

    def count(module, args, kwargs):
        if torch.is_grad_enabled():
            trained_tokens[0] += int(kwargs["attention_mask"].sum())

    causal_lm(resident.model).base_model.register_forward_pre_hook(count, with_kwargs=True)
    shared = resident.adapters.tensors(Role.SHARED)
    train_s, eval_s, tokens = [], [], 0
    for index in range(users):
        user = population_user(config, index)
        store = MemoryStore()
        trained_tokens[0] = 0
        start = time.perf_counter()
        result = train_round(config, user, index, 1, shared, store)
        train_s.append(time.perf_counter() - start)
        tokens += trained_tokens[0]
        start = time.perf_counter()
        evaluation = evaluate_round(config, user, result.shared or shared, store, index=index)
        eval_s.append(time.perf_counter() - start)
    return {"impl": impl, "model": config.model, "train_s": sum(train_s) / users, "eval_s": sum(eval_s) / users,
            "train_tokens_per_s": tokens / sum(train_s), "peak_rss_mb": _maxrss_mb(),
            "last_accuracy": evaluation.accuracies, "max_tokens_per_batch": config.max_tokens_per_batch,
            "max_length": config.max_length, "steps": config.max_steps}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_worker(model: str, impl: str, args) -> dict:
    payload = json.dumps({"settings": _config_for(model, args), "impl": impl, "users": args.users,
                          "config": str(REAL_CONFIG) if model != "embedded" and REAL_CONFIG.is_file() else None})
    out = subprocess.run([sys.executable, __file__, "--worker", payload], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {model}/{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the whole simulation: peak memory of the process tree --------------------------------------------
def run_memory_mb(root_pid: int) -> tuple[float, float]:
    """``(RSS sum, PSS sum)`` in MB over the run's processes: the driver's process tree plus any Ray process
    (Ray's daemons may be started detached, outside the driver's tree), each process counted once. The RSS
    sum counts a page shared by several processes (torch's libraries, mapped by every one) once per process;
    PSS (proportional set size, Linux smaps) splits it between them: the sum of PSS is the run's memory."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(root_pid)
        procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
            if proc.pid not in procs and ("ray" in (proc.info["name"] or "") or "/ray/" in line or "ray::" in line):
                procs[proc.pid] = proc
        except psutil.Error:
            pass
    rss = pss = 0
    for proc in procs.values():
        try:
            info = proc.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            pass
    return rss / 2**20, pss / 2**20


def run_simulation(model: str, args) -> dict:
    out_dir = Path(tempfile.mkdtemp(prefix="bench-real-"))
    cmd = [str(Path(sys.executable).parent / "fedpersona"), "simulate", "--model", model,
           "--data", args.data or DEFAULT_DATA.get(model, "synthetic:conflicting"), "--users", str(args.users),
           "--rounds", str(args.rounds), "--num-cpus", str(args.num_cpus), "--out", str(out_dir)]
    if model != "embedded" and REAL_CONFIG.is_file():
        cmd += ["--config", str(REAL_CONFIG)]
    cmd += [f"--set=max-length={args.max_length}"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0, 0.0]  # RSS sum, PSS sum
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss = run_memory_mb(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(1.0)  # reading smaps costs CPU: once a second

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    (out_dir / "console.txt").write_text(output)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"simulate {model} failed ({proc.returncode}):\n{output[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"model": model, "peak_rss_mb_all_processes": peak[0], "peak_pss_mb_all_processes": peak[1],
            "wall_s": time.monotonic() - start,
            "round_wall_s": [r["wall_seconds"] for r in rows], "out": str(out_dir),
            **{k: summary.get(k) for k in ("personalized_accuracy_mean", "global_accuracy_mean",
                                           "base_accuracy_mean", "num_users", "rounds")}}


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<24} {'log-probs':<10} {'train s/round':>13} {'eval s/round':>12} {'train tok/s':>11} "
             f"{'peak RSS MB':>11} {'time x full':>11} {'memory x full':>13}"]
    full = {r["model"]: r for r in rows if r["impl"] == "full"}
    for r in rows:
        ref = full.get(r["model"])
        t_ratio = (r["train_s"] + r["eval_s"]) / (ref["train_s"] + ref["eval_s"]) if ref else float("nan")
        m_ratio = r["peak_rss_mb"] / ref["peak_rss_mb"] if ref else float("nan")
        lines.append(f"{r['model']:<24} {r['impl']:<10} {r['train_s']:>13.2f} {r['eval_s']:>12.2f} "
                     f"{r['train_tokens_per_s']:>11.0f} {r['peak_rss_mb']:>11.0f} {t_ratio:>11.2f} {m_ratio:>13.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="embedded,smollm2-135m-instruct")
    parser.add_argument("--data", default=None, help="one data spec for every model (default: per model)")
    parser.add_argument("--users", type=int, default=2, help="client-rounds per worker / users of --simulate")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per client-round")
    parser.add_argument("--pairs", type=int, default=8, help="training pairs per user (half as many test pairs)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=0, help="max-tokens-per-batch (0: the config's)")
    parser.add_argument("--impls", default="bounded,full")
    parser.add_argument("--simulate", action="store_true", help="also run fedpersona simulate per model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-cpus", type=float, default=2.0, help="CPUs per simulated client (2: one actor)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(worker(job["settings"], job["impl"], job["users"], job["config"])))
        return
    rows = []
    for model in args.models.split(","):
        for impl in [i for i in args.impls.split(",") if i != "none"]:
            print(f"... {model} / {impl}", file=sys.stderr, flush=True)
            rows.append(run_worker(model, impl, args))
    if rows:
        print(table(rows))
    result = {"client_rounds": rows}
    if args.simulate:
        sims = []
        for model in args.models.split(","):
            print(f"... fedpersona simulate {model}", file=sys.stderr, flush=True)
            sims.append(run_simulation(model, args))
            s = sims[-1]
            print(f"simulate {model}: {s['num_users']} users, {s['rounds']} rounds, wall {s['wall_s']:.0f} s, "
                  f"peak memory of all processes {s['peak_pss_mb_all_processes']:.0f} MB PSS "
                  f"({s['peak_rss_mb_all_processes']:.0f} MB summed RSS), personalized "
                  f"{s['personalized_accuracy_mean']:.3f} global {s['global_accuracy_mean']:.3f}")
        result["simulations"] = sims
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
