#!/usr/bin/env python
"""Run ``fedpersona simulate --ray-address`` on a real two-node Ray cluster on this machine, and show where
the simulation's actors ran.

Two ``ray start --block`` processes (a head and a worker node: two raylets, each with its own --temp-dir and
ports) make the cluster; ``fedpersona simulate --ray-address 127.0.0.1:PORT`` runs on it (only the CLI, so
this keeps working whatever the simulation does inside); then the cluster's actor table (GCS) says on which
node each of Flower's ``ClientAppActor``s ran. Exit 0 when they ran on both nodes, 1 when not, the
simulation's exit code when it failed, 3 when the cluster did not start.

The cluster is always stopped, and only it: never ``ray stop`` (it kills every Ray process on the machine,
matched by name). Each ``ray start`` runs in a new session whose process group holds everything it starts
(GCS, raylet, agents, workers; Ray's reaper kills that group when ``ray start`` ends); SIGTERM to it, then
SIGKILL to what is left of its group or still names this run's temp folder.

Each node has ``--node-cpus`` CPUs (1) and each simulated client asks ``--client-cpus`` (1): Flower sizes its
actor pool per node (floor(node CPUs / client CPUs), summed), so every node that fits a client holds one.
Ray gives 127.0.0.1 nodes the machine's own IP: both nodes show the same IP, told apart by node id.

    .venv/bin/python scripts/ray_cluster_loopback.py [--out DIR] [--report FILE] [-- SIMULATE-ARGS...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ACTOR_CLASS = "ClientAppActor"  # Flower's simulation actor (flwr.simulation.ray_transport.ray_actor)
# A run of about a minute: one optimizer step per user, no generation check, few test pairs.
FAST = ["--set", "max-steps=1", "--set", "gen-prompts=0", "--set", "max-test-pairs=4"]
STARTED = "Ray runtime started."


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a ``ray start`` child: SIGKILL when this script dies, even by SIGKILL (Linux). Ray fate-shares
    through the kernel too: the node's processes (GCS, raylet, agents; the raylet's workers) then die with it.
    (SIGTERM instead can leave a worker node's ``ray start`` hanging when the head goes at the same time.)"""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - elsewhere: the finally below still stops the nodes
        pass


class Node:
    """One ``ray start --block`` in its own session (process group = its pid)."""

    def __init__(self, name: str, args: list[str], root: Path, env: dict[str, str]):
        self.name, self.root = name, root
        self.log = root / f"ray-start-{name}.log"
        ports = free_ports(4)
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
               "--temp-dir", str(root / name), "--disable-usage-stats",
               # every port explicit: another Ray on this machine holds the defaults (52365, 10001, ...)
               "--dashboard-agent-listen-port", str(ports[0]), "--dashboard-agent-grpc-port", str(ports[1]),
               "--runtime-env-agent-port", str(ports[2]), "--metrics-export-port", str(ports[3]),
               "--min-worker-port", "0", "--max-worker-port", "0", "--object-store-memory", str(200 * 2**20),
               *args]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=root, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        self.pgid = self.proc.pid

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if STARTED in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"ray start ({self.name}) did not start (exit {self.proc.poll()}):\n{tail}")

    def processes(self) -> list[psutil.Process]:
        """Live processes of this node: its process group, or naming its temp folder."""
        mine = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = " ".join(proc.cmdline())
                if (os.getpgid(proc.pid) == self.pgid and "ray" in cmdline) or str(self.root / self.name) in cmdline:
                    mine.append(proc)
            except (psutil.Error, ProcessLookupError):
                pass
        return mine

    def stop(self, grace: float = 20.0) -> list[int]:
        """SIGTERM ``ray start`` (it stops its processes; its reaper SIGKILLs the group), then SIGKILL what is
        left. Returns the pids that had to be killed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 10
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
        return [p.pid for p in left]


def query(address: str, want_nodes: int = 0, timeout: float = 60.0) -> dict:
    """The cluster's nodes and actors, from a separate short-lived driver (``--_query``)."""
    cmd = [sys.executable, "-W", "ignore", str(Path(__file__).resolve()), "--_query", address,
           "--_want-nodes", str(want_nodes), "--_timeout", str(timeout)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60, cwd=REPO,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"cluster query failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _query_main(address: str, want_nodes: int, timeout: float) -> None:
    import ray
    import ray._private.state  # noqa: F401 - the actor table without the dashboard (minimal Ray: no state API)

    ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    try:
        deadline = time.monotonic() + timeout
        while True:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            if len(nodes) >= want_nodes or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        actors = list(ray._private.state.actors().values())  # noqa: SLF001
        out = {
            "nodes": [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "port": n["NodeManagerPort"],
                       "head": "node:__internal_head__" in n["Resources"], "cpus": n["Resources"].get("CPU", 0),
                       "gpus": n["Resources"].get("GPU", 0), "store": n["ObjectStoreSocketName"]} for n in nodes],
            "actors": [{"class": a["ActorClassName"], "state": a["State"], "node_id": a["Address"]["NodeID"],
                        "ip": a["Address"]["IPAddress"], "pid": a["Pid"], "job": a["JobID"]} for a in actors],
        }
    finally:
        ray.shutdown()
    print(json.dumps(out))


class CpuWatch(threading.Thread):
    """Each ClientAppActor process of our nodes, seen while the simulation runs (they exit with the job): its
    CPU seconds, whether it was seen running a task (Ray titles it ``ray::ClientAppActor.run()`` meanwhile),
    and which ``ray start`` (node) it descends from: the actors worked, on both nodes."""

    def __init__(self, nodes: list[Node]):
        super().__init__(daemon=True)
        self.groups = {n.pgid: n.name for n in nodes}
        self.seen: dict[int, dict] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.5):
            for proc in psutil.process_iter(["pid"]):
                try:
                    pgid = os.getpgid(proc.pid)
                    title = " ".join(proc.cmdline())  # Ray's title: ray::ClientAppActor, .run() while busy
                    if pgid not in self.groups or ACTOR_CLASS not in title:
                        continue
                    cpu = proc.cpu_times()
                    seen = self.seen.setdefault(proc.pid, {"group": self.groups[pgid], "busy": False})
                    seen["cpu_s"] = round(cpu.user + cpu.system, 1)
                    seen["busy"] = seen["busy"] or f"{ACTOR_CLASS}." in title
                except (psutil.Error, ProcessLookupError):
                    pass


def table(report: dict) -> str:
    rows = [("node id", "role", "node IP", "temp dir", "actors", "actor pids", "actor CPU s")]
    for node in report["nodes"]:
        acts = [a for a in report["actors"] if a["node_id"] == node["node_id"]]
        seen = [report["cpu"].get(str(a["pid"]), {}) for a in acts]
        cpu = [f"{s.get('cpu_s', '?')}{' (busy)' if s.get('busy') else ''}" for s in seen]
        rows.append((node["node_id"][:16], "head" if node["head"] else "worker", node["ip"],
                     node.get("temp_dir", "?"), str(len(acts)), ",".join(str(a["pid"]) for a in acts) or "-",
                     ",".join(cpu) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cluster-loopback"), help="simulate's output folder")
    parser.add_argument("--report", type=Path, help="also write the nodes/actors report here (JSON)")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--node-cpus", type=int, default=1, help="CPUs of each Ray node")
    parser.add_argument("--client-cpus", type=float, default=1.0, help="simulate --num-cpus (per client)")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' temp folder (Ray's logs)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the simulation may take")
    parser.add_argument("--_query", help=argparse.SUPPRESS)
    parser.add_argument("--_want-nodes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--_timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("simulate_args", nargs="*", help="more `fedpersona simulate` arguments (after --)")
    args = parser.parse_args(argv)
    if args._query:
        _query_main(args._query, args._want_nodes, args._timeout)
        return 0

    # SIGTERM (a test's timeout, a CI cancel) unwinds through the finally below, which stops the cluster
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="fprc-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    gcs_port, client_port = free_ports(2)
    address = f"127.0.0.1:{gcs_port}"
    nodes: list[Node] = []
    sim = None
    code, ok = 3, False
    t0 = time.monotonic()
    try:
        nodes.append(Node("head", ["--head", "--port", str(gcs_port), "--num-cpus", str(args.node_cpus),
                                   "--include-dashboard", "false", "--ray-client-server-port", str(client_port)],
                          root, env))
        nodes[0].wait_started(120)
        nodes.append(Node("worker", ["--address", address, "--num-cpus", str(args.node_cpus)], root, env))
        nodes[1].wait_started(120)
        before = query(address, want_nodes=2)
        if len(before["nodes"]) < 2:
            raise RuntimeError(f"the worker node did not join: {before['nodes']}")
        print(f"cluster up at {address}: {len(before['nodes'])} nodes, {time.monotonic() - t0:.1f}s; "
              f"Ray's logs in {root}", flush=True)

        args.out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "fedpersona.cli", "simulate", "--ray-address", address,
               "--users", str(args.users), "--rounds", str(args.rounds), "--num-cpus", str(args.client_cpus),
               *FAST, "--out", str(args.out), *args.simulate_args]
        print("$ " + " ".join(cmd[1:]), flush=True)
        watch = CpuWatch(nodes)
        watch.start()
        t1 = time.monotonic()
        sim = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,  # SIGTERM: it stops cleanly
                               env={**os.environ, "OMP_NUM_THREADS": env["OMP_NUM_THREADS"]},
                               preexec_fn=lambda: _die_with_parent(signal.SIGTERM))
        sim_rc = sim.wait(args.timeout)
        sim_s = time.monotonic() - t1
        watch.halt.set()
        watch.join()

        after = query(address)
        temp = {str(root / n.name): n.name for n in nodes}
        for node in after["nodes"]:
            node["temp_dir"] = next((name for path, name in temp.items() if node["store"].startswith(path)), "?")
        actors = [a for a in after["actors"] if a["class"] == ACTOR_CLASS]
        on = {a["node_id"] for a in actors}
        ok = sim_rc == 0 and len(after["nodes"]) == 2 and on == {n["node_id"] for n in after["nodes"]}
        report = {"address": address, "simulate_rc": sim_rc, "simulate_seconds": round(sim_s, 1),
                  "nodes": after["nodes"], "actors": actors, "cpu": {str(k): v for k, v in watch.seen.items()},
                  "actors_on_both_nodes": ok, "out": str(args.out.resolve()),
                  # and each node's actor was seen running a task (not only started by the pool)
                  "worked_on_both_nodes": {v["group"] for v in watch.seen.values() if v["busy"]} == {"head", "worker"}}
        print(f"\nsimulate exit {sim_rc} in {sim_s:.1f}s; {len(actors)} {ACTOR_CLASS}s on "
              f"{len(on)} of {len(after['nodes'])} nodes:")
        print(table(report))
        if args.report:
            report["wall_seconds"] = round(time.monotonic() - t0, 1)
            args.report.write_text(json.dumps(report, indent=2))
        code = 0 if ok else (sim_rc or 1)
        if not ok:
            print(f"FAIL: the {ACTOR_CLASS}s did not run on both nodes" if sim_rc == 0
                  else f"FAIL: simulate exited {sim_rc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - a cluster that did not start: say why, exit 3
        print(f"FAIL: {exc}", file=sys.stderr)
    finally:
        if sim is not None and sim.poll() is None:
            sim.terminate()
            try:
                sim.wait(30)
            except subprocess.TimeoutExpired:
                sim.kill()
        killed = [pid for node in reversed(nodes) for pid in node.stop()]
        left = [p.pid for node in nodes for p in node.processes()]
        print(f"cluster stopped ({len(nodes)} nodes{f', {len(killed)} processes SIGKILLed' if killed else ''}"
              f"{f', STILL RUNNING: {left}' if left else ''}); total {time.monotonic() - t0:.1f}s", flush=True)
        if ok and not args.keep and not left:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"Ray's logs kept in {root}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
