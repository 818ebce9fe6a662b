"""`fedpersona simulate --ray-address` on a real two-node Ray cluster (two raylets on this machine, started
with `ray start`): the run completes and Flower's ClientAppActors ran, and worked, on both nodes.

About a minute. Runs by default and never skips: a machine that cannot start the cluster fails it, with the
script's reason. It starts its own cluster (own temp folder and ports) and stops only that one, so other Ray
instances on the machine are left alone (scripts/ray_cluster_loopback.py says how).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # registered in tests/deployment/conftest.py: "runs by default"

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ray_cluster_loopback.py"


def test_simulate_on_a_two_node_cluster_runs_actors_on_both_nodes(tmp_path: Path):
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--report", str(report_path),
                             "--users", "4", "--rounds", "1", "--timeout", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        output, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its cluster on SIGTERM (never SIGKILL it first)
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"the cluster run took over 420 s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_users"] == 4 and summary["rounds"] == 1

    report = json.loads(report_path.read_text())
    assert report["simulate_rc"] == 0
    nodes = report["nodes"]
    assert len(nodes) == 2 and sorted(n["head"] for n in nodes) == [False, True], nodes
    by_node = {n["node_id"]: [a for a in report["actors"] if a["node_id"] == n["node_id"]] for n in nodes}
    assert all(len(actors) >= 1 for actors in by_node.values()), by_node  # the cluster's actor table (GCS)
    assert report["actors_on_both_nodes"]
    assert report["worked_on_both_nodes"], report["cpu"]  # each node's actor was seen running a task
    # and the processes' own ancestry agrees with the actor table: each ran under its node's `ray start`
    for node in nodes:
        groups = {report["cpu"][str(a["pid"])]["group"] for a in by_node[node["node_id"]] if str(a["pid"]) in report["cpu"]}
        assert groups <= {node["temp_dir"]}, (node, groups)
    assert "STILL RUNNING" not in output, output[-2000:]  # the script stopped every process of its cluster
