"""The ClientApp's device mode: one real user, whose everything lives in their ``--state`` directory.

A SuperNode started by ``fedpersona client`` carries ``state-dir`` in its node config. The ClientApp
then reads the user's pairs from the preference memory (``memory.sqlite``), keeps the private
adapter and privacy ledger in the state directory (``DeviceState``; never in a Flower message, never
in ``Context.state``), and stores the shared tensors it receives so generation works offline.

Why a stable ``user-index``: the server keys its per-user accuracy table by it, and the per-round
training seed derives from it; a device that restarts (new Flower node id) is still the same user.
It is ``user-index`` from the node config if given, else derived from the device's user id.

What leaves the device when it does not train: a decline's code (``fedpersona.protocol``), or a failure's
code (``fedpersona.client.failures``); the full reason goes to the device's own log and terminal
(``fedpersona.client.watch.note``). Every check that can decline runs before anything is spent or stored:
the message's bounds (``fedpersona.client.request``), the state files, the policy, the ledger, the pairs,
the shared tensors against the run's model, the room on the disk, and whether the round's epsilon can be
kept to (``prepare_ledger``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fedpersona.alignment.trainer import TrainStats
from fedpersona.client.failures import DeviceFailure, failing_as
from fedpersona.client.request import check_request, shared_problem
from fedpersona.client.watch import note, progress, progress_callback
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
    """The node's DeviceState in device mode, None in simulation (no ``state-dir`` in node config).

    Raises:
        DeviceFailure: ``state-damaged`` when the state folder is gone or not a folder.
    """
    state_dir = node_config.get(STATE_DIR_KEY)
    if not state_dir:
        return None
    with failing_as("state-damaged"):
        return device_state(str(state_dir))


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
    """Whether this round's privacy request can be served, decided before anything is spent or stored.

    How a round's epsilon applies: the ledger's lasting target is the policy's ``max_epsilon`` (what this
    state may spend over its whole life), set when the ledger is created and never changed by a message. A
    round's own ``dp-epsilon`` (and ``dp-delta``) is a cap for that round only: the round is trained if the
    epsilon spent after it, accounted at the round's delta when that is smaller than the ledger's, stays
    within ``min(dp-epsilon, max_epsilon)``; else it is declined (``epsilon-unreachable``; ``budget-spent``
    when the lasting target is what would be passed) and nothing is written. A new ledger's noise is
    calibrated for the round's cap over the run's planned rounds (the run gets the privacy it asks for), at
    the policy-capped delta, after what retired ledgers spent on the same pairs (``PrivacyRecord``); it is
    saved only once the round is known to be served. Declines too when the noise is below the policy's floor.

    Args:
        state: the device's state (locked by the caller).
        policy: the device's privacy policy.
        config: the round's settings as the device sees them.
        user: the user's pairs (``train`` sets n).
        index: the user's index (the ledger's seed).
        server_round: the round (the ledger's seed).

    Returns:
        A ``Decline`` (its detail stays on the device), or None when the round is served (ledger saved).
    """
    from fedpersona.device.privacy_record import PrivacyRecord
    from fedpersona.errors import UsageError
    from fedpersona.privacy.accountant import sample_rate_for
    from fedpersona.privacy.dp_training import plan_ledger
    from fedpersona.privacy.ledger import BudgetSpent, PrivacyLedger
    from fedpersona.round.users import round_seed

    cap = policy.epsilon_for(config)
    n, settings = len(user.train), config.train_settings
    steps, rate = settings.steps_for(n), sample_rate_for(settings.batch_size, n)
    saved = state.load_ledger()
    if saved:
        ledger = PrivacyLedger.from_json(saved)
    else:
        dp = dataclasses.replace(config.dp_settings, target_epsilon=cap, delta=policy.delta_for(config, n))
        try:
            ledger = plan_ledger(n, settings, dp, config.dp_rounds_planned, seed=round_seed(config, index, server_round),
                                 prior=PrivacyRecord(state.dir).prior_for(user.train))
        except BudgetSpent as err:  # these pairs' retired ledgers already spent the cap
            return Decline("budget-spent" if cap >= policy.max_epsilon else "epsilon-unreachable", str(err))
        except (UsageError, ValueError, ArithmeticError) as err:  # no noise reaches the cap (an epsilon of 1e-300,
            # a nearly noiseless pair-count release beside it): the accountant's search gives up or overflows
            return Decline("epsilon-unreachable", str(err))
        ledger.target_epsilon = policy.max_epsilon  # lasting: the state's whole life, not this run's request
    if (decline := policy.check_noise(ledger.noise_multiplier)) is not None:
        return decline
    if ledger.would_exceed(steps, rate):
        return Decline("budget-spent", f"epsilon spent {ledger.spent_epsilon():.2f}; this round would pass the "
                       f"lasting target {ledger.target_epsilon:g}")
    delta = min(config.dp_delta or ledger.delta, ledger.delta)
    after = dataclasses.replace(ledger, delta=delta).epsilon_after(steps, rate)
    if after > cap * (1.0 + 1e-9):
        return Decline("epsilon-unreachable", f"epsilon after this round would be {after:.3g} at delta {delta:g}; "
                       f"the round asks for at most {cap:g} (spent so far {ledger.spent_epsilon():.3g})")
    if not saved:
        state.save_ledger(ledger.to_json())
    return None


class DeviceRequest(NamedTuple):
    """A round's message as a device reads it (``read_request``)."""

    config: RunConfig
    extras: dict[str, Any]  # the strategy's keys (server-round, run-lineage, ...)
    simulation_keys: dict[str, Any]  # simulation-only settings the message carries (the policy declines them)
    shared: dict[str, torch.Tensor] | None  # the server's shared tensors (None: the message has none)


def read_request(content: Any) -> DeviceRequest | Decline:
    """A round's message as this device reads it: every field within its bound (``client.request``), then
    parsed; a ``Decline`` (``message-too-large``, ``bad-request``, ``bad-shared``; noted on the device)
    when it cannot be.

    Args:
        content: the message's ``RecordDict``.

    Returns:
        The ``DeviceRequest``, or a Decline.
    """
    from fedpersona.config import RunConfig
    from fedpersona.protocol import ARRAYS

    decline = check_request(content)
    if decline is None:
        try:
            config, extras, simulation_keys = RunConfig.from_device_message(content.config_records["config"])
        except (ValueError, TypeError, KeyError) as err:  # UsageError is a ValueError
            decline = Decline("bad-request", f"the message's config cannot be read: {err}")
    if decline is None:
        record = content.array_records.get(ARRAYS)
        try:
            shared = None if record is None or not len(record) else record.to_torch_state_dict()
        except Exception as err:  # noqa: BLE001 - arrays torch cannot hold (an odd dtype, a broken buffer)
            decline = Decline("bad-shared", f"the server's shared tensors cannot be read: {err}")
    if decline is not None:
        return _noted(decline)
    return DeviceRequest(config, extras, simulation_keys, shared)


def _noted(decline: Decline) -> Decline:
    """``decline``, its reason kept on the device (log and terminal: ``client.watch.note``); only its code
    is sent."""
    note(f"{decline.detail or decline.reason} ({decline.reason})")
    return decline


@contextmanager
def _round_lock(state: DeviceState) -> Iterator[None]:
    """The state's training lock; a held lock is ``state-busy``, a lock file that cannot be written
    ``storage-unwritable`` (``client.failures``)."""
    with ExitStack() as stack:
        with failing_as("state-busy"):
            stack.enter_context(state.lock())
        yield


def _shared_declined(config: RunConfig, shared: Mapping[str, torch.Tensor] | None) -> Decline | None:
    """The run's model loaded (``model-unavailable`` if it cannot be) and the server's shared tensors checked
    against it: exactly its shared names and shapes, floating point, finite (``bad-shared``)."""
    from fedpersona.model.adapters import Role
    from fedpersona.round.resident import resident_for

    with failing_as("model-unavailable"):
        resident = resident_for(config)
    expected = {name: resident.adapters.params[name] for name in resident.adapters.names(Role.SHARED)}
    return shared_problem(expected, shared)


ROUND_MARGIN_BYTES = 1 << 20  # ledger, counters, meta and SQLite's journal beside the adapters


def check_room(state: DeviceState, shared: Mapping[str, torch.Tensor] | None) -> None:
    """Fail ``storage-unwritable`` before anything is spent when the disk holding the state cannot take
    what a round writes: the shared adapter and the reply (each beside its old copy until the rename), the
    private adapter, and a margin. A disk that fills up later still fails the write; this keeps the common
    case (a disk already full) from paying for a round it cannot store.

    Raises:
        DeviceFailure: too little free space.
    """
    import os

    shared_bytes = sum(t.numel() * t.element_size() for t in (shared or {}).values())
    private = state.private_path.stat().st_size if state.private_path.exists() else shared_bytes
    needed = 3 * shared_bytes + 2 * private + ROUND_MARGIN_BYTES
    stat = os.statvfs(state.dir)
    free = stat.f_bavail * stat.f_frsize
    if free < needed:
        raise DeviceFailure("storage-unwritable", f"no space left on the device holding --state {state.dir}: "
                            f"{free / 2**20:.1f} MiB free, a round writes about {needed / 2**20:.1f} MiB; free some "
                            "space, then the next round trains")


def train_on_device(state: DeviceState, config: RunConfig, extras: Mapping[str, Any],
                    shared: Mapping[str, torch.Tensor] | None, node_config: Mapping[str, Any],
                    simulation_keys: Mapping[str, Any] | None = None, secure: bool = False) -> RoundResult:
    """One training round on the device, if its policy accepts the round; returns
    ``client.local.RoundResult`` (shared tensors only, or a decline with its reason). ``secure``: the round
    runs under secure aggregation (``fedpersona.client.secure``; a policy may require it).

    A round of the same run lineage (``fedpersona.protocol.RUN_LINEAGE``: one id for a run and every
    resumption of it) that this device already answered is answered again with the stored reply: a server
    that died mid-round and resumed gets the device's update without the device paying for it twice."""
    from fedpersona.round.train import declined_result, train_round
    from fedpersona.protocol import RUN_LINEAGE

    server_round = int(extras.get("server-round", 0))
    with _round_lock(state):  # one training at a time on this directory, across processes
        with failing_as("state-damaged"):
            policy, decline = _open_round(state, config, simulation_keys or {}, shared)
        decline = decline or policy.check_train(config, extras) or policy.check_secure_aggregation(secure)
        if decline is None and (config.dp_epsilon > 0 or policy.require_dp) and (problem := state.ledger_problem()):
            decline = Decline("ledger-missing", problem)
        if decline is None and (problem := readiness_problem(state, config.min_pairs)):
            decline = Decline("not-enough-pairs", problem)
        if decline is not None:
            return declined_result(_noted(decline).reason)
        lineage = str(extras.get(RUN_LINEAGE, "") or "")
        if lineage and (replay := state.load_reply(lineage, server_round)) is not None:
            tensors, info = replay
            if shared is not None and set(shared) == set(tensors):
                tensors = {name: tensors[name] for name in shared}  # the run's key order (aggregation pairs keys)
            return RoundResult(tensors, int(info["weight"]), TrainStats(0, 0, math.nan),
                               epsilon=info.get("epsilon"))
        index = device_user_index(state, node_config)
        device_config = _as_device(config, index)
        if (decline := _shared_declined(device_config, shared)) is not None:
            return declined_result(_noted(decline).reason)
        check_room(state, shared)
        state.bind(config.model, config.scheme)
        user = state.memory.user_data()
        if config.dp_epsilon > 0 and (decline := prepare_ledger(state, policy, device_config, user, index,
                                                                server_round)) is not None:
            return declined_result(_noted(decline).reason)
        if shared is not None:
            state.save_shared(shared, server_round=server_round)
        result = train_round(device_config, user, index, server_round, shared, DeviceStore(state, server_round),
                             extras, progress=progress_callback())
        if result.declined:  # diverged (or budget-spent after all): the code alone leaves, no epsilon
            return declined_result(_noted(Decline(result.reason, result.detail)).reason)
        if lineage:
            _keep_reply(state, result, lineage, server_round)
        return result


def _keep_reply(state: DeviceState, result: RoundResult, lineage: str, server_round: int) -> None:
    """Store the reply for a resumed server's repeat of the round; a disk too full for it still sends the
    reply (the round is paid for; only its replay is lost, noted on the device)."""
    from fedpersona.client.failures import storage_code

    try:
        state.save_reply(result.shared, {"lineage": lineage, "round": server_round,
                                         "weight": result.num_examples, "epsilon": result.epsilon})
    except OSError as err:
        if storage_code(err) is None:
            raise
        note(f"the reply of round {server_round} is sent but not kept for a repeat ({err}); free space on the "
             f"disk holding --state {state.dir}")


def evaluate_on_device(state: DeviceState, config: RunConfig, extras: Mapping[str, Any],
                       shared: Mapping[str, torch.Tensor] | None, node_config: Mapping[str, Any],
                       simulation_keys: Mapping[str, Any] | None = None) -> dict[str, float | int] | Decline:
    """Held-out accuracies of this user's three models, as the evaluation reply's metrics; a ``Decline``
    when the policy keeps them on the device (the newest shared adapter is stored all the same, for
    ``fedpersona generate`` offline)."""
    from fedpersona.round.evaluate import evaluate_round
    from fedpersona.round.train import current_epsilon

    server_round = int(extras.get("server-round", 0))
    with _round_lock(state):
        with failing_as("state-damaged"):
            policy, decline = _open_round(state, config, simulation_keys or {}, shared)
        index = device_user_index(state, node_config)
        device_config = _as_device(config, index)
        if decline is None:
            decline = _shared_declined(device_config, shared)
        if decline is not None:
            return _noted(decline)
        state.bind(config.model, config.scheme)
        if shared is not None:  # the newest global adapter: what `fedpersona generate` uses offline
            state.save_shared(shared, server_round=server_round)
        decline = policy.check_evaluate(config)
        if decline is None and (problem := readiness_problem(state, config.min_pairs)):
            decline = Decline("not-enough-pairs", problem)
        if decline is not None:
            return _noted(decline)
        user = state.memory.user_data()
        store = DeviceStore(state, server_round)
        progress("evaluate", 0, 1)
        # index=None: no simulation-only extras (held-out-user fit, synthetic generation check)
        evaluation = evaluate_round(device_config, user, shared, store, index=None, extras=extras)
        progress("evaluate", 1, 1)
        epsilon = current_epsilon(store)
        return {
            "num-examples": len(user.test),
            "user-index": index,
            "rounds-trained": store.rounds_trained(),
            **({"epsilon": epsilon} if epsilon is not None else {}),
            **{f"acc-{name}": value for name, value in evaluation.accuracies.items()},
            **evaluation.metrics,
        }
