"""Round-by-round records of a run: per-user accuracies, traffic, and the summary contract.

``attach_recorder`` turns any strategy instance into a recording one (a subclass made on the fly), so
it works for Flower's built-ins and users' own strategies alike: training replies are measured for
bytes sent up; an evaluation round before the last evaluates a seeded sample of ``fraction-evaluate``
of the users (its row's mean, 10th percentile and worst user are over that sample), and the final
evaluation goes to *every* user, so the summary's per-user distribution is over the whole population.
Rows list each evaluated user's accuracy only when asked (``per-user-rows``): at 10,000 users a row
would otherwise carry tens of thousands of numbers.

New users (cold start, user index >= ``num-users`` of the run configuration) are kept apart: they take
no part in training, and their accuracies (``new_user_*``) sit beside the training users' in the rows
and the summary (before the final evaluation a new user has fitted nothing yet: its personalized
entry is then the global model's accuracy). The final evaluation's extra per-user values are collected too: ``gen-win-rate`` (the
generation check, summary key ``generation_win_rate``), ``private-params`` (what each device really
keeps, summary key ``private_parameters_per_user``) and the text generation check's ``gen-<decoding>-...``
values (``fedpersona.round.evaluate.text_generation_check``), averaged over the users who ran it, as the
summary's ``generation`` (``new_user_generation``): ``{decoding: {model: {measure: mean}, "win_rate": mean},
"users": n}``.

Every reply goes through the run's ``ReplyScreen`` (``fedpersona.strategies.validation``) before the
strategy sees it: only accepted replies are aggregated (training) or recorded and averaged (evaluation).
Rows carry what was set apart, per phase: ``train_rejected`` / ``eval_rejected`` (counts),
``train_rejected_reasons`` / ``eval_rejected_reasons`` and ``train_declined_reasons`` /
``eval_declined_reasons`` ({reason: count}), ``eval_declined``, ``train_rejected_by`` / ``eval_rejected_by``
(``[who, reason]`` pairs, at most ``REJECTED_BY_ROW``: users, not node ids, ``server.reply_names``); the
summary their run totals (``rejected_replies``, ``rejected_reasons``, ``declined_reasons``, both phases
together). Training rows also say how the accepted replies were bounded (``fedpersona.strategies.influence``):
``train_clipped``, ``train_weight_capped`` and the round's clip norm ``update_norm_bound`` (null: none); the
summary's ``clipped_replies`` and ``weight_capped_replies`` are their run totals.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedpersona.io import append_jsonl, atomic_write_json
from fedpersona.protocol import METRICS
from fedpersona.protocol import TRAIN_LOSS_KEY
from fedpersona.server.reply_names import ReplyNames
from fedpersona.strategies.validation import ReplyScreen, Screened, rejected_count_against

MODELS = ("personalized", "global", "base")
REJECTED_BY_ROW = 20  # (who, reason) pairs of rejected replies listed per row and phase


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p10": None, "min": None}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "p10": float(np.percentile(arr, 10)), "min": float(arr.min())}


class RoundRecorder:
    """Collects what the server sees each round and writes ``metrics.jsonl`` as rounds finish."""

    def __init__(self, *, num_rounds: int, eval_every: int, out_dir: str | Path | None,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 on_phase: Callable[[int, str], None] | None = None, screen: ReplyScreen | None = None,
                 evaluate_fraction: float = 1.0, seed: int = 0, per_user_rows: bool = True,
                 names: ReplyNames | None = None) -> None:
        self.num_rounds = num_rounds
        self.evaluate_fraction = evaluate_fraction  # users evaluated on a round before the last
        self.seed = seed  # of the evaluation samples (one per round, the same every run)
        self.per_user_rows = per_user_rows
        self.screen = screen or ReplyScreen.permissive()  # what may reach the strategy (see module docstring)
        self.names = names or ReplyNames(simulation=True)  # who sent a reply, for people (users, not node ids)
        self.screen.name_of = self.names
        self.update_norm_medians = self.screen.reference.medians  # the clip bound's history (checkpointed)
        self.bounded_replies: dict[str, int] = {"clipped": 0, "weight-capped": 0}  # run totals
        self.eval_every = eval_every
        self.out_dir = Path(out_dir) if out_dir else None
        self.on_round = on_round
        self.on_phase = on_phase or (lambda server_round, phase: None)
        self.started = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.bytes_up: list[int] = []
        self.last_eval: dict[int, dict[str, float]] = {}  # user index -> accuracies
        self._train: dict[int, dict[str, Any]] = {}
        self.epsilons: list[float] = []  # pair-level epsilon reported with training replies
        self.train_answers = 0  # training replies a ClientApp produced (accepted, declined or rejected)
        self.client_failures = 0  # replies carrying a ClientApp error, both phases
        self.first_client_error: str | None = None  # the first one's reason, one line
        self.last_epsilon: dict[int, float] = {}  # user index -> pair-level epsilon spent
        self.num_users: int | None = None  # users who train; higher indices are new users (from the config)
        self.last_new: dict[int, dict[str, float]] = {}  # new user index -> accuracies (+ gen_win_rate)
        self.private_params: dict[int, int] = {}  # user index -> private parameters its device keeps
        self.gen_metrics: dict[int, dict[str, float]] = {}  # user index -> its text generation check's values
        self.rejected_reasons: dict[str, int] = {}  # run totals, both phases: reason -> replies rejected
        self.declined_reasons: dict[str, int] = {}  # run totals, both phases: reason -> replies declined
        # more figures of a round's row, by round (the population's simulated clock, a deployment's deadline)
        self.round_figures: list[Callable[[int], dict[str, Any]]] = []
        # secure aggregation (fedpersona.server.secure): a round's protocol entries, merged into its training row
        self.train_notes: dict[int, dict[str, Any]] = {}
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "metrics.jsonl").write_text("")  # a fresh run starts a fresh log

    def should_evaluate(self, server_round: int) -> bool:
        return server_round % self.eval_every == 0 or server_round == self.num_rounds

    def _count_outcomes(self, screened: Screened, train: bool) -> None:
        if train:
            self.train_answers += len(screened.accepted) + len(screened.declined) + len(screened.rejected)
        self.client_failures += len(screened.failures)
        if screened.failures and self.first_client_error is None:
            reason = str(screened.failures[0].error.reason or "no reason given").strip()
            self.first_client_error = (reason.splitlines() or ["no reason given"])[-1][:500]

    def record_train(self, server_round: int, screened: Screened) -> None:
        """Count a round's training replies as the screen sorted them (bytes up: every reply that sent tensors)."""
        self._count_outcomes(screened, train=True)
        sent = screened.accepted + [m for m, _ in screened.rejected]
        sizes = [sum(rec.count_bytes() for rec in m.content.array_records.values()) for m in sent]
        self.bytes_up.extend(sizes)
        for m in screened.accepted + [m for m, _ in screened.declined]:  # a rejected reply's epsilon is no datum
            eps = _metric(m, "epsilon")
            if isinstance(eps, (int, float)) and not isinstance(eps, bool) and np.isfinite(eps) and eps >= 0:
                self.epsilons.append(float(eps))
        self.bounded_replies["clipped"] += screened.clipped
        self.bounded_replies["weight-capped"] += screened.weight_capped
        self._train[server_round] = {
            "train_replies": len(screened.accepted),
            "train_declined": len(screened.declined),
            "train_failures": len(screened.failures),
            **self._set_apart("train", screened),
            # bounded influence (fedpersona.strategies.influence): accepted replies clipped / weight-capped
            "train_clipped": screened.clipped, "train_weight_capped": screened.weight_capped,
            "update_norm_bound": screened.update_norm_bound if np.isfinite(screened.update_norm_bound) else None,
            "bytes_up_mean": float(np.mean(sizes)) if sizes else 0.0,
            **self.train_notes.pop(server_round, {}),
        }
        if not self.should_evaluate(server_round):
            self._finish_round(server_round, {})

    def evaluation_sample(self, server_round: int, node_ids: Iterable[int]) -> list[int]:
        """The nodes (users) evaluated in ``server_round``: every one at the last round, else a seeded
        sample of ``evaluate_fraction`` of them (at least one), in the order listed."""
        nodes = list(node_ids)
        if server_round >= self.num_rounds or self.evaluate_fraction >= 1.0:
            return nodes
        k = max(int(len(nodes) * self.evaluate_fraction), 1)
        picked = set(random.Random(f"{self.seed}/evaluate/{server_round}").sample(range(len(nodes)), k))
        return [node for i, node in enumerate(nodes) if i in picked]

    def is_new_user(self, index: int) -> bool:
        return self.num_users is not None and index >= self.num_users

    def _set_apart(self, phase: str, screened: Screened) -> dict[str, Any]:
        """Row entries for the replies the screen set apart; adds them to the run totals."""
        for totals, counts in ((self.rejected_reasons, screened.rejected_reasons),
                               (self.declined_reasons, screened.declined_reasons)):
            for reason, n in counts.items():
                totals[reason] = totals.get(reason, 0) + n
        return {f"{phase}_rejected": len(screened.rejected), f"{phase}_rejected_reasons": screened.rejected_reasons,
                f"{phase}_declined_reasons": screened.declined_reasons,
                # who was rejected and why, for people (at most REJECTED_BY_ROW of them; the counts say all)
                f"{phase}_rejected_by": [[who, reason] for who, reason in screened.rejected_by[:REJECTED_BY_ROW]]}

    def record_evaluate(self, server_round: int, screened: Screened) -> None:
        """Record the accepted evaluation replies (declined and rejected ones are only counted)."""
        self._count_outcomes(screened, train=False)
        this_round: dict[int, dict[str, float]] = {}  # training users evaluated now
        for msg in screened.accepted:
            self.names.learn(msg)  # a device's user-index names its later replies
            metrics = msg.content.metric_records.get("metrics")
            if metrics is None or "user-index" not in metrics or any(f"acc-{m}" not in metrics for m in MODELS):
                continue
            index = int(metrics["user-index"])
            entry = {m: float(metrics[f"acc-{m}"]) for m in MODELS}
            if "gen-win-rate" in metrics:
                entry["gen_win_rate"] = float(metrics["gen-win-rate"])
            gen = {k: float(v) for k, v in metrics.items() if k.startswith("gen-") and k != "gen-win-rate"
                   and isinstance(v, (int, float))}
            if gen:
                self.gen_metrics[index] = gen
            (self.last_new if self.is_new_user(index) else self.last_eval)[index] = entry
            if not self.is_new_user(index):
                this_round[index] = entry
            if "private-params" in metrics:
                self.private_params[index] = int(metrics["private-params"])
            if "epsilon" in metrics:
                self.last_epsilon[index] = float(metrics["epsilon"])
        users = sorted(this_round)
        row: dict[str, Any] = {"eval_users": len(users), "eval_declined": len(screened.declined),
                               **self._set_apart("eval", screened)}
        for model in MODELS:
            values = [this_round[u][model] for u in users]
            for stat, value in _stats(values).items():
                row[f"{model}_accuracy_{stat}"] = value
        if self.per_user_rows:
            row["per_user_personalized"] = [this_round[u]["personalized"] for u in users]
            row["per_user_global"] = [this_round[u]["global"] for u in users]
        row.update(self._extra_stats())
        if self.last_new:
            if self.per_user_rows:
                row["per_user_new_personalized"] = [self.last_new[u]["personalized"] for u in sorted(self.last_new)]
            if self.out_dir and server_round >= self.num_rounds:
                atomic_write_json(self.out_dir / "new_users.json",
                                  [{"user_index": u, **acc} for u, acc in sorted(self.last_new.items())])
        if self.last_epsilon:
            if self.per_user_rows:
                row["per_user_epsilon"] = {str(u): e for u, e in sorted(self.last_epsilon.items())}
            row["epsilon_max"] = max(self.last_epsilon.values())
        self._finish_round(server_round, row)

    def _finish_round(self, server_round: int, eval_row: dict[str, Any]) -> None:
        row = {"round": server_round, **self._train.get(server_round, {}), **eval_row,
               **{k: v for figures in self.round_figures for k, v in figures(server_round).items()},
               "wall_seconds": round(time.monotonic() - self.started, 3)}
        self.rows.append(row)
        if self.out_dir:
            append_jsonl(self.out_dir / "metrics.jsonl", row)
        if self.on_round:
            self.on_round(row)

    def per_user(self) -> dict[int, dict[str, float]]:
        """The training users' latest accuracies (new users are in ``last_new``)."""
        return dict(sorted(self.last_eval.items()))

    def _extra_stats(self) -> dict[str, Any]:
        """New users' accuracies and the generation check, where the replies carried them."""
        out: dict[str, Any] = {}
        if self.last_new:
            new = sorted(self.last_new)
            for stat, value in _stats([self.last_new[u]["personalized"] for u in new]).items():
                out[f"new_user_accuracy_{stat}"] = value
            out["new_user_global_accuracy_mean"] = _stats([self.last_new[u]["global"] for u in new])["mean"]
        for key, table in (("generation_win_rate", self.last_eval), ("new_user_generation_win_rate", self.last_new)):
            rates = [e["gen_win_rate"] for e in table.values() if "gen_win_rate" in e]
            if rates:
                out[key] = float(np.mean(rates))
        for key, new in (("generation", False), ("new_user_generation", True)):
            rows = [m for u, m in self.gen_metrics.items() if self.is_new_user(u) == new]
            if rows:
                out[key] = generation_summary(rows)
        return out

    def private_parameters_per_user(self, default: int) -> int:
        """What the training users' devices reported keeping (the largest), else ``default`` (the layout's)."""
        seen = [v for u, v in self.private_params.items() if not self.is_new_user(u)]
        return max(seen) if seen else default

    def summary_stats(self) -> dict[str, Any]:
        users = sorted(self.last_eval)
        out: dict[str, Any] = {}
        for model in MODELS:
            for stat, value in _stats([self.last_eval[u][model] for u in users]).items():
                out[f"{model}_accuracy_{stat}"] = value
        out["bytes_up_per_client_round"] = float(np.mean(self.bytes_up)) if self.bytes_up else 0.0
        out["new_users"] = len(self.last_new)
        out["train_answers"] = self.train_answers  # training replies ClientApps produced (accepted, declined, rejected)
        out["client_failures"] = self.client_failures  # ClientApp errors, both phases
        out["first_client_error"] = self.first_client_error
        out.update({"new_user_accuracy_mean": None, "new_user_accuracy_p10": None, "new_user_accuracy_min": None,
                    "new_user_global_accuracy_mean": None, "generation_win_rate": None,
                    "new_user_generation_win_rate": None, "generation": None, "new_user_generation": None})
        out.update(self._extra_stats())
        spent = list(self.last_epsilon.values()) + self.epsilons
        out["epsilon_max"] = max(spent) if spent else None
        out["rejected_replies"] = sum(self.rejected_reasons.values())
        # accepted training replies whose influence was bounded (fedpersona.strategies.influence), run totals
        out["clipped_replies"] = self.bounded_replies["clipped"]
        out["weight_capped_replies"] = self.bounded_replies["weight-capped"]
        out["rejected_reasons"] = dict(sorted(self.rejected_reasons.items()))
        out["declined_reasons"] = dict(sorted(self.declined_reasons.items()))
        return out


def common_metric_keys(replies: list[Message]) -> list[Message]:
    """Replies whose metrics differ in their keys keep (in place) only the keys every one has: in a round
    where users train at their own privacy level (a population's ``privacy-demands = own-epsilon``), a DP
    reply carries ``epsilon`` and a plain one ``train-steps``, and Flower's strategies aggregate only
    replies with the same keys. Replies that agree (every other round) are returned untouched."""
    keys = [set(m.content.metric_records[METRICS].keys()) if METRICS in m.content.metric_records else None
            for m in replies]
    if None in keys or len({frozenset(k) for k in keys}) <= 1:
        return replies
    common = set.intersection(*keys)
    for msg in replies:
        metrics = msg.content.metric_records[METRICS]
        msg.content[METRICS] = MetricRecord({k: v for k, v in metrics.items() if k in common})
    return replies


def generation_summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Users' text generation check values (``gen-<decoding>-<model>-<measure>``, ``gen-<decoding>-win-rate``)
    averaged over the users that have each (NaN values skipped), nested as
    ``{decoding: {model: {measure: mean}, "win_rate": mean}, "users": len(rows)}``; measure names use
    underscores (``pole_length``)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if np.isfinite(value):
                values.setdefault(key, []).append(value)
    out: dict[str, Any] = {"users": len(rows)}
    for key, seen in sorted(values.items()):
        decoding, _, rest = key[len("gen-"):].partition("-")
        slot = out.setdefault(decoding, {})
        if rest == "win-rate":
            slot["win_rate"] = float(np.mean(seen))
        else:
            model, _, measure = rest.partition("-")
            slot.setdefault(model, {})[measure.replace("-", "_")] = float(np.mean(seen))
    return out


def _metric(msg: Message, key: str) -> Any:
    metrics = msg.content.metric_records.get("metrics")
    return None if metrics is None or key not in metrics else metrics[key]


def _requested_metrics(messages: list[Message]) -> list[str]:
    """The metric keys a round's train messages ask every reply for (``protocol.TRAIN_LOSS_KEY``: QFedAvg's
    loss), from what was really sent."""
    for msg in messages[:1]:
        for record in msg.content.config_records.values():
            if TRAIN_LOSS_KEY in record:
                return [str(record[TRAIN_LOSS_KEY])]
    return []


def attach_recorder(strategy: Any, recorder: RoundRecorder) -> Any:
    """Make ``strategy`` record into ``recorder`` (in place; aggregation logic unchanged) and aggregate only
    the replies ``recorder.screen`` accepts; with none accepted the global tensors stay as they were."""
    base = type(strategy)
    sent: dict[str, ArrayRecord | None] = {"arrays": None}  # this round's global tensors (not strategy state)
    requested: list[str] = []  # metric keys the strategy asked every training reply for (protocol.TRAIN_LOSS_KEY)

    class Recording(base):  # type: ignore[misc, valid-type]
        def configure_train(self, server_round: int, arrays, config, grid) -> Iterable[Message]:
            recorder.on_phase(server_round, "train")
            sent["arrays"] = arrays
            messages = list(super().configure_train(server_round, arrays, config, grid))
            requested[:] = _requested_metrics(messages)
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            screened = recorder.screen.train(replies, sent["arrays"], server_round, requested=requested)
            recorder.record_train(server_round, screened)
            if not screened.accepted:
                return None, None  # Flower's Strategy.start keeps the current arrays when it gets None
            with rejected_count_against(self, len(screened.rejected)):
                return super().aggregate_train(server_round, common_metric_keys(screened.accepted))

        def configure_evaluate(self, server_round: int, arrays, config, grid) -> Iterable[Message]:
            if "num-users" in config:
                recorder.num_users = int(config["num-users"])
            if not recorder.should_evaluate(server_round):
                return []
            recorder.on_phase(server_round, "evaluate")
            config["server-round"] = server_round
            content = RecordDict({"arrays": arrays, "config": config})
            return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node)
                    for node in recorder.evaluation_sample(server_round, grid.get_node_ids())]

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
            from flwr.serverapp.exception import InconsistentMessageReplies

            if not recorder.should_evaluate(server_round):
                return None  # no evaluation this round (eval-every): the training row is already written
            screened = recorder.screen.evaluate(replies, server_round)
            recorder.record_evaluate(server_round, screened)
            if sum(_metric(m, "num-examples") or 0 for m in screened.accepted) <= 0:
                return None  # nothing to average (Flower's weighted mean would divide by zero)
            try:
                return super().aggregate_evaluate(server_round, screened.accepted)
            except InconsistentMessageReplies:
                # e.g. with DP, users never sampled yet have no epsilon to report: Flower's metric average
                # needs identical keys. The recorder has everything; the strategy's average is skipped.
                return None

    Recording.__name__ = Recording.__qualname__ = base.__name__
    strategy.__class__ = Recording
    return strategy


def write_outputs(out_dir: str | Path, summary: dict[str, Any], per_user: dict[int, dict[str, float]]) -> None:
    out = Path(out_dir)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "per_user.json", [{"user_index": u, **acc} for u, acc in per_user.items()])
