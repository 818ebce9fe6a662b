"""A stopped simulation resumes where it stopped, to the same results as a run never stopped; every
simulation writes its per-round plot and feeds an experiment tracker round by round."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

SMALL = ["--users", "4", "--rounds", "3", "--fraction", "1.0", "--set", "max-steps=2", "--set", "gen-prompts=0",
         "--seed", "3", "--quiet"]


def fedpersona(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("fedpersona")), *args]


def test_a_killed_simulation_resumes_to_the_same_results(tmp_path: Path):
    straight = subprocess.run(fedpersona("simulate", *SMALL, "--out", str(tmp_path / "straight")),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "stopped"
    proc = subprocess.Popen(fedpersona("simulate", *SMALL, "--out", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "round-00001").is_dir():  # round 1 finished and saved
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped (SIGTERM)" in err, err
    assert not (out / "summary.json").exists()
    resumed = subprocess.run(fedpersona("simulate", *SMALL, "--out", str(out), "--resume"), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] >= 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]  # the finished rounds kept, none repeated
    # the users' private state resumed too: the same accuracies, user by user, as the run never stopped
    assert (out / "per_user.json").read_text() == (tmp_path / "straight" / "per_user.json").read_text()
    assert (out / "accuracy_per_round.png").stat().st_size > 1000


def test_resume_without_a_checkpoint_is_one_line(tmp_path: Path):
    done = subprocess.run(fedpersona("simulate", *SMALL, "--out", str(tmp_path / "none"), "--resume"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no checkpoint to resume from" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_tensorboard_receives_every_round(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import fedpersona as fp

    result = fp.simulate(num_users=3, rounds=2, fraction_train=1.0, max_steps=2, gen_prompts=0,
                         tracker="tensorboard", out_dir=tmp_path / "out")
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    series = events.Scalars("personalized_accuracy_mean")
    assert [e.step for e in series] == [1, 2]
    import numpy as np  # TensorBoard stores float32

    assert [e.value for e in series] == [float(np.float32(r["personalized_accuracy_mean"])) for r in result.rounds]


def test_an_unknown_tracker_is_one_line(tmp_path: Path):
    done = subprocess.run(fedpersona("simulate", *SMALL, "--set", "tracker=mlflow-nope", "--out", str(tmp_path / "x")),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "tracker mlflow-nope: unknown" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "x" / "fedpersona.log").exists()
