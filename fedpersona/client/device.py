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

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpersona.client.device_state import DeviceState
from fedpersona.data.schema import UserData
from fedpersona.errors import UsageError

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


def device_user(state: DeviceState, config: RunConfig) -> UserData:
    """The user's pairs for this round (one consistent snapshot of the memory)."""
    problem = readiness_problem(state, config.min_pairs)
    if problem:
        raise UsageError(problem)
    return state.memory.user_data()


def _as_device(config: RunConfig, index: int) -> RunConfig:
    """The run configuration as one device sees it: it is a training user, never a held-out one.

    In simulation a user index >= ``num-users`` marks a held-out (new) user; a device's index is a
    hash, so the population size is widened to include it. Nothing else reads ``num-users`` on a device.
    """
    if index < config.num_users:
        return config
    return config.replace(num_users=index + 1)


def train_on_device(state: DeviceState, config: RunConfig, extras: Mapping[str, Any],
                    shared: Mapping[str, torch.Tensor] | None, node_config: Mapping[str, Any]):
    """One training round on the device; returns ``client.local.RoundResult`` (shared tensors only)."""
    from fedpersona.client.local import train_round

    server_round = int(extras.get("server-round", 0))
    with state.lock():  # one training at a time on this directory, across processes
        state.bind(config.model, config.scheme)
        if shared is not None:
            state.save_shared(shared, server_round=server_round)
        index = device_user_index(state, node_config)
        user = device_user(state, config)
        return train_round(_as_device(config, index), user, index, server_round, shared,
                           DeviceStore(state, server_round), extras)


def evaluate_on_device(state: DeviceState, config: RunConfig, extras: Mapping[str, Any],
                       shared: Mapping[str, torch.Tensor] | None,
                       node_config: Mapping[str, Any]) -> dict[str, float | int]:
    """Held-out accuracies of this user's three models, as the evaluation reply's metrics."""
    from fedpersona.client.local import current_epsilon, evaluate_round

    server_round = int(extras.get("server-round", 0))
    with state.lock():
        state.bind(config.model, config.scheme)
        if shared is not None:  # the newest global adapter: what `fedpersona generate` uses offline
            state.save_shared(shared, server_round=server_round)
        index = device_user_index(state, node_config)
        user = device_user(state, config)
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
