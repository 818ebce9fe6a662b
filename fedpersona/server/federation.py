"""The server side of a run: strategy over shared tensors, per-round records, the summary contract.

``run_federation`` is the whole loop on one screen: checkpoints opened (``server.resume.Checkpointing``),
the shared tensors' shapes, the recorder that screens and records every reply, the strategy, the grid,
then Flower's ``Strategy.start``, then the summary. With a checkpoint folder every finished round is saved
(shared adapter, strategy state, round); with ``resume`` the run continues after the last saved round:
initial arrays and strategy state from the checkpoint, the remaining rounds only, ``metrics.jsonl``
keeping the rows of the finished rounds.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedpersona.round.resident import resident_for
from fedpersona.round.user_store import UserStore
from fedpersona.model.allocator import release_free_memory
from fedpersona.config import SIMULATION_ONLY, RunConfig
from fedpersona.protocol import RUN_LINEAGE
from fedpersona.data.sources import count_users
from fedpersona.errors import RunFailed, UsageError
from fedpersona.model.adapters import Role
from fedpersona.model.loading import model_sha256
from fedpersona.display import QuietReporter
from fedpersona.server.deadline_grid import DeadlineGrid, WallClockRounds
from fedpersona.server.population_rounds import PopulationRounds
from fedpersona.server.user_grid import UserGrid
from fedpersona.server.recorder import RoundRecorder, attach_recorder, write_outputs
from fedpersona.server.reply_names import ReplyNames
from fedpersona.server.secure import SecureAggregationGrid, SecureSettings
from fedpersona.server.sampling import population_sampling, round_seed_sampling
from fedpersona.server.resume import Checkpointing
from fedpersona.privacy.user_level import user_level_report, wrap_strategy
from fedpersona.strategies.registry import build_strategy
from fedpersona.strategies.validation import ReplyScreen, ScreenSettings, TensorSpec


def make_strategy(config: RunConfig, recorder: RoundRecorder):
    """The configured strategy, managed by the run configuration and recording into ``recorder``."""
    strategy = build_strategy(
        config.strategy, config=config,
        fraction_train=config.fraction_train, fraction_evaluate=1.0,  # the recorder picks who evaluates
        min_train_nodes=config.min_users, min_evaluate_nodes=config.min_users,
        min_available_nodes=config.min_users,
    )
    if config.user_dp_noise > 0:
        users = count_users(config.data, num_users=config.num_users, test_fraction=config.test_fraction,
                            min_pairs=config.min_pairs)
        strategy = wrap_strategy(strategy, noise_multiplier=config.user_dp_noise, clipping_norm=config.user_dp_clip,
                                 num_sampled=sampled_per_round(config, users))
    return attach_recorder(strategy, recorder)


def secure_grid(grid: Grid, config: RunConfig, recorder: RoundRecorder) -> SecureAggregationGrid | None:
    """With ``secure-aggregation``, ``grid`` wrapped so that every training round is a SecAgg+ round whose
    protocol figures go into the round's row (``fedpersona.server.secure``); else None."""
    if not config.secure_aggregation:
        return None
    return SecureAggregationGrid(grid, SecureSettings.from_config(config),
                                 on_round=lambda report: recorder.train_notes.update({report.server_round: report.row()}))


def round_rules(config: RunConfig, shapes: SharedShapes, *, deployment: bool) -> PopulationRounds | WallClockRounds:
    """Who may be selected and what becomes of them: in a simulation the population on its simulated clock
    (``fedpersona.server.population_rounds``; the default uniform population changes nothing), in a
    deployment the round deadline and over-selection on the wall clock (``fedpersona.server.deadline_grid``).

    Raises:
        UsageError: a population other than uniform in a deployment (devices are real there), or with secure
            aggregation (not wired together yet).
    """
    if deployment:
        if config.population != "uniform":
            raise UsageError(f"population={config.population}: a population model is for simulations; in a "
                             "deployment the devices are real (leave population unset)")
        return WallClockRounds(config)
    if getattr(config, "secure_aggregation", False) and config.population != "uniform":
        raise UsageError(f"population={config.population} with secure-aggregation: the population's round decisions "
                         "are not wired into secure aggregation's rounds yet; run one of them at a time")
    return PopulationRounds(config, num_nodes=config.num_users + config.new_users, model_bytes=shapes.model_bytes)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (none if it is missing)."""
    import json

    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def sampled_per_round(config: RunConfig, num_users: int) -> int:
    """Users Flower's samplers pick per training round (FedAvg's rule: max(int(N * fraction), min))."""
    return max(int(num_users * config.fraction_train), config.min_users)


@dataclass(frozen=True)
class FederationResult:
    """What a run produced, kept in memory as well as written to ``out_dir``.

    Attributes:
        summary: the ``summary.json`` dict (the output contract's flat keys and more).
        rounds: the ``metrics.jsonl`` rows, one per finished round.
        per_user: the ``per_user.json`` rows: each training user's final accuracies.
        new_users: held-out (cold-start) users' final accuracies (``new_users.json``), empty without them.
    """

    summary: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    per_user: list[dict[str, Any]] = field(default_factory=list)
    new_users: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class SharedShapes:
    """The run's shared tensors at their initial values and the adapter sizes, from the resident model.

    The server trains nothing: it keeps these, not the model (hundreds of MB for a real LLM, beside every
    worker's copy). Same seed as every client: identical initial adapters."""

    initial: dict[str, Any]
    shared_count: int
    private_count: int
    model_bytes: int = 0  # the resident model's parameters (base and adapters): what a device must hold

    @classmethod
    def of(cls, config: RunConfig) -> SharedShapes:
        resident = resident_for(config, keep=False)
        # the layout's initial values, not the live tensors: a resident model this process keeps (an
        # in-process client, an earlier run of a notebook) holds whatever global it last loaded
        initial = {name: resident.adapters.initial[name].detach().cpu().clone() for name in resident.adapters.names(Role.SHARED)}
        out = cls(initial, resident.adapters.count(Role.SHARED),
                  resident.adapters.count(Role.PRIVATE),
                  sum(p.numel() * p.element_size() for p in resident.model.parameters()))
        del resident
        gc.collect()
        release_free_memory()
        return out

    @property
    def spec(self) -> TensorSpec:
        """What every reply, and a checkpoint resumed from, must match."""
        return TensorSpec.of(self.initial)


def message_config(config: RunConfig, *, deployment: bool, lineage: str) -> dict[str, Any]:
    """The run configuration as every train and evaluate message carries it.

    In deployment, devices read their own pairs, hardware and randomness: simulation-only settings stay on
    the server (a device declines a message carrying one), and the run lineage is added. Without num-users
    among them, the recorder and the clients treat no device as a held-out "new user" (device indices are
    hashes, not ranks)."""
    flat = config.to_flat()
    if not deployment and Path(config.population).suffix == ".toml":  # a worker may start in another folder
        flat["population"] = str(Path(config.population).resolve())
    if deployment:
        for key in SIMULATION_ONLY:
            flat.pop(key.replace("_", "-"), None)
        flat[RUN_LINEAGE] = lineage
    return flat


def seed_server_randomness(config: RunConfig, done: int) -> None:
    """Flower samples nodes with the ``random`` module: same seed, same users. Training samples are reseeded
    per round (``server.sampling``) over users listed in order (``server.user_grid``); this start seed covers
    the rest (a resumed run: a seed of its own, so it does not replay round 1's draws)."""
    random.seed(config.seed if not done else f"{config.seed}/resume/{done}")
    np.random.seed(config.seed + done)


def run_federation(grid: Grid, config: RunConfig, *, out_dir: str | Path | None = None,
                   reporter: Any = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
                   deployment: bool = False, pool_size: int = 1) -> FederationResult:
    """Run ``config.rounds`` rounds on ``grid``; write outputs to ``out_dir``; return what the run produced.

    The federated loop is Flower's ``Strategy.start``; around it: checkpoints (save every finished round to
    ``checkpoint_dir``; with ``resume`` continue after the last sound one), the recorder that screens and
    records every reply, and the grid users are reached through.

    Args:
        grid: Flower's grid (simulation or deployment).
        config: the validated run configuration.
        out_dir: where ``metrics.jsonl``, ``summary.json`` and ``per_user.json`` go (None: nowhere).
        reporter: the progress display (``fedpersona.display``; default quiet).
        checkpoint_dir: save every finished round there.
        resume: continue from the last checkpoint in ``checkpoint_dir``.
        deployment: users are real devices (their count is the number that reported, not the data's).
            Otherwise a simulation: the grid's nodes are a pool of workers (``pool_size`` of them, waited
            for before the first round) that train and evaluate cohorts of simulated users (``UserGrid``).
        pool_size: the simulation's worker nodes.

    Returns:
        The ``FederationResult``.

    Raises:
        UsageError: a checkpoint that cannot be resumed (before anything runs).
    """
    started = time.monotonic()
    reporter = reporter or QuietReporter()
    checkpoints = Checkpointing(config, checkpoint_dir, resume, out_dir)
    shapes = SharedShapes.of(config)
    checkpoints.verify(shapes.spec)  # a NaN or foreign checkpoint falls back to an earlier round, or is refused
    seed_server_randomness(config, checkpoints.done)
    recorder = RoundRecorder(num_rounds=config.rounds, eval_every=config.eval_every, out_dir=out_dir,
                             on_round=reporter.round_done, on_phase=reporter.phase,
                             screen=ReplyScreen(shapes.spec, ScreenSettings.from_config(config, shapes.shared_count)),
                             evaluate_fraction=config.evaluate_fraction, seed=config.seed,
                             per_user_rows=config.per_user_rows, names=ReplyNames(simulation=not deployment))
    strategy = make_strategy(config, recorder)
    round_seed_sampling(strategy, config.seed)  # sees true round numbers: resume_into's shift wraps it
    rounds = round_rules(config, shapes, deployment=deployment)  # the population's clock, or a deadline
    population_sampling(strategy, rounds)
    recorder.round_figures.append(rounds.row)
    initial = checkpoints.resume_into(strategy, recorder) or ArrayRecord(shapes.initial)
    if checkpoints.done and out_dir:
        rounds.resume_from(read_rows(Path(out_dir) / "metrics.jsonl"))
    messages = message_config(config, deployment=deployment, lineage=checkpoints.lineage())
    # a simulation's users are virtual nodes in user order (the seeded sampling picks the same users every
    # run) over a pool of worker nodes; their private state lives in a user store made for this run
    store = None if deployment else UserStore.create(checkpoint_dir)
    if store is not None and checkpoint_dir and not checkpoints.done:
        store.clear()  # a fresh run in a kept folder: no user starts from an earlier run's state
    run_grid = (DeadlineGrid(grid, rounds, on_reply=reporter.replies) if store is None else
                UserGrid(grid, num_users=config.num_users + config.new_users, cohort_size=config.cohort_size,
                         store=str(store.root), pool_size=pool_size, on_reply=reporter.replies, rounds=rounds))
    secure = secure_grid(run_grid, config, recorder)  # secure aggregation: the strategy gets the sum only
    run_grid = run_grid if secure is None else secure
    reporter.start(config.rounds)
    try:
        strategy.start(
            grid=run_grid,
            initial_arrays=initial,
            num_rounds=config.rounds - checkpoints.done,
            timeout=config.round_timeout,
            train_config=ConfigRecord(dict(messages)),
            evaluate_config=ConfigRecord(dict(messages)),
            evaluate_fn=checkpoints.hook(strategy, recorder, messages),
        )
    finally:
        reporter.stop()
        if store is not None and not checkpoint_dir:
            store.remove()  # kept beside the checkpoints: what a resumed run continues from
    summary = run_summary(config, recorder, shapes, deployment=deployment, seconds=time.monotonic() - started)
    summary.update(rounds.summary(recorder.rows, recorder.per_user()))  # simulated time, counts, groups
    if secure is not None:
        summary.update(secure.summary())
    if checkpoints.done:
        summary["resumed_from_round"] = checkpoints.done
    per_user = [{"user_index": u, **acc} for u, acc in recorder.per_user().items()]
    if out_dir:
        write_outputs(out_dir, summary, recorder.per_user())
    return FederationResult(summary, list(recorder.rows), per_user,
                            [{"user_index": u, **acc} for u, acc in sorted(recorder.last_new.items())])


def run_summary(config: RunConfig, recorder: RoundRecorder, shapes: SharedShapes, *, deployment: bool,
                seconds: float) -> dict[str, Any]:
    """The ``summary.json`` dict of a finished run (the output contract's keys first)."""
    num_users = (len(recorder.per_user()) if deployment else
                 count_users(config.data, num_users=config.num_users, test_fraction=config.test_fraction,
                             min_pairs=config.min_pairs))
    summary: dict[str, Any] = {
        "num_users": num_users,
        "rounds": config.rounds,
        "scheme": config.scheme,
        "strategy": config.strategy,
        **recorder.summary_stats(),
        "shared_parameters": shapes.shared_count,
        "private_parameters_per_user": recorder.private_parameters_per_user(shapes.private_count),
        "wall_seconds": round(seconds, 2),
        "model": config.model,
        # the base model's bits (sha256 of its weight files; the .gguf file's for GGUF): null where this
        # machine does not hold them (a deployment's server need not)
        "model_sha256": model_sha256(config.model),
        "data": "on-device preference memories" if deployment else config.data,
        "seed": config.seed,
        "evaluated_users": len(recorder.per_user()),
        # pair-level (local DP-SGD) and user-level (DP-FedAvg) guarantees: separate, each with its delta
        "pair_level_target_epsilon": config.dp_epsilon or None,
        "pair_level_delta": (config.dp_delta or "min(1e-5, 1/(10 n)) per user") if config.dp_epsilon else None,
        "pair_level_accountant": config.dp_accountant if config.dp_epsilon else None,
        "pair_level_planned_rounds": config.dp_rounds_planned if config.dp_epsilon else None,
        # std of the noise on each user's released pair count (its FedAvg weight); 0: every user weighed 1
        "pair_level_count_noise": config.count_noise if config.dp_epsilon else None,
        # settings a DP run took from the DP defaults because the user left them unset (RunConfig.with_dp_defaults)
        "dp_defaults_applied": config.dp_defaults_applied or None,
        # held-out accuracies are user data too: simulated users report them exactly (they are the experiment's
        # measurement); a device sends them only if its own policy allows (under DP by default it does not)
        "evaluation_replies": "device policy" if deployment else "exact (simulated users)",
    }
    # whose word epsilon_max is: the largest epsilon the replies reported (checked finite and >= 0, nothing more)
    summary["epsilon_max_source"] = None if summary.get("epsilon_max") is None else (
        "devices' own claims (their privacy ledgers; the server cannot verify them)" if deployment else
        "simulated users' privacy ledgers")
    summary.update(signal_keys(config, deployment))
    if config.user_dp_noise > 0:
        summary.update(user_level_report(
            noise_multiplier=config.user_dp_noise, num_sampled=sampled_per_round(config, num_users),
            num_users=num_users, rounds=config.rounds,
            delta=config.user_dp_delta or 1.0 / num_users ** 1.1))
    return summary


def signal_keys(config: RunConfig, deployment: bool) -> dict[str, Any]:
    """summary.json's ``signal_*`` keys: of a sample of the run's pairs, how many encode to the same token
    ids (cut at max-length / same at any length), the max-length that keeps them apart and the share of
    ``<unk>`` tokens (:mod:`fedpersona.model.signal`; cached, so a simulation checks once). None where
    nothing was checked: synthetic data, or a deployment (the pairs are on the devices)."""
    from fedpersona.model.signal import SignalReport, check_pair_file

    unchecked = {key: None for key in SignalReport("", 0, 0, 0).summary_keys()}
    if deployment or config.is_synthetic or not Path(config.data).is_file():
        return unchecked
    try:
        return check_pair_file(config.data, config.model, config.max_length, config.chat_template,
                               test_fraction=config.test_fraction, min_pairs=config.min_pairs).summary_keys()
    except UsageError:  # the run trained on this data and model: a failed check must not lose its summary
        return unchecked


def check_clients_answered(summary: dict[str, Any], out_dir: str | Path | None) -> None:
    """A run in which every training call failed trained nothing (declines are decisions, not failures):
    ``RunFailed`` with the first client error, so the exit code says so."""
    if summary.get("client_failures") and not summary.get("train_answers"):
        where = f" (outputs in {out_dir})" if out_dir else ""
        raise RunFailed(f"every client training call failed ({summary['client_failures']} client errors); the first: "
                        f"{summary.get('first_client_error')}{where}")
