"""One typed run configuration, validated in one place.

Sources merge in this order (later wins): defaults, a TOML file (``--config``), Flower's run config
(``[tool.flwr.app.config]`` or ``flwr run --run-config``), CLI flags. Keys may be spelled with dashes or
underscores. The whole configuration travels to clients inside each Flower message as a flat
ConfigRecord, so a client needs nothing but the message to do its part.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedpersona.alignment.losses import LOSSES
from fedpersona.alignment.trainer import TrainSettings
from fedpersona.errors import UsageError
from fedpersona.privacy.accountant import MAX_DELTA

Scalar = str | int | float | bool
GENERATED_PREFIX = "generated:"  # pair files the run's own model writes once (fedpersona/simulations/styles.py)
GENERATED_SCENARIOS = ("styles",)
# Settings only a simulation may set: a real device reads its own pairs, hardware and randomness. A
# deployment server leaves them out of its messages; a device declines a message that carries one
# (fedpersona.client.policy). Keys in underscore spelling.
SIMULATION_ONLY = ("data", "num_users", "dirichlet_alpha", "test_fraction", "max_train_pairs", "max_test_pairs",
                   "new_users", "new_user_shots", "new_user_steps", "gen_prompts", "gen_max_tokens",
                   "gen_temperature", "gen_users", "cohort_size", "cohort_batching", "run_tag", "dp_reproducible",
                   "device", "attack", "attack_users", "attack_rounds", "attack_scale")
# What works under pair-level DP (configs/dp-pal.toml, measured in README "Privacy"): settings a user did
# not set take these values when DP is on. PAL's private part is 2 mixture logits instead of a LoRA head the
# noise drowns; group-wise clipping gives the prototypes most of the clip norm; a small random start keeps
# the softmax movable by noisy gradients; larger steps let the signal accumulate within the planned rounds.
DP_DEFAULTS: dict[str, Scalar] = {"scheme": "pal", "pal_init_std": 0.08, "lr": 1e-2, "shared_lr": 3e-3,
                                  "dp_private_clip_share": 0.2}
AUTO_COUNT_NOISE = 40.0  # dp_count_noise -1: std = this / epsilon (5 pairs at epsilon 8; ~1% more DP-SGD noise)


@dataclass(frozen=True)
class RunConfig:
    # what to run
    model: str = "embedded"  # base model: embedded, smollm2-135m-instruct, an HF id or folder, a .gguf file
    data: str = "synthetic:conflicting"  # "synthetic:<scenario>" or a JSONL pair file
    scheme: str = "split"  # personalization scheme: split, global, local, fedsa, ffa, finetune, pal
    strategy: str = "FedAvg"  # a Flower strategy name or package.module:Class
    strategy_args: str = ""  # "key=value,key=value", parsed and typed by the strategy registry
    # the federation
    num_users: int = 32  # simulated users of a synthetic scenario (a pair file brings its own users)
    rounds: int = 15  # federated rounds
    fraction_train: float = 0.5  # fraction of the users trained each round
    eval_every: int = 1  # evaluate every k rounds (and always after the last round, then every user)
    # fraction of the users evaluated on an evaluation round before the last (a seeded sample; the final
    # evaluation takes every user). 0: the same as fraction-train, so a round evaluates about as many as it trains
    fraction_evaluate: float = 0.0
    min_users: int = 2  # users (devices) a round needs before it starts
    round_timeout: float = 3600.0  # seconds a round waits for replies
    seed: int = 0  # seed of users, sampling and initialisation
    # the data
    dirichlet_alpha: float = -1.0  # < 0: the scenario's own value
    test_fraction: float = 0.2  # for pair files whose rows carry no split
    min_pairs: int = 4  # users with fewer pairs are left out (a device: refused)
    # a fixed workload per simulated user on slow hardware: at most this many training / test pairs of each
    # user, a seeded sample (0: all). Applies to simulations; a device always uses its own memory
    max_train_pairs: int = 0  # at most this many training pairs per simulated user (0: all)
    max_test_pairs: int = 0  # at most this many test pairs per simulated user (0: all)
    # adapters
    shared_rank: int = 8  # LoRA rank of the shared adapter
    private_rank: int = 2  # a small private head generalises from few pairs (rank 8 overfits them)
    pal_prototypes: int = 2  # scheme pal (PAL, arXiv 2406.08469): shared prototype adapters of rank shared-rank
    # std of a pal user's first mixture logits (x10 effective): breaks the prototypes' symmetry; under DP
    # use a small one (0.08): a decisive random start saturates the softmax and noisy gradients cannot undo it
    pal_init_std: float = 0.25
    # new users (cold start): extra users held out of federated training; at the final evaluation each
    # fits only its private part on its first new-user-shots training pairs (fedpersona.client.local)
    new_users: int = 0
    new_user_shots: int = 8  # training pairs a new user fits its personal part on
    new_user_steps: int = 32  # optimizer steps of that fit (it cycles the k pairs)
    # generation check at the final evaluation (synthetic data only): held-out prompts per user, 0: off
    gen_prompts: int = 8  # held-out prompts per user of the final generation check (0: off)
    gen_max_tokens: int = 72  # tokens generated per prompt in that check
    gen_temperature: float = 0.7  # sampling temperature of that check (0: greedy); same seed for both models
    gen_users: int = 32  # users whose final evaluation runs the generation check (a seeded sample; 0: every user)
    # simulation at scale (fedpersona/server/user_grid.py): users are not Flower nodes; one message asks a
    # worker to train or evaluate a cohort of up to cohort-size users, one after another on its resident model
    cohort_size: int = 16  # most users one simulation message (one worker call) trains or evaluates
    # train a cohort's users in one forward/backward (fedpersona/alignment/cohort.py) where that equals
    # training them one after another (not under pair-level DP); false: always one after another
    cohort_batching: bool = True
    per_user_rows: bool = False  # metrics.jsonl rows also list every evaluated user's accuracy (large at scale)
    run_tag: str = ""  # label of one run inside a multi-run simulation session (keeps node state apart)
    # local training
    loss: str = "dpo"  # preference loss: dpo, ipo or simpo
    beta: float = 0.5  # DPO KL strength; 0.1 drifts far enough from the reference that generations degenerate
    lr: float = 3e-3  # learning rate of the private tensors (AdamW)
    shared_lr: float = 1e-3  # learning rate of the shared tensors
    epochs: int = 4  # passes over the user's training pairs per round
    min_steps: int = 16  # at least this many optimizer steps per round
    max_steps: int = 0  # at most this many optimizer steps per round (0: no cap)
    batch_size: int = 8  # preference pairs per optimizer step (under DP: the expected Poisson batch)
    max_length: int = 96  # tokens of prompt + response kept per side of a pair
    # pair-level differential privacy (DP-SGD per preference pair, on the device)
    dp_epsilon: float = 0.0  # 0: off; else each user's pair-level target epsilon over the whole run
    dp_delta: float = 0.0  # 0: min(1e-5, 1/(10 n)) per user with n training pairs
    dp_max_grad_norm: float = 0.3  # per-pair DPO gradients are ~0.2-0.7 at the start: a tighter clip keeps signal, cuts noise
    dp_private_clip_share: float = 0.0  # 0: one joint clip; f: private tensors clipped to C*sqrt(f), shared to C*sqrt(1-f)
    dp_accountant: str = "rdp"  # privacy accountant: rdp or prv (Opacus)
    # std (in pairs) of the noise on each user's pair count, released once as its FedAvg weight and counted in its
    # budget (sensitivity 1). -1: auto, 40 / epsilon (5 at epsilon 8): about 1% more DP-SGD noise at any epsilon
    # (a fixed std would cost a growing share of a small budget). 0: no release, every user weighs the same
    dp_count_noise: float = -1.0
    # rounds each user's noise is calibrated for; 0: the 90th percentile of its participations when each
    # round samples fraction-train of the users (all rounds at 1.0); the ledger declines what it cannot afford
    dp_planned_rounds: int = 0
    dp_max_physical_batch: int = 32  # pairs per forward/backward under DP (memory; same result)
    dp_reproducible: bool = False  # simulation only: sampling and noise seeded from the round seed
    # user-level differential privacy (DP-FedAvg over the shared adapter; fedpersona/privacy/user_level.py)
    user_dp_noise: float = 0.0  # 0: off; else the noise multiplier z (std z*C/m on the averaged update)
    user_dp_clip: float = 1.0  # clipping norm C of each user's shared-adapter update
    user_dp_delta: float = 0.0  # 0: 1/N^1.1 for N users
    # real models: prompt format, LoRA targets and memory (fedpersona/model/, fedpersona/alignment/logprobs.py)
    chat_template: bool = True  # format prompts with the tokenizer's chat template when it has one
    lora_target_modules: str = ""  # "": the architecture's default (fedpersona/model/targets.py); "all-linear"; "a,b,c"
    # padded tokens (rows x width) one forward/backward may hold: training, reference log-probs and evaluation
    # are cut into micro-batches of at most this many tokens (gradients accumulate to batch-size pairs per step)
    max_tokens_per_batch: int = 2048
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    # which DP_DEFAULTS a DP run took because the user left them unset ("key=value,..."; set by with_dp_defaults)
    dp_defaults_applied: str = ""
    # reply validation on the server (fedpersona/strategies/validation.py): every reply, every strategy
    validate_replies: bool = True  # false only to measure what validation prevents (benchmarks/robustness.py)
    max_update_norm: float = 0.0  # reject an update whose L2 distance from the sent global tensors exceeds this; 0: off
    update_norm_ratio: float = 10.0  # reject one above this x the median norm of the round's other replies; 0: off
    max_reply_weight: float = 1e5  # largest num-examples (pairs; under DP the released count) a reply may claim
    # simulated attacks (fedpersona/simulations/attacks.py): the first attack-users users tamper with their replies
    attack: str = ""  # "": none; nan, inf, scale, sign-flip, weight-huge, weight-negative, wrong-shape, ...
    attack_users: int = 0  # how many users (the first ones) run the attack
    attack_rounds: int = 0  # the attack is made in rounds 1..k only; 0: every round
    attack_scale: float = 1e6  # the factor of the "scale" attack
    # resources
    device: str = "auto"  # "auto", "cpu" or "cuda"

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: RunConfig | None = None, source: str = "config") -> RunConfig:
        """Merge flat ``key: value`` pairs over ``base`` (defaults if None), converting and validating."""
        known = {f.name: f for f in fields(cls)}
        values = dataclasses.asdict(base or cls())
        for raw_key, raw in flat.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                if key in _IGNORED_KEYS:
                    continue
                import difflib

                close = difflib.get_close_matches(key, known, n=1)
                hint = (f"did you mean '{close[0].replace('_', '-')}'?" if close else
                        "`fedpersona settings` lists every setting with its default and meaning")
                raise UsageError(f"{source}: unknown setting '{raw_key}'; {hint}")
            values[key] = _convert(raw, known[key].type, f"{source}: setting '{raw_key}'")
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_message(cls, flat: Mapping[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
        """Split a message's config into the run configuration and the strategy's own extra keys
        (``server-round``, FedProx's ``proximal-mu``, ...)."""
        known = {f.name for f in fields(cls)}
        ours = {k: v for k, v in flat.items() if k.replace("-", "_") in known}
        extras = {k: v for k, v in flat.items() if k.replace("-", "_") not in known}
        return cls.from_flat(ours, source="message config"), extras

    @classmethod
    def from_device_message(cls, flat: Mapping[str, Any]) -> tuple[RunConfig, dict[str, Any], dict[str, Any]]:
        """``from_message`` as a real device reads it: simulation-only settings (``SIMULATION_ONLY``) are
        set aside unread and returned third (the device's policy declines a message that has any), so a
        message can neither point the device at a path nor learn whether that path exists."""
        sim = {k: v for k, v in flat.items() if k.replace("-", "_") in SIMULATION_ONLY}
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

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    # ---- validation ---------------------------------------------------------------------------
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
        from fedpersona.strategies.schemes import SCHEMES

        need(self.scheme in SCHEMES, "scheme", f"unknown scheme; choose one of {', '.join(SCHEMES)}")
        need(not (self.dp_epsilon > 0 and not SCHEMES[self.scheme].supports_dp), "scheme",
             "this scheme does not support DP-SGD (its final fine-tune on all pairs would need a budget "
             "of its own; use split, pal or fedsa)")
        need(self.loss in LOSSES, "loss", f"choose one of {', '.join(LOSSES)}")
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
        need(0.0 <= self.dp_delta <= MAX_DELTA, "dp_delta", f"must be in [0, {MAX_DELTA:g}] (0: default)")
        need(self.dp_max_grad_norm > 0, "dp_max_grad_norm", "must be > 0")
        need(self.dp_count_noise == -1 or 0.0 <= self.dp_count_noise < math.inf, "dp_count_noise",
             "must be -1 (auto: 40 / epsilon) or a finite number >= 0 (0: no count released)")
        need(self.dp_accountant in ("rdp", "prv"), "dp_accountant", "choose rdp or prv")
        need(self.dp_max_physical_batch >= 1, "dp_max_physical_batch", "must be >= 1")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             "use auto, cpu, cuda or cuda:N")
        if self.is_synthetic:
            from fedpersona.data.synthetic import SCENARIOS

            scenario = self.data.split(":", 1)[1]
            need(scenario in SCENARIOS, "data", f"unknown scenario; choose synthetic:<{'|'.join(SCENARIOS)}> or a pair file")
        elif self.data.startswith(GENERATED_PREFIX):
            need(self.data[len(GENERATED_PREFIX):] in GENERATED_SCENARIOS, "data",
                 f"unknown generated scenario; choose {', '.join(GENERATED_PREFIX + n for n in GENERATED_SCENARIOS)}")
        elif not Path(self.data).is_file():
            need(False, "data", "pair file not found; pass a JSONL file or synthetic:<scenario>")
        need(0.0 <= self.max_update_norm < math.inf, "max_update_norm", "must be a finite number >= 0 (0: off)")
        need(self.update_norm_ratio == 0 or 1.0 <= self.update_norm_ratio < math.inf, "update_norm_ratio",
             "must be 0 (off) or a finite number >= 1 (a multiple of the round's median update norm)")
        need(1.0 <= self.max_reply_weight < math.inf, "max_reply_weight", "must be a finite number >= 1 (pairs)")
        from fedpersona.simulations.attacks import ATTACKS

        need(self.attack in ("", *ATTACKS), "attack", f"choose one of {', '.join(ATTACKS)} (or leave it empty)")
        need(0 <= self.attack_users <= self.num_users, "attack_users", "must be in 0..num-users")
        need(bool(self.attack) == (self.attack_users > 0), "attack_users" if self.attack else "attack",
             "attack and attack-users go together: name an attack and how many users make it")
        need(0 <= self.attack_rounds <= self.rounds, "attack_rounds", "must be in 0..rounds (0: every round)")
        need(math.isfinite(self.attack_scale) and self.attack_scale != 0, "attack_scale", "must be finite and non-zero")


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


def describe_settings() -> list[tuple[str, str, str]]:
    """``(setting, default, meaning)`` for every RunConfig field, in declaration order, the meaning taken
    from the comment on (or the comment lines right above) its line in this file: one source of truth."""
    import inspect

    lines = inspect.getsource(RunConfig).splitlines()
    out, above = [], []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# ").strip())
            continue
        name, sep, rest = text.partition(":")
        if sep and name.isidentifier() and "=" in rest and not text.startswith(("def ", "@")):
            comment = rest.split("#", 1)[1].strip() if "#" in rest else ""
            # the comment lines above, without a section title ("# the federation") heading them
            meaning = comment or " ".join(t for t in above if len(t.split()) > 4 or any(c in t for c in ":;(),."))
            default = getattr(RunConfig(), name)
            out.append((name.replace("_", "-"), repr(default) if isinstance(default, str) else str(default), meaning))
        above = [] if not text.startswith("#") else above
        if text.startswith("def "):
            break
    return out

