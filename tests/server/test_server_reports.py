"""What the server tells a person (issue 23, items 5 and 7, server part): the round a resume really starts
from, whose word ``epsilon_max`` is, round lines that name users and say why, waiting lines said once."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpersona.config import RunConfig
from fedpersona.display import ConsoleReporter, QuietReporter, set_apart
from fedpersona.server.checkpoint import save_checkpoint


class _NoState:
    pass


def test_a_resumed_server_names_the_round_it_really_resumes_from(tmp_path: Path):
    """Round 2's checkpoint holds NaN: the ServerApp falls back to round 1 (``Checkpointing.verify``), and
    ``fedpersona server`` said "resuming after round 2" (it loaded the checkpoint without that check)."""
    from fedpersona.deploy.server import ServerOptions
    from fedpersona.server.federation import SharedShapes

    config = RunConfig(rounds=5)
    initial = SharedShapes.of(config).initial
    sound = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in initial.items()})
    broken = ArrayRecord({k: Array(np.full(tuple(v.shape), np.nan, np.float32)) for k, v in initial.items()})
    for server_round, arrays in ((1, sound), (2, broken)):
        save_checkpoint(tmp_path / "checkpoints", server_round, arrays, _NoState(), config=config.to_flat(),
                        num_rounds=5)
    options = ServerOptions(state=tmp_path, insecure=True, resume=True)
    _, checkpoint = options.check(config)
    assert checkpoint.round == 1


def test_the_summary_says_whose_word_epsilon_max_is():
    from fedpersona.server.federation import SharedShapes, run_summary
    from fedpersona.server.recorder import RoundRecorder

    shapes = SharedShapes(initial={}, shared_count=10, private_count=2)
    recorder = RoundRecorder(num_rounds=1, eval_every=1, out_dir=None)
    config = RunConfig(num_users=4)
    assert run_summary(config, recorder, shapes, deployment=False, seconds=1.0)["epsilon_max_source"] is None
    recorder.epsilons.append(3.0)
    assert "simulated" in run_summary(config, recorder, shapes, deployment=False, seconds=1.0)["epsilon_max_source"]
    claimed = run_summary(config, recorder, shapes, deployment=True, seconds=1.0)["epsilon_max_source"]
    assert "devices' own claims" in claimed and "cannot verify" in claimed


ROW = {"round": 3, "train_replies": 14, "wall_seconds": 9.0, "train_rejected_reasons": {"non-finite": 1, "bad-weight": 1},
       "train_rejected_by": [["user 7", "non-finite"], ["user 12", "bad-weight"]], "train_declined_reasons": {},
       "eval_rejected_reasons": {}, "train_clipped": 2, "train_weight_capped": 1}


def test_the_round_line_names_users_and_says_why(capsys):
    assert set_apart(ROW) == ("rejected 2 (non-finite 1: user 7; bad-weight 1: user 12)  clipped 2  "
                              "weight-capped 1")
    reporter = ConsoleReporter(unit="devices")
    reporter.live = False  # off a terminal: one line per round on stderr
    reporter.start(5)
    reporter.round_done(ROW)
    line = capsys.readouterr().err
    assert "non-finite 1: user 7" in line and "node" not in line


def test_waiting_lines_are_said_once_per_change(tmp_path: Path, caplog):
    """Flower logs "Waiting for nodes to connect" every second while devices are missing: the server's log
    and its progress lines say each count once."""
    from fedpersona.deploy.server import RunWatch

    log = tmp_path / "run.log"
    waiting = "INFO :      Waiting for nodes to connect: {} connected (minimum required: 2)."
    log.write_text("\n".join([waiting.format(0)] * 30 + [waiting.format(1)] * 20 +
                             ["INFO :      [ROUND 1/2]"]) + "\n")
    with caplog.at_level(logging.INFO):
        watch = RunWatch(tmp_path / "missing-yet.log", None, QuietReporter())
        watch.run_log.path = log
        watch.run_log.offset = 0
        watch.poll()
    copied = [r.getMessage() for r in caplog.records if r.name == "serverapp"]
    assert copied == [waiting.format(0), "(the waiting line above came 29 more times)", waiting.format(1),
                      "(the waiting line above came 19 more times)", "INFO :      [ROUND 1/2]"]
    progress = [r.getMessage() for r in caplog.records if r.name == "fedpersona.progress"]
    assert progress == ["waiting for 2 devices: 0 connected", "waiting for 2 devices: 1 connected"]


def test_the_end_table_says_whose_epsilon_and_what_was_bounded():
    from rich.console import Console

    from fedpersona.display import summary_table

    summary = {"num_users": 4, "rounds": 2, "scheme": "split", "strategy": "FedAvg", "shared_parameters": 10,
               "private_parameters_per_user": 2, "bytes_up_per_client_round": 40.0, "wall_seconds": 1.0,
               "epsilon_max": 7.5, "epsilon_max_source": "devices' own claims (their privacy ledgers; ...)",
               "clipped_replies": 2, "weight_capped_replies": 1}
    console = Console(width=140, record=True)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "7.50 (the devices' own claims)" in text and "clipped 2, weight-capped 1" in text
