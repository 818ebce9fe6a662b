"""The device's own privacy policy: what this user accepts, whatever a server's message asks for.

The server proposes a round; the device decides. Every message carries the run's settings, and before
this policy existed the device obeyed them: a message with ``dp-epsilon=0`` made a device train without
DP and send its exact pair count; a first message with ``dp-epsilon=1000`` set the user's budget. Now the
device's settings live in its state folder (``policy.json``, written by ``fedpersona client``) and a round
is trained only if what it asks for is **at least as private** as the policy:

* ``require_dp`` (default True): pair-level DP-SGD on the device. A round without it (or with only
  user-level DP, whose noise the server adds and so does not protect against the server) is declined.
* ``max_epsilon`` (default 8): the largest pair-level epsilon the user accepts over the whole life of the
  state (every run, every ledger, forgotten-and-re-imported pairs included). A round asking for more is
  declined; one asking for less caps the ledger lower (``cap_ledger``).
* ``max_delta`` (default 1e-5): likewise for delta (the device's own default is ``min(1e-5, 1/(10 n))``).
* ``min_noise_multiplier`` (default 0: any noise the epsilon bound allows): a floor on the DP-SGD noise.
* ``share_evaluation`` (default False): whether held-out accuracies go to the server under DP. They are
  computed on the user's own pairs and are not covered by the DP-SGD guarantee, so by default a DP device
  keeps them (its evaluation reply declines with ``evaluation-private``).
* ``require_secure_aggregation`` (default False): train only rounds run under secure aggregation, where the
  server learns the sum of the users' updates and never this device's (``fedpersona.client.secure``).
* ``model`` (default ""): pin the model id; "" accepts the first round's model, after which the state is
  bound to it (``meta.json``) and another model is declined, as is another scheme.

Simulation-only settings (``fedpersona.config.SIMULATION_ONLY``: data paths, reproducible noise, ...) in a
message are declined outright. Declines are replies with a reason code (``fedpersona.protocol``), never
exceptions: the server counts them and the run goes on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedpersona.errors import UsageError
from fedpersona.privacy.accountant import MAX_DELTA
from fedpersona.protocol import TRAIN_LOSS_KEY

POLICY_FILE = "policy.json"


@dataclass(frozen=True)
class Decline:
    """Why a device declines a round: a ``fedpersona.protocol.DECLINE_REASONS`` code and one line."""

    reason: str
    detail: str


@dataclass(frozen=True)
class DevicePolicy:
    require_dp: bool = True
    max_epsilon: float = 8.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.0
    share_evaluation: bool = False
    model: str = ""
    require_secure_aggregation: bool = False

    def validate(self, where: str = "device policy") -> DevicePolicy:
        if not (0 < self.max_epsilon < math.inf):
            raise UsageError(f"{where}: max-epsilon {self.max_epsilon!r} must be a finite number > 0")
        if not (0 < self.max_delta <= MAX_DELTA):
            raise UsageError(f"{where}: max-delta {self.max_delta!r} must be in (0, {MAX_DELTA:g}]; 1e-5 is customary")
        if not (0 <= self.min_noise_multiplier < math.inf):
            raise UsageError(f"{where}: min-noise-multiplier {self.min_noise_multiplier!r} must be >= 0")
        return self

    # ---- persistence ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, state_dir: Path) -> DevicePolicy | None:
        """The policy saved in ``state_dir``, None if there is none; a damaged file is a UsageError."""
        path = state_dir / POLICY_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: the device's privacy policy is unreadable ({err}); fix it or delete it and "
                             "start `fedpersona client` with the policy flags again") from None
        known = {f.name: f.type for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - set(known):
            raise UsageError(f"{path}: not a device policy (expected the keys {', '.join(known)}); fix or delete it")
        try:
            policy = cls(**{k: _typed(v, known[k], k) for k, v in data.items()})
        except (TypeError, ValueError) as err:
            raise UsageError(f"{path}: {err}; fix or delete it") from None
        return policy.validate(str(path))

    def save(self, state_dir: Path) -> None:
        from fedpersona.io import atomic_write_json

        atomic_write_json(state_dir / POLICY_FILE, asdict(self))

    def describe(self) -> str:
        """One line for people: what this device accepts."""
        dp = (f"pair-level DP required, epsilon <= {self.max_epsilon:g} over this state's life, "
              f"delta <= {self.max_delta:g}" if self.require_dp else
              f"DP optional (epsilon <= {self.max_epsilon:g}, delta <= {self.max_delta:g} when asked for)")
        noise = f", noise multiplier >= {self.min_noise_multiplier:g}" if self.min_noise_multiplier else ""
        evaluation = "shared" if self.share_evaluation else "kept on this device under DP"
        secure = "; secure aggregation required" if self.require_secure_aggregation else ""
        return f"{dp}{noise}; evaluation results {evaluation}{secure}" + (f"; model {self.model}" if self.model else "")

    # ---- decisions ----------------------------------------------------------------------------------
    def check_common(self, config: Any, simulation_keys: Mapping[str, Any], bound: Mapping[str, Any] | None,
                     has_private: bool) -> Decline | None:
        """Checks every message passes (train and evaluate): simulation settings, model and scheme."""
        if simulation_keys:
            keys = ", ".join(k.replace("_", "-") for k in sorted(simulation_keys))
            return Decline("simulation-setting", f"the message sets {keys}, which only a simulation may set; a "
                           "deployment server (`fedpersona server`) leaves them out")
        if self.model and config.model != self.model:
            return Decline("model-mismatch", f"the round uses model {config.model!r}; this device accepts only "
                           f"{self.model!r}")
        if bound is not None and has_private:
            if bound.get("model_id") != config.model:
                return Decline("model-mismatch", f"this state is bound to model {bound.get('model_id')!r}, the round "
                               f"uses {config.model!r}")
            if bound.get("scheme") != config.scheme:
                return Decline("scheme-mismatch", f"this state is bound to scheme {bound.get('scheme')!r}, the "
                               f"round uses {config.scheme!r}")
        return None

    def check_train(self, config: Any, extras: Mapping[str, Any]) -> Decline | None:
        """Whether the round's privacy settings are at least as private as this policy."""
        dp = config.dp_epsilon > 0
        if self.require_dp and not dp:
            what = "only user-level DP (noise added by the server)" if config.user_dp_noise > 0 else "no DP"
            return Decline("dp-required", f"the round asks for {what}; this device requires pair-level DP "
                           f"(epsilon <= {self.max_epsilon:g})")
        if dp and config.dp_epsilon > self.max_epsilon:
            return Decline("epsilon-above-policy", f"the round asks for epsilon {config.dp_epsilon:g}; this device "
                           f"accepts at most {self.max_epsilon:g}")
        if dp and config.dp_delta > self.max_delta:
            return Decline("delta-above-policy", f"the round asks for delta {config.dp_delta:g}; this device "
                           f"accepts at most {self.max_delta:g}")
        if extras.get(TRAIN_LOSS_KEY) and (dp or self.require_dp):
            return Decline("loss-requested", "the strategy asks for the raw training loss, which DP-SGD does not "
                           "protect")
        return None

    def check_secure_aggregation(self, secure: bool) -> Decline | None:
        """Whether the round's aggregation is acceptable: a plain one (the server reads this device's update)
        is declined when the policy requires secure aggregation (``fedpersona.client.secure``)."""
        if self.require_secure_aggregation and not secure:
            return Decline("secure-aggregation-required", "the round sends this device's update to the server in "
                           "the clear; this device requires secure aggregation (the server's --secure-aggregation)")
        return None

    def check_noise(self, noise_multiplier: float) -> Decline | None:
        if noise_multiplier < self.min_noise_multiplier:
            return Decline("noise-below-policy", f"the round's settings give noise multiplier "
                           f"{noise_multiplier:.3f}; this device requires at least {self.min_noise_multiplier:g}")
        return None

    def check_evaluate(self, config: Any) -> Decline | None:
        if (config.dp_epsilon > 0 or self.require_dp) and not self.share_evaluation:
            return Decline("evaluation-private", "under DP this device keeps its held-out accuracies (start it "
                           "with --share-evaluation to send them)")
        return None

    def delta_for(self, config: Any, num_pairs: int) -> float:
        """The delta this device accounts at: the round's (or the default ``min(1e-5, 1/(10 n))``), capped."""
        from fedpersona.privacy.ledger import default_delta

        return min(config.dp_delta or default_delta(num_pairs), self.max_delta)

    def epsilon_for(self, config: Any) -> float:
        return min(config.dp_epsilon, self.max_epsilon)


def _typed(value: Any, annotation: Any, key: str) -> Any:
    kind = {"bool": bool, "float": float, "str": str}[annotation if isinstance(annotation, str) else annotation.__name__]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind):
        raise ValueError(f"'{key}' must be a {kind.__name__}, got {value!r}")
    return value


def policy_for(state_dir: Path, **overrides: Any) -> DevicePolicy:
    """The device's policy: the saved one (else the defaults), with ``overrides`` (the user's flags, None =
    not given) applied and saved. Only the user sets it; no message ever does."""
    saved = DevicePolicy.load(state_dir)
    given = {k: v for k, v in overrides.items() if v is not None}
    policy = DevicePolicy(**{**(asdict(saved) if saved else {}), **given}).validate("fedpersona client")
    if saved != policy:
        policy.save(state_dir)
    return policy
