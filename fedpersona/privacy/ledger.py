"""A user's pair-level privacy ledger: the noise calibrated once, and every phase of DP-SGD spent since.

The noise multiplier is calibrated ONCE per user, from the target epsilon, delta, the sample rate and
the total number of local steps planned over all rounds (``opacus.accountants.utils.get_noise_multiplier``
with ``steps=``), not per round: a per-round ``make_private_with_epsilon`` restarts the budget every
round and its epsilon covers one round only. The ledger then records each round's steps as a phase
``(noise, sample_rate, steps)`` and answers epsilon-so-far with the accountant (``accountant.py``).

It lives in the client's persistent state (Flower ``Context.state`` as a JSON string in a ConfigRecord,
or the device's state file): ``to_json()`` gives a plain dict, ``from_json()`` reads it back, so a
restarted client continues its budget instead of restarting it.

A ledger may also hold the user's **released pair count**: ``n + N(0, count_noise^2)``, drawn once when
the ledger is planned and sent as the user's aggregation weight every round it trains (pair-count-weighted
FedAvg under DP). Adding or removing one pair moves n by 1, so this is a Gaussian mechanism of sensitivity
1, composed into the budget as one phase ``(count_noise, 1.0, 1)`` before the DP-SGD phases (the noise is
calibrated for both together); reusing the released value later is post-processing and costs nothing.

A ledger may start with a **prior**: phases an earlier ledger of the same device already spent on some of
the same pairs (``fedpersona feedback forget`` retires a ledger into the device's privacy record, and
re-imported pairs bring its phases back; ``fedpersona.device.privacy_record``). The prior is composed
before everything else, so forgetting and re-importing pairs never lowers the epsilon they have cost, and
the new noise is calibrated for what is left of the target.

``target_epsilon = inf`` is a clip-only ledger: noise 0, no guarantee (spent epsilon is inf). It exists
for tests and ablations (the update is then the exact mean of clipped per-pair gradients).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpersona.errors import UsageError
from fedpersona.privacy.accountant import (
    Phase,
    check_accountant,
    check_delta,
    check_rate,
    check_steps,
    epsilon_of_history,
    noise_for_epsilon,
)

LEDGER_VERSION = 1


class BudgetSpent(UsageError):
    """The pairs' earlier spending already reaches the target: no ledger can afford a step."""


def default_delta(num_pairs: int) -> float:
    """Default delta for a user with ``num_pairs`` training pairs: ``min(1e-5, 1 / (10 n))``.

    (epsilon, delta)-DP with delta >= 1/n allows releasing one whole record in the clear, so delta must
    sit well below 1/n (Dwork & Roth, 2014, sec. 2.3); this rule keeps it at least 10x below 1/n, and
    never above the customary 1e-5.
    """
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise UsageError(f"cannot set delta for {num_pairs!r} training pairs: need at least 1 pair")
    return min(1e-5, 1.0 / (10.0 * num_pairs))


@dataclass
class PrivacyLedger:
    accountant: str
    delta: float
    target_epsilon: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    history: list[Phase] = field(default_factory=list)
    count_noise: float = 0.0  # 0: no pair count released
    released_count: float | None = None  # n + N(0, count_noise^2), drawn once; None if not released
    prior: list[Phase] = field(default_factory=list)  # spent on these pairs by retired ledgers (module doc)

    def __post_init__(self) -> None:
        if (self.count_noise > 0) != (self.released_count is not None):
            raise ValueError("a released pair count needs its count noise, and count noise needs the released count")

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, target_epsilon: float, delta: float, sample_rate: float, planned_steps: int,
                  accountant: str = "rdp", *, count_noise: float = 0.0,
                  released_count: float | None = None, prior: list[Phase] | None = None) -> PrivacyLedger:
        """A fresh ledger whose noise reaches at most ``target_epsilon`` after ``planned_steps`` steps
        (after ``prior`` and the pair-count release too, when ``count_noise`` > 0 and ``released_count``
        is given).

        Raises ``BudgetSpent`` when ``prior`` alone already reaches ``target_epsilon``."""
        check_accountant(accountant)
        check_delta(delta)
        check_rate(sample_rate)
        check_steps(planned_steps, minimum=1)
        ledger = cls(accountant, float(delta), float(target_epsilon), 0.0, float(sample_rate), int(planned_steps),
                     count_noise=float(count_noise), released_count=released_count,
                     prior=[(float(n), float(q), int(s)) for n, q, s in (prior or [])])
        if ledger.prior and ledger._epsilon([]) >= target_epsilon:
            raise BudgetSpent(f"the retired ledgers of these pairs already spent epsilon {ledger._epsilon([]):.2f} "
                              f">= the target {target_epsilon:g}")
        if target_epsilon != math.inf:  # inf: clip-only, no noise, no guarantee
            ledger.noise_multiplier = noise_for_epsilon(target_epsilon, delta, sample_rate, planned_steps,
                                                        accountant, prior=ledger._release())
        return ledger

    # ---- questions ---------------------------------------------------------------------------------
    @property
    def clip_only(self) -> bool:
        return self.noise_multiplier == 0.0

    @property
    def aggregation_weight(self) -> int:
        """What the user sends as ``num-examples``: its released pair count (at least 1), else 1."""
        return 1 if self.released_count is None else max(1, round(self.released_count))

    @property
    def steps_taken(self) -> int:
        return sum(int(steps) for _, _, steps in self.history)

    def spent_epsilon(self) -> float:
        """Epsilon spent so far at this ledger's delta (inf once any step ran without noise)."""
        return self._epsilon(self.history)

    def epsilon_after(self, next_steps: int, sample_rate: float | None = None) -> float:
        """Epsilon if ``next_steps`` more steps ran now (at ``sample_rate``, default the calibrated one)."""
        return self._epsilon([*self.history, self._phase(next_steps, sample_rate)])

    def would_exceed(self, next_steps: int, sample_rate: float | None = None) -> bool:
        """True if taking ``next_steps`` more steps would push epsilon past the target."""
        if math.isinf(self.target_epsilon):
            return False
        return self.epsilon_after(next_steps, sample_rate) > self.target_epsilon * (1.0 + 1e-9)

    # ---- changes -----------------------------------------------------------------------------------
    def record(self, steps: int, sample_rate: float | None = None, noise_multiplier: float | None = None) -> None:
        """Add ``steps`` steps taken (merged into the last phase when noise and rate are the same)."""
        if steps < 0:
            raise ValueError(f"cannot record {steps} steps")
        if steps == 0:
            return
        noise, rate, steps = self._phase(steps, sample_rate, noise_multiplier)
        if self.history and self.history[-1][:2] == (noise, rate):
            last = self.history.pop()
            steps += int(last[2])
        self.history.append((noise, rate, steps))

    # ---- persistence -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A plain JSON-able dict (``json.dumps`` it for a ConfigRecord or a state file)."""
        return {
            "version": LEDGER_VERSION,
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": "inf" if math.isinf(self.target_epsilon) else self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "history": [[float(n), float(q), int(s)] for n, q, s in self.history],
            "count_noise": self.count_noise,
            "released_count": self.released_count,
            "prior": [[float(n), float(q), int(s)] for n, q, s in self.prior],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> PrivacyLedger:
        """Read ``to_json()``'s dict (or its JSON string) back; a malformed ledger is a UsageError."""
        try:
            if isinstance(data, (str, bytes)):
                data = json.loads(data)
            if int(data.get("version", LEDGER_VERSION)) != LEDGER_VERSION:
                raise ValueError(f"version {data['version']} (this build reads {LEDGER_VERSION})")
            target = data["target_epsilon"]
            ledger = cls(
                accountant=check_accountant(str(data["accountant"])),
                delta=float(data["delta"]),
                target_epsilon=math.inf if target == "inf" else float(target),
                noise_multiplier=float(data["noise_multiplier"]),
                sample_rate=float(data["sample_rate"]),
                planned_steps=int(data["planned_steps"]),
                history=[(float(n), float(q), int(s)) for n, q, s in data["history"]],
                count_noise=float(data.get("count_noise", 0.0)),
                released_count=None if data.get("released_count") is None else float(data["released_count"]),
                prior=[(float(n), float(q), int(s)) for n, q, s in data.get("prior", [])],
            )
        except UsageError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UsageError(f"privacy ledger is malformed ({type(err).__name__}: {err}); "
                             "it must come from PrivacyLedger.to_json()") from None
        return ledger

    # ---- internals ---------------------------------------------------------------------------------
    def _phase(self, steps: int, sample_rate: float | None = None, noise: float | None = None) -> Phase:
        return (float(self.noise_multiplier if noise is None else noise),
                float(self.sample_rate if sample_rate is None else sample_rate), int(steps))

    def own_phases(self) -> list[Phase]:
        """What this ledger itself spent: the count release and the DP-SGD phases, without its prior (what a
        retired ledger hands on to a later one over the same pairs; each retired ledger's prior is recorded
        with its own entry, so nothing is counted twice)."""
        release = [(self.count_noise, 1.0, 1)] if self.released_count is not None else []
        return [*release, *self.history]

    def _release(self) -> list[Phase]:
        """The committed phases before any step: the prior, then the pair-count release (a Gaussian
        mechanism of sensitivity 1, no subsampling)."""
        release = [(self.count_noise, 1.0, 1)] if self.released_count is not None else []
        return [*self.prior, *release]

    def _epsilon(self, history: list[Phase]) -> float:
        live = [phase for phase in [*self._release(), *history] if phase[2] > 0]
        if any(noise == 0.0 for noise, _, _ in live):
            return math.inf
        return epsilon_of_history(live, self.delta, self.accountant)
