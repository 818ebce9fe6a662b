"""The population model inside a simulation: who may be sampled, what became of each selected user, the report.

``fedpersona.population`` decides rounds on simulated seconds, free of Flower (issue 25). This module wires
it into the server's round, at three points and nowhere else, so it works with every strategy:

* **sampling** (``fedpersona.server.sampling.population_sampling`` around the strategy's
  ``configure_train``): the clock plans the round (its simulated start, waiting until enough users are
  online); while the strategy samples, the user grid lists only the users online and able to hold the
  model (``candidates``); afterwards ``select`` tops the selection up to ``ceil(k x over-selection)`` users
  (``k``: the round's goal count, Flower's ``max(int(N x fraction-train), min-users)`` over all N users,
  as without a population), the extra users receiving the same message as the strategy's;
* **the round** (``UserGrid.send_and_receive``): ``decide`` answers each selected user's privacy request
  with a real ``fedpersona.device.policy.DevicePolicy`` built from its privacy group (``require_dp``,
  ``max_epsilon``), then closes the round on the clock *before* anyone trains, from the work each user
  will really do (its training pairs through the trainer's own step rule, ``TrainSettings.steps_for``,
  all epochs; or tokens) and the real bytes (the message's records down; its arrays up: a reply carries
  the same shared tensors). Only users whose reply the round accepts are trained; a declining user's
  reply is the decline a device would send (no worker call); dropped, offline, late and surplus users
  get no reply and do no work (a device abandons its round when the server closes it, Bonawitz et al.
  2019), so a user that never meets the deadline never trains;
* **the report** (``row`` per round in ``metrics.jsonl``, ``summary``): simulated time, per-reason
  counts, bytes, time-to-accuracy and accuracy per group (device tier, availability quartile, privacy
  group, training-pair quartile).

With ``privacy-demands = own-epsilon`` a user whose policy is stricter than the round trains at its own
largest epsilon instead of declining (``DevicePolicy.epsilon_for``'s cap; a DP-requiring user in a round
without DP trains with DP at its own epsilon): personalized DP, one epsilon per user (Jorgensen et al.
2015, "Conservative or Liberal? Personalized Differential Privacy"). Its cohort gets a message whose
config carries that epsilon; nothing else changes.

The uniform population (the default) changes nothing: everyone is a candidate, every round takes 0 s
and accepts every reply, so the strategy's sample, the cohorts and the results are today's bit for bit.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpersona.alignment.settings import TrainSettings
from fedpersona.config import RunConfig
from fedpersona.device.policy import DevicePolicy
from fedpersona.population import (Grouping, Population, RoundOutcome, RoundPlan, RoundPolicy, RunTally,
                                   SimulatedClock, Status, group_report, quantile_grouping, time_to_accuracy)
from fedpersona.privacy.accountant import MAX_DELTA
from fedpersona.protocol import ARRAYS, DECLINED, METRICS, NUM_EXAMPLES, STATUS, status_record
from fedpersona.server.user_grid import USER_NODE_BASE, user_of

ACCURACY_LEVELS = (0.6, 0.7, 0.8, 0.9)  # summary.json time_to_accuracy: mean personalized accuracy levels
OWN_EPSILON_REASONS = ("dp-required", "epsilon-above-policy")  # what own-epsilon answers by training at its own


def timed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Add the seconds ``method`` takes to its object's ``seconds`` (what the population model costs a run)."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    return wrapper


def round_policy(config: RunConfig) -> RoundPolicy:
    """The run's round rules (settings ``round-deadline``, ``over-selection``, ``min-replies``)."""
    return RoundPolicy(deadline_s=config.round_deadline, over_selection=config.over_selection,
                       min_replies=config.min_replies)


def pairs_trained(num_pairs: int, settings: TrainSettings, dp: bool = False) -> int:
    """Preference pairs a user's local round trains on, all epochs counted: ``settings.steps_for`` steps
    of the trainer's batches (``train_local`` / ``batch_schedule``: passes over a fresh permutation cut into
    ``batch_size`` batches; only a pass's last batch is short). Under DP-SGD, the expected: steps x
    ``min(batch_size, n)`` (Poisson sampling at rate ``batch_size / n``).

    Args:
        num_pairs: the user's training pairs.
        settings: the run's local training.
        dp: the user trains with pair-level DP-SGD.

    Returns:
        Pairs trained in one round (0 without pairs).
    """
    if num_pairs <= 0:
        return 0
    steps = settings.steps_for(num_pairs)
    if dp:
        return steps * min(settings.batch_size, num_pairs)
    per_pass = math.ceil(num_pairs / settings.batch_size)
    passes, rest = divmod(steps, per_pass)
    return passes * num_pairs + rest * settings.batch_size


def train_pair_count(config: RunConfig, index: int) -> int:
    """User ``index``'s training pairs (``fedpersona.round.users.population_user``'s), cheaply: a synthetic
    user's count is drawn with its profile, before any pair is generated (a file's users are cached)."""
    if config.is_synthetic:
        from fedpersona.data.sources import simulator

        count = simulator(config.data.split(":", 1)[1], config.num_users + config.new_users, config.seed,
                          config.dirichlet_alpha).user(index).num_train_pairs
        return min(count, config.max_train_pairs) if config.max_train_pairs else count
    from fedpersona.round.users import population_user

    return len(population_user(config, index).train)


def record_bytes(content: RecordDict, arrays_only: bool = False) -> int:
    """Bytes of a message's records: each ArrayRecord's ``count_bytes`` (the tensors), plus, unless
    ``arrays_only``, each ConfigRecord's size as UTF-8 text (a few kB of settings)."""
    total = sum(record.count_bytes() for record in content.array_records.values())
    if arrays_only:
        return total
    return total + sum(len(str(dict(record)).encode()) for record in content.config_records.values())


def decline_reply(msg: Message, reason: str) -> Message:
    """The reply a device sends when its policy declines a training round (``client.app.train_reply`` of a
    declined round): no tensors, ``declined=1``, the reason code; nothing of its data."""
    return Message(RecordDict({ARRAYS: ArrayRecord(), METRICS: MetricRecord({NUM_EXAMPLES: 0, DECLINED: 1}),
                               STATUS: ConfigRecord(status_record(reason))}), reply_to=msg)


@dataclass(frozen=True)
class RoundDecision:
    """A training round decided on the clock: the messages to deliver (a user trained at its own epsilon
    carries its own config), the replies made for users whose policy declined, and the outcome."""

    send: list[Message]
    answered: list[Message]
    outcome: RoundOutcome


class PopulationRounds:
    """The population, its clock and the run's tallies (see the module docstring).

    Args:
        config: the run configuration (``population``, the round settings, the training settings).
        num_nodes: the grid's users (training users, then new users).
        model_bytes: what training needs on a device (the resident model's parameters, bytes): users whose
            memory is smaller are unfit, never selected, counted.

    Raises:
        UsageError: a bad population or round setting; own-epsilon with a scheme that cannot train under DP.
    """

    def __init__(self, config: RunConfig, *, num_nodes: int, model_bytes: float = 0.0) -> None:
        started = time.perf_counter()
        self.config = config
        self.population = Population.load(config.population, num_nodes, config.seed)
        self.policy = round_policy(config)
        self.clock = SimulatedClock(self.population, self.policy, model_bytes=model_bytes)
        self.tally = RunTally(num_nodes, self.clock.now, self.clock.unfit_users)
        self.wanted = min(max(int(num_nodes * config.fraction_train), config.min_users), num_nodes)
        self.need = max(config.min_users, min(self.policy.min_replies, self.wanted))
        self.plan: RoundPlan | None = None
        self.round = 0
        self.sampling = False
        self.outcomes: dict[int, RoundOutcome] = {}
        self.policy_declines = 0  # users whose privacy policy declined (new users' declines are not counted)
        self.rounds_trained: dict[int, int] = {}  # user -> rounds its store counts (final evaluation replies)
        self._pairs: dict[int, int] = {}
        self._tokens_per_pair: dict[int, float] = {}
        self._figures: dict[int, dict[str, Any]] = {}  # round -> row figures beside the outcome's
        self.prior_rows: list[Mapping[str, Any]] = []  # a resumed run's finished rounds (metrics.jsonl)
        self._policies = self._device_policies()
        if config.privacy_demands == "own-epsilon" and any(p.require_dp for p in self._policies if p):
            from fedpersona.errors import UsageError
            from fedpersona.strategies.schemes import get_scheme

            if not get_scheme(config.scheme).supports_dp:
                raise UsageError(f"privacy-demands=own-epsilon: scheme {config.scheme} cannot train under DP, which "
                                 f"population {self.population.spec.name}'s DP-requiring users would; use split, pal "
                                 "or fedsa")
        self.seconds = time.perf_counter() - started  # the model's own server time (timed methods add theirs)

    def _device_policies(self) -> list[DevicePolicy | None]:
        """One real device policy per privacy group (None: the group demands nothing, as without a policy).
        The population file states DP and epsilon; delta is left to the round (the largest accepted)."""
        return [DevicePolicy(require_dp=g.require_dp, max_epsilon=g.max_epsilon, max_delta=MAX_DELTA)
                for g in self.population.spec.privacy] or [None]

    # ---- sampling -------------------------------------------------------------------------------------
    @timed
    def begin(self, server_round: int) -> None:
        """Plan ``server_round`` (its simulated start and candidates); the grid lists the candidates until
        ``end``."""
        self.round = int(server_round)
        self.plan = self.clock.plan_round(self.wanted, need=self.need)
        self.sampling = True

    def end(self) -> None:
        self.sampling = False

    def candidates(self) -> np.ndarray | None:
        """The users the strategy may sample now (ascending), or None outside a training round's sampling."""
        return self.plan.candidates if self.sampling and self.plan is not None else None

    @timed
    def select(self, server_round: int, messages: list[Message], grid: Any = None) -> list[Message]:
        """The strategy's messages, topped up to the plan's ``num_select`` with seeded draws among the other
        candidates (over-selection; also when the strategy sampled a fraction of fewer online users)."""
        if self.plan is None or not messages or server_round != self.round:
            return messages
        chosen = {user_of(m.metadata.dst_node_id) for m in messages}
        extra = self.plan.num_select - len(chosen)
        if extra <= 0:
            return messages
        pool = np.setdiff1d(self.plan.candidates, np.fromiter(chosen, np.int64, len(chosen)))
        picked = self.population.rng("over-selection", server_round).choice(pool, size=min(extra, len(pool)),
                                                                          replace=False)
        first = messages[0].metadata
        return messages + [Message(content=messages[i % len(messages)].content, dst_node_id=USER_NODE_BASE + int(u),
                                   message_type=first.message_type, ttl=first.ttl, group_id=first.group_id)
                           for i, u in enumerate(picked)]

    # ---- the round --------------------------------------------------------------------------------------
    def _answers(self, content: RecordDict) -> tuple[list[str], list[float | None]]:
        """Per privacy group: the decline reason (``""``: it trains) and the epsilon it trains at
        when that differs from the round's (own-epsilon), from its DevicePolicy and the message's config."""
        if all(policy is None for policy in self._policies):  # no privacy groups: nobody's policy says no
            return [""] * len(self._policies), [None] * len(self._policies)
        config, extras = RunConfig.from_message(dict(content.config_records.get("config", {})))
        answers, epsilons = [], []
        for policy in self._policies:
            decline = policy.check_train(config, extras) if policy is not None else None
            own = None
            if (decline is not None and self.config.privacy_demands == "own-epsilon"
                    and decline.reason in OWN_EPSILON_REASONS and math.isfinite(policy.max_epsilon)):
                own = policy.max_epsilon if config.dp_epsilon <= 0 else policy.epsilon_for(config)
                decline = policy.check_train(config.replace(dp_epsilon=own), extras)
            answers.append("" if decline is None else decline.reason)
            epsilons.append(own if decline is None else None)
        return answers, epsilons

    def _work(self, users: np.ndarray, dp: np.ndarray) -> np.ndarray:
        """Each user's work this round in the population's compute unit (0 where it costs no time)."""
        work = np.zeros(len(users))
        costly = np.flatnonzero(self.population.seconds_per_unit[users] > 0)
        settings = self.config.train_settings
        for i in costly:
            u = int(users[i])
            if u not in self._pairs:
                self._pairs[u] = train_pair_count(self.config, u)
            work[i] = pairs_trained(self._pairs[u], settings, bool(dp[i]))
            if self.population.compute_unit == "token":
                work[i] *= self._token_rate(u)
        return work

    def _token_rate(self, user: int) -> float:
        """Mean tokens (both sides, as encoded for training) per training pair of ``user``."""
        if user not in self._tokens_per_pair:
            from fedpersona.alignment.batching import encode_pairs
            from fedpersona.round.resident import resident_for
            from fedpersona.round.users import population_user

            pairs = population_user(self.config, user).train
            encoded = encode_pairs(resident_for(self.config).prompt_format, pairs, self.config.max_length)
            sizes = [len(e.chosen[0]) + len(e.rejected[0]) for e in encoded]
            self._tokens_per_pair[user] = float(np.mean(sizes)) if sizes else 0.0
        return self._tokens_per_pair[user]

    @timed
    def decide(self, messages: Sequence[Message]) -> RoundDecision:
        """Close the current training round on the clock before anyone trains (see the module docstring).

        Args:
            messages: the round's training messages, one per selected user (virtual node ids).

        Returns:
            What to deliver, the decline replies made here, and the round's outcome.
        """
        users = np.asarray([user_of(m.metadata.dst_node_id) for m in messages], np.int64)
        group = self.population.privacy_group[users]
        reason = [""] * len(users)
        own: list[float | None] = [None] * len(users)
        down, up, dp = np.zeros(len(users)), np.zeros(len(users)), np.zeros(len(users), bool)
        by_content: dict[int, tuple[list[str], list[float | None], int, int, float]] = {}
        for i, msg in enumerate(messages):
            key = id(msg.content)
            if key not in by_content:
                answers, epsilons = self._answers(msg.content)
                eps = float(msg.content.config_records.get("config", {}).get("dp-epsilon", 0.0))
                by_content[key] = (answers, epsilons, record_bytes(msg.content), record_bytes(msg.content, True), eps)
            answers, epsilons, down[i], up[i], eps = by_content[key]
            g = int(group[i])
            reason[i] = answers[g]
            own[i] = epsilons[g]
            dp[i] = (own[i] or eps) > 0
        new_user = users >= self.config.num_users
        said_no = np.asarray([r != "" for r in reason]) | new_user
        outcome = self.clock.close_round(self.round, self.plan.start_s if self.plan else self.clock.now, users,
                                         work=self._work(users, dp), bytes_down=down, bytes_up=up, declined=said_no,
                                         wanted=self.wanted)
        send, answered = [], []
        variants: dict[tuple[int, float], RecordDict] = {}
        for i, msg in enumerate(messages):
            status = outcome.status[i]
            if status == Status.DECLINED and reason[i]:
                answered.append(decline_reply(msg, reason[i]))
            elif status == Status.OK or (status == Status.DECLINED and new_user[i]):
                if own[i] is not None:
                    key = (id(msg.content), own[i])
                    if key not in variants:
                        variants[key] = _with_epsilon(msg.content, own[i])
                    msg.content = variants[key]
                send.append(msg)
        self.policy_declines += len(answered)
        self._figures[self.round] = {
            "declined_users": len(answered), "simulated_wait_s": round(self.plan.waited_s, 3) if self.plan else 0.0,
            "bytes_down_per_user": int(down.mean()) if len(down) else 0,
            "bytes_up_expected_per_user": int(up.mean()) if len(up) else 0}
        return RoundDecision(send, answered, outcome)

    @timed
    def finish(self, outcome: RoundOutcome) -> None:
        """Count a closed round and move the clock past it."""
        self.tally.add(outcome)
        self.clock.advance(outcome)
        self.outcomes[outcome.round] = outcome
        self.plan = None

    @timed
    def note_evaluation(self, replies: Iterable[Message]) -> None:
        """Keep each evaluated user's ``rounds-trained`` (what its store counts; the final evaluation
        reaches every user, so the per-group means count rounds really trained, resumed runs included)."""
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content.metric_records.get(METRICS)
            if metrics is not None and "user-index" in metrics and "rounds-trained" in metrics:
                self.rounds_trained[int(metrics["user-index"])] = int(metrics["rounds-trained"])

    # ---- the report -------------------------------------------------------------------------------------
    def row(self, server_round: int) -> dict[str, Any]:
        """``metrics.jsonl`` figures of a finished training round (empty if it had none)."""
        outcome = self.outcomes.get(server_round)
        if outcome is None:
            return {}
        return {**outcome.row(), **self._figures.get(server_round, {})}

    def resume_from(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Continue the clock and the totals of a resumed run from its finished rounds' ``metrics.jsonl`` rows."""
        self.prior_rows = list(rows)
        for row in self.prior_rows:
            if "simulated_end_s" not in row:
                continue
            self.clock.now = max(self.clock.now, float(row["simulated_end_s"]) + self.policy.server_gap_s)
            self.tally.end_s = max(self.tally.end_s, float(row["simulated_end_s"]))
            self.tally.totals["late"] += int(row.get("late_users", 0))
            self.tally.totals["surplus"] += int(row.get("surplus_users", 0))
            self.tally.totals["dropped"] += int(row.get("dropped_users", 0))
            self.tally.unavailable += int(row.get("unavailable_users", 0))
            self.tally.rounds += 1
            self.tally.incomplete_rounds += not row.get("round_complete", True)
            self.policy_declines += int(row.get("declined_users", 0))

    @timed
    def summary(self, rows: Sequence[Mapping[str, Any]], per_user: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
        """The ``summary.json`` keys of issue 25 (a uniform run: zeros, its groups one each).

        Args:
            rows: the run's ``metrics.jsonl`` rows (the recorder's).
            per_user: the training users' final accuracies (``RoundRecorder.per_user``).

        Returns:
            ``population``, ``simulated_seconds``, ``time_to_accuracy``, ``unavailable_users``,
            ``declined_users``, ``dropped_users``, ``late_users``, ``surplus_users``, ``unfit_users``,
            ``incomplete_rounds``, ``round_deadline_s``, ``over_selection``, ``min_replies``,
            ``accuracy_by_group`` and ``population_seconds`` (the server time this model took, wall clock).
        """
        started = time.perf_counter()
        totals = self.tally.summary()
        totals["declined_users"] = self.policy_declines
        rows = [*self.prior_rows, *rows]
        points = [(float(r["simulated_end_s"]) - self.tally.start_s, float(r["personalized_accuracy_mean"]))
                  for r in rows if r.get("personalized_accuracy_mean") is not None and "simulated_end_s" in r]
        out = {"population": self.population.spec.name, **totals,
               "time_to_accuracy": {f"{level:g}": t for level, t in time_to_accuracy(points, ACCURACY_LEVELS).items()},
               "round_deadline_s": self.policy.deadline_s, "over_selection": self.policy.over_selection,
               "min_replies": self.policy.min_replies, "accuracy_by_group": self.groups_report(per_user)}
        out["population_seconds"] = round(self.seconds + time.perf_counter() - started, 3)
        return out

    def groups_report(self, per_user: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
        """Per group of training users: ``users``, mean personalized and global accuracy, mean rounds trained."""
        n = min(self.config.num_users, self.population.num_users)
        users = range(n)
        personal = np.asarray([per_user.get(u, {}).get("personalized", np.nan) for u in users], float)
        overall = np.asarray([per_user.get(u, {}).get("global", np.nan) for u in users], float)
        counted = self.tally.rounds_trained[:n]
        trained = np.asarray([self.rounds_trained.get(u, counted[u]) for u in users], float)
        pairs = np.asarray([self._pairs[u] if u in self._pairs else train_pair_count(self.config, u) for u in users])
        groups = self.population.groups()
        kinds: list[Grouping] = [Grouping("tier", groups["tier"].names, groups["tier"].codes[:n]),
                                 quantile_grouping(self.population.on_fraction[:n], "availability"),
                                 Grouping("privacy", groups["privacy"].names, groups["privacy"].codes[:n]),
                                 quantile_grouping(pairs, "pairs")]
        return group_report(kinds, {"personalized_accuracy_mean": personal, "global_accuracy_mean": overall,
                                    "rounds_trained": trained})


def _with_epsilon(content: RecordDict, epsilon: float) -> RecordDict:
    """``content`` with its config asking for pair-level ``epsilon`` (the arrays shared, not copied)."""
    out = RecordDict({key: record for key, record in content.items()})
    out["config"] = ConfigRecord({**dict(content.config_records["config"]), "dp-epsilon": float(epsilon)})
    return out

