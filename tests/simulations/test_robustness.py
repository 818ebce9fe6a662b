"""One malicious user in a real Flower simulation on Ray: the run completes, its reply is rejected with
the reason, and the accuracies stay within 0.03 of the clean run (issue 11's acceptance).

What "clean" means. The clean run is the same run with that user honest. A screened attack run is
exactly the run in which that user's replies never reach aggregation (asserted: all eight attacks give
identical per-user accuracies), so it differs from the clean run by that user's share of each round's
FedAvg average (its pair count over the round's total). How much that moves held-out accuracy depends on
the population: with 2 local steps the implicit-reward margins are small and a few pairs flip. Measured
over seeds on 8 users (2 rounds, 2 steps): up to 0.08 in ``synthetic:conflicting``, whose global model
sits at chance by design and follows whichever persona has more weight; up to 0.03 in
``synthetic:low-disagreement`` with 16 test pairs a user; 0.010 here (all 24 test pairs a user, seed 3,
whose user 0 holds 8% of the pairs). The tolerance is the issue's; the point of the test is the other
half: unscreened, the same NaN reply takes the accuracy to 0 (asserted too).

All runs share one simulation (``simulate_session``: one Ray start, warm actors): 8 users all trained
every round, 2 rounds, 2 local steps, evaluation after round 2 only, no generation check. The resume
checks (a checkpoint full of NaN) run without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedpersona.config import RunConfig
from fedpersona.errors import UsageError
from fedpersona.server.checkpoint import load_checkpoint, save_checkpoint, sound_checkpoint
from fedpersona.strategies.validation import TensorSpec

BASE = RunConfig(num_users=8, rounds=2, fraction_train=1.0, min_users=2, epochs=1, min_steps=2, max_steps=2,
                 eval_every=2, gen_prompts=0, data="synthetic:low-disagreement", seed=3)
REASON = {"nan": "non-finite", "inf": "non-finite", "wrong-shape": "wrong-shape",
          "missing-key": "missing-key", "extra-key": "extra-key", "weight-huge": "bad-weight",
          "weight-negative": "bad-weight"}
RUNS = {
    "clean": BASE,
    **{attack: BASE.replace(attack=attack, attack_users=1) for attack in REASON},
    "scale": BASE.replace(attack="scale", attack_users=1),  # x1e6: clipped, not rejected (bounded influence)
    "fedmedian-clean": BASE.replace(strategy="FedMedian"),
    "fedmedian-nan": BASE.replace(strategy="FedMedian", attack="nan", attack_users=1),
    "unvalidated-nan": BASE.replace(attack="nan", attack_users=1, validate_replies=False),
}
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from fedpersona.simulations.session import simulate_session

    out = tmp_path_factory.mktemp("robustness")
    dirs = [out / name for name in RUNS]
    results = simulate_session(list(RUNS.values()), dirs)
    return {name: (result, folder) for name, result, folder in zip(RUNS, results, dirs, strict=True)}


def _run(session, name):
    result, folder = session[name]
    if isinstance(result, BaseException):
        pytest.fail(f"run {name} failed: {type(result).__name__}: {result}")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def _close(summary, clean, tolerance=TOLERANCE):
    for key in ("personalized_accuracy_mean", "global_accuracy_mean"):
        assert abs(summary[key] - clean[key]) <= tolerance, (key, summary[key], clean[key])


def _per_user(session, name):
    return (session[name][1] / "per_user.json").read_text()


@pytest.mark.parametrize("attack", sorted(REASON))
def test_one_malicious_user_is_rejected_and_the_run_stays_close_to_clean(session, attack):
    summary, rows = _run(session, attack)
    clean, _ = _run(session, "clean")
    reason = REASON[attack]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:  # the malicious user's reply, every round, and nobody else's
        assert row["train_rejected"] == 1 and row["train_rejected_reasons"] == {reason: 1}
        assert row["train_replies"] == BASE.num_users - 1
    assert summary["rejected_replies"] == BASE.rounds and summary["rejected_reasons"] == {reason: BASE.rounds}
    assert summary["evaluated_users"] == BASE.num_users
    _close(summary, clean)


def test_a_boosted_update_is_clipped_to_the_bound_and_kept(session):
    """An update x1e6 is one the server bounds, not one that cannot be honest: clipped every round, never
    rejected, and the run stays close to the clean one (the attacker's direction is its honest one)."""
    summary, rows = _run(session, "scale")
    assert summary["rejected_replies"] == 0 and summary["clipped_replies"] >= BASE.rounds
    assert all(r["train_clipped"] >= 1 and r["train_replies"] == BASE.num_users for r in rows)
    assert all(r["update_norm_bound"] is not None and r["update_norm_bound"] > 0 for r in rows)
    _close(summary, _run(session, "clean")[0])


def test_a_rejected_reply_has_no_effect_whatever_it_carried(session):
    """Every screened attack run is the same run: the content of the dropped reply changes nothing."""
    outcomes = {_per_user(session, attack) for attack in REASON}
    assert len(outcomes) == 1


def test_the_clean_run_rejects_nothing(session):
    summary, rows = _run(session, "clean")
    assert summary["rejected_replies"] == 0 and summary["rejected_reasons"] == {}
    assert summary["clipped_replies"] == 0  # honest updates stay under the bound
    assert all(r["train_rejected"] == 0 and r["train_replies"] == BASE.num_users for r in rows)
    assert 0.0 < summary["global_accuracy_mean"] <= 1.0


def test_fedmedian_no_longer_passes_nan(session):
    summary, rows = _run(session, "fedmedian-nan")
    assert summary["rejected_reasons"] == {"non-finite": BASE.rounds}
    _close(summary, _run(session, "fedmedian-clean")[0])


def test_without_validation_the_nan_attack_does_damage(session):
    """The attack is real: unscreened, one NaN reply ruins the global model (or the run)."""
    result, folder = session["unvalidated-nan"]
    clean, _ = _run(session, "clean")
    if isinstance(result, BaseException):
        return
    assert result["rejected_replies"] == 0
    assert result["global_accuracy_mean"] is None or result["global_accuracy_mean"] < clean["global_accuracy_mean"] - 0.1


# ---------------------------------------------------------------------------------------------- resume

SPEC_ARRAYS = {"w": np.zeros((2, 3), dtype=np.float32), "v": np.ones(4, dtype=np.float32)}


class _Strategy:  # strategy_state() needs only instance attributes
    def __init__(self, momentum: np.ndarray) -> None:
        self.momentum = momentum


def _save(folder: Path, server_round: int, arrays: dict[str, np.ndarray], momentum: float = 0.0) -> None:
    save_checkpoint(folder, server_round, ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    _Strategy(np.full(3, momentum)), config={"strategy": "FedAvg"})


def test_a_nan_checkpoint_falls_back_to_the_previous_round(tmp_path, caplog):
    spec = TensorSpec.of(ArrayRecord({k: Array(v) for k, v in SPEC_ARRAYS.items()}))
    _save(tmp_path, 1, SPEC_ARRAYS)
    _save(tmp_path, 2, {**SPEC_ARRAYS, "w": np.full((2, 3), np.nan, dtype=np.float32)})
    latest = load_checkpoint(tmp_path)
    assert latest.round == 2
    with caplog.at_level("WARNING"):
        chosen = sound_checkpoint(tmp_path, latest, spec)
    assert chosen.round == 1 and np.isfinite(chosen.arrays["w"].numpy()).all()
    assert "round-00002" in caplog.text and "non-finite" in caplog.text and "round 1" in caplog.text


@pytest.mark.parametrize("bad,problem", [
    ({"w": np.full((2, 3), np.nan, dtype=np.float32)}, "non-finite"),
    ({"w": np.zeros((3, 2), dtype=np.float32)}, "wrong-shape"),
    ({"x": np.zeros(1, dtype=np.float32)}, "extra-key"),
])
def test_a_bad_checkpoint_without_a_sound_earlier_round_is_refused(tmp_path, bad, problem):
    spec = TensorSpec.of(ArrayRecord({k: Array(v) for k, v in SPEC_ARRAYS.items()}))
    _save(tmp_path, 1, {**SPEC_ARRAYS, **bad})
    with pytest.raises(UsageError, match=rf"round-00001: checkpoint cannot be resumed .*\({problem}\).*start afresh"):
        sound_checkpoint(tmp_path, load_checkpoint(tmp_path), spec)


def test_a_nan_strategy_state_is_refused_too(tmp_path):
    spec = TensorSpec.of(ArrayRecord({k: Array(v) for k, v in SPEC_ARRAYS.items()}))
    _save(tmp_path, 1, SPEC_ARRAYS, momentum=np.inf)
    with pytest.raises(UsageError, match="strategy state 'momentum' holds NaN or Inf"):
        sound_checkpoint(tmp_path, load_checkpoint(tmp_path), spec)


def test_resume_refuses_a_checkpoint_of_nan_tensors_before_any_round(tmp_path):
    """The server's own path: run_federation checks the checkpoint against the model's shared tensors."""
    from fedpersona.round.resident import resident_for
    from fedpersona.model.adapters import Role
    from fedpersona.server.federation import run_federation

    shared = {k: np.full(tuple(v.shape), np.nan, dtype=np.float32)
              for k, v in resident_for(BASE, keep=False).adapters.tensors(Role.SHARED).items()}
    _save(tmp_path, 1, shared)
    with pytest.raises(UsageError, match="checkpoint cannot be resumed .*non-finite"):
        run_federation(None, BASE, checkpoint_dir=tmp_path, resume=True)  # refused before the grid is used


def test_rejection_totals_survive_a_resume():
    from fedpersona.server.recorder import RoundRecorder
    from fedpersona.server.resume import recorder_totals, restore_recorder_totals

    before = RoundRecorder(num_rounds=4, eval_every=4, out_dir=None)
    before.rejected_reasons, before.declined_reasons = {"non-finite": 2}, {"new-user": 3}
    before.last_eval = {3: {"personalized": 0.5, "global": 0.5, "base": 0.5}}
    after = RoundRecorder(num_rounds=4, eval_every=4, out_dir=None)
    restore_recorder_totals(after, json.loads(json.dumps(recorder_totals(before))))  # through state.json
    stats = after.summary_stats()
    assert stats["rejected_replies"] == 2 and stats["rejected_reasons"] == {"non-finite": 2}
    assert stats["declined_reasons"] == {"new-user": 3} and list(after.last_eval) == [3]
