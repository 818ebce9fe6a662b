"""Prove the CUDA paths: local DPO training, pair-level DP-SGD, evaluation and generation on a GPU.

Runs the Flower-free client round (the code a simulated or real client runs) on CPU and on CUDA with the
same users and seeds, and prints accuracy and time per path side by side. Usage:
    python benchmarks/gpu_check.py [--users 8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedpersona.alignment.evaluation import evaluate_user
from fedpersona.alignment.generation import generate
from fedpersona.alignment.trainer import train_local
from fedpersona.round.resident import resident_for
from fedpersona.config import RunConfig
from fedpersona.data.synthetic import PreferenceSimulator
from fedpersona.model.adapters import Role
from fedpersona.privacy.dp_training import plan_ledger, train_local_dp


def run(device: str, users: int, rounds: int, dp: bool) -> dict:
    config = RunConfig(device=device, dp_epsilon=8.0 if dp else 0.0, dp_delta=1e-5)
    resident = resident_for(config)
    sim = PreferenceSimulator("conflicting", users, 0)
    accs, start = [], time.perf_counter()
    for i in range(users):
        data = sim.user_data(i)
        resident.adapters.reset(Role.SHARED)
        resident.adapters.reset(Role.PRIVATE)
        ledger = plan_ledger(len(data.train), config.train_settings, config.dp_settings, rounds) if dp else None
        for r in range(rounds):
            if dp:
                train_local_dp(resident, data.train, config.train_settings, i * 100 + r, config.dp_settings, ledger)
            else:
                train_local(resident, data.train, config.train_settings, seed=i * 100 + r)
        accs.append(evaluate_user(resident, data.test, config.max_length)["personalized"])
    text = generate(resident, ["how do i get better at chess ?"])[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"device": device, "dp": dp, "users": users, "rounds": rounds,
            "personalized_accuracy_mean": sum(accs) / len(accs), "seconds": round(time.perf_counter() - start, 2),
            "param_device": str(next(resident.model.parameters()).device), "sample_generation": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [run(d, args.users, args.rounds, dp) for dp in (False, True) for d in devices]
    print(f"{'device':8} {'dp':5} {'acc':>6} {'seconds':>8}  param device")
    for r in rows:
        print(f"{r['device']:8} {str(r['dp']):5} {r['personalized_accuracy_mean']:6.3f} {r['seconds']:8.2f}  {r['param_device']}")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
