"""The ClientApp's device mode: one real user, whose everything lives in their ``--state`` directory.

A SuperNode started by ``fedpersona client`` carries ``state-dir`` in its node config. The ClientApp
then reads the user's pairs from the preference memory (``memory.sqlite``), keeps the private
adapter and privacy ledger in the state directory (``DeviceState``; never in a Flower message, never
in ``Context.state``), and stores the shared tensors it receives so generation works offline.

Why a stable ``user-index``: the server keys its per-user accuracy table by it, and the per-round
training seed derives from it; a device that restarts (new Flower node id) is still the same user.
It is ``user-index`` from the node config if given, else derived from the device's user id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpersona.alignment.trainer import TrainStats
from fedpersona.device.state import DeviceState
from fedpersona.round.train import RoundResult
from fedpersona.device.policy import Decline, DevicePolicy
from fedpersona.data.schema import UserData

if TYPE_CHECKING:
    import torch

    from fedpersona.config import RunConfig

STATE_DIR_KEY = "state-dir"
USER_INDEX_KEY = "user-index"

_OPEN: dict[Path, DeviceState] = {}


def device_state(state_dir: str | Path) -> DeviceState:
    """This process's DeviceState for ``state_dir`` (one object per directory, so the re-entrant
    training lock of a long-lived client process is shared by all its tasks)."""
    key = Path(state_dir).expanduser().resolve()
    if key not in _OPEN:
        _OPEN[key] = DeviceState(key, create=False)
    return _OPEN[key]


def device_for(node_config: Mapping[str, Any]) -> DeviceState | None:
    """The node's DeviceState in device mode, None in simulation (no ``state-dir`` in node config)."""
    state_dir = node_config.get(STATE_DIR_KEY)
    return device_state(str(state_dir)) if state_dir else None


class DeviceStore:
    """``PrivateStore`` over a DeviceState, for one round.

    DeviceState keeps the ledger as a JSON object and knows the round; the training code speaks JSON
    text and does not know the round. This adapter bridges both, nothing more.
    """

    def __init__(self, state: DeviceState, server_round: int | None = None) -> None:
        self.state = state
        self.server_round = server_round

    def load_private(self) -> dict[str, torch.Tensor] | None:
        return self.state.load_private()

    def save_private(self, tensors: Mapping[str, torch.Tensor], rounds_trained: int) -> None:
        self.state.save_private(tensors, rounds_trained, server_round=self.server_round)

    def rounds_trained(self) -> int:
        return self.state.rounds_trained()

    def load_ledger(self) -> str | None:
        ledger = self.state.load_ledger()
        return json.dumps(ledger) if ledger else None

    def save_ledger(self, ledger_json: str) -> None:
        self.state.save_ledger(json.loads(ledger_json))


def stable_index(user_id: str) -> int:
    """A non-negative 31-bit int from the user id: the same on every restart and every machine."""
    return int.from_bytes(hashlib.sha256(user_id.encode("utf-8")).digest()[:4], "big") >> 1


def device_user_index(state: DeviceState, node_config: Mapping[str, Any]) -> int:
    if USER_INDEX_KEY in node_config:
        return int(node_config[USER_INDEX_KEY])
    user_id = state.memory.user_id()
    return stable_index(user_id or str(state.dir))


def readiness_problem(state: DeviceState, min_pairs: int = 2) -> str | None:
    """Why this device cannot take part yet (None if it can): it needs a train and a test pair."""
    stats = state.memory.stats()
    if stats["pairs"] < max(2, min_pairs) or not stats["train"] or not stats["test"]:
        return (f"--state {state.dir}: the preference memory holds {stats['pairs']} pairs ({stats['train']} train, "
                f"{stats['test']} test); a round needs at least {max(2, min_pairs)} (the run's min-pairs) with one "
                "of each; add "
                f"feedback with `fedpersona feedback import FILE --state {state.dir}`")
    return None


def _as_device(config: RunConfig, index: int) -> RunConfig:
    """The run configuration as one device sees it: it is a training user, never a held-out one.

    In simulation a user index >= ``num-users`` marks a held-out (new) user; a device's index is a
    hash, so the population size is widened to include it. Nothing else reads ``num-users`` on a device.
    """
    if index < config.num_users:
        return config
    return config.replace(num_users=index + 1)


def _open_round(state: DeviceState, config: RunConfig, simulation_keys: Mapping[str, Any],
                shared: Mapping[str, torch.Tensor] | None) -> tuple[DevicePolicy, Decline | None]:
    """Every state file readable (damage is a UsageError before anything is spent), the user's policy,
    and the checks every message passes (simulation settings, model and scheme, finite shared tensors)."""
    from fedpersona.round.train import first_non_finite

    state.check_files()
    policy = DevicePolicy.load(state.dir) or DevicePolicy()
    decline = policy.check_common(config, simulation_keys, state.meta(), state.private_path.exists())
    if decline is None and shared is not None and (bad := first_non_finite(shared)) is not None:
        decline = Decline("bad-shared", f"the server's {bad} holds NaN or Inf")
    return policy, decline


def prepare_ledger(state: DeviceState, policy: DevicePolicy, config: RunConfig, user: UserData,
                   index: int, server_round: int) -> Decline | None:
    """The ledger this round trains on, within the policy, saved before training (nothing spent yet).

    A new ledger is calibrated at the policy-capped epsilon and delta, starting with what retired ledgers
    spent on the same pairs (``PrivacyRecord``); an existing one keeps its noise and only ever lowers its
    target (a round asking for more privacy). Declines when the noise is below the policy's floor or the
    pairs' earlier spending already reaches the target."""
    from fedpersona.round.users import round_seed
    from fedpersona.device.privacy_record import PrivacyRecord
    from fedpersona.privacy.dp_training import plan_ledger
    from fedpersona.privacy.ledger import BudgetSpent, PrivacyLedger

    target = policy.epsilon_for(config)
    saved = state.load_ledger()
    if saved:
        ledger = PrivacyLedger.from_json(saved)
        ledger.target_epsilon = min(ledger.target_epsilon, target)
    else:
        dp = dataclasses.replace(config.dp_settings, target_epsilon=target,
                                 delta=policy.delta_for(config, len(user.train)))
        try:
            ledger = plan_ledger(len(user.train), config.train_settings, dp, config.dp_rounds_planned,
                                 seed=round_seed(config, index, server_round),
                                 prior=PrivacyRecord(state.dir).prior_for(user.train))
        except BudgetSpent as err:
            return Decline("budget-spent", str(err))
    decline = policy.check_noise(ledger.noise_multiplier)
    if decline is None:
        state.save_ledger(ledger.to_json())
    return decline


def train_on_device(state: DeviceState, config: RunConfig, extras: Mapping[str, Any],
                    shared: Mapping[str, torch.Tensor] | None, node_config: Mapping[str, Any],
                    simulation_keys: Mapping[str, Any] | None = None) -> RoundResult:
    """One training round on the device, if its policy accepts the round; returns
    ``client.local.RoundResult`` (shared tensors only, or a decline with its reason).

    A round of the same run lineage (``fedpersona.protocol.RUN_LINEAGE``: one id for a run and every
    resumption of it) that this device already answered is answered again with the stored reply: a server
    that died mid-round and resumed gets the device's update without the device paying for it twice."""
    from fedpersona.round.train import declined_result, train_round
    from fedpersona.protocol import RUN_LINEAGE

    server_round = int(extras.get("server-round", 0))
    with state.lock():  # one training at a time on this directory, across processes
        policy, decline = _open_round(state, config, simulation_keys or {}, shared)
        decline = decline or policy.check_train(config, extras)
        if decline is None and (config.dp_epsilon > 0 or policy.require_dp) and (problem := state.ledger_problem()):
            decline = Decline("ledger-missing", problem)
        if decline is None and (problem := readiness_problem(state, config.min_pairs)):
            decline = Decline("not-enough-pairs", problem)
        if decline is not None:
            return declined_result(decline.reason, decline.detail)
        lineage = str(extras.get(RUN_LINEAGE, "") or "")
        if lineage and (replay := state.load_reply(lineage, server_round)) is not None:
            tensors, info = replay
            if shared is not None and set(shared) == set(tensors):
                tensors = {name: tensors[name] for name in shared}  # the run's key order (aggregation pairs keys)
            return RoundResult(tensors, int(info["weight"]), TrainStats(0, 0, math.nan),
                               epsilon=info.get("epsilon"))
        state.bind(config.model, config.scheme)
        if shared is not None:
            state.save_shared(shared, server_round=server_round)
        index = device_user_index(state, node_config)
        user = state.memory.user_data()
        device_config = _as_device(config, index)
        if config.dp_epsilon > 0 and (decline := prepare_ledger(state, policy, device_config, user, index,
                                                                server_round)) is not None:
            return declined_result(decline.reason, decline.detail)
        result = train_round(device_config, user, index, server_round, shared, DeviceStore(state, server_round),
                             extras)
        if lineage and not result.declined:
            state.save_reply(result.shared, {"lineage": lineage, "round": server_round,
                                             "weight": result.num_examples, "epsilon": result.epsilon})
        return result


def evaluate_on_device(state: DeviceState, config: RunConfig, extras: Mapping[str, Any],
                       shared: Mapping[str, torch.Tensor] | None, node_config: Mapping[str, Any],
                       simulation_keys: Mapping[str, Any] | None = None) -> dict[str, float | int] | Decline:
    """Held-out accuracies of this user's three models, as the evaluation reply's metrics; a ``Decline``
    when the policy keeps them on the device (the newest shared adapter is stored all the same, for
    ``fedpersona generate`` offline)."""
    from fedpersona.round.evaluate import evaluate_round
    from fedpersona.round.train import current_epsilon

    server_round = int(extras.get("server-round", 0))
    with state.lock():
        policy, decline = _open_round(state, config, simulation_keys or {}, shared)
        if decline is not None:
            return decline
        state.bind(config.model, config.scheme)
        if shared is not None:  # the newest global adapter: what `fedpersona generate` uses offline
            state.save_shared(shared, server_round=server_round)
        decline = policy.check_evaluate(config)
        if decline is None and (problem := readiness_problem(state, config.min_pairs)):
            decline = Decline("not-enough-pairs", problem)
        if decline is not None:
            return decline
        index = device_user_index(state, node_config)
        user = state.memory.user_data()
        store = DeviceStore(state, server_round)
        # index=None: no simulation-only extras (held-out-user fit, synthetic generation check)
        evaluation = evaluate_round(_as_device(config, index), user, shared, store, index=None, extras=extras)
        epsilon = current_epsilon(store)
        return {
            "num-examples": len(user.test),
            "user-index": index,
            "rounds-trained": store.rounds_trained(),
            **({"epsilon": epsilon} if epsilon is not None else {}),
            **{f"acc-{name}": value for name, value in evaluation.accuracies.items()},
            **evaluation.metrics,
        }
