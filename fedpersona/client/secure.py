"""A user's side of secure aggregation: answer the four SecAgg+ stages, keep the secrets where the user is.

``fedpersona.server.secure`` sends ``train.secure_aggregation`` messages; the ClientApp routes them here.
One user is one participant (``fedpersona.secagg.Client``): its two key pairs, its self-mask seed and the
shares its neighbours entrust to it live between stages

* on a device, in its state folder (``secure_aggregation.json``, beside the private adapter; the folder
  is the user's, mode 0700): a device that restarts mid-round still holds them; never in a message;
* in a simulation, in the run's user store (``<store>/secagg/<user>.json``, fedpersona.round.user_store):
  every simulated user of a cohort has its own, on the simulation's machines, never in a message.

The masked-input stage is where a user trains: the message carries the global tensors and run config
like a plain TRAIN message, plus the quantization plan. The update (shared tensors returned by training
minus those received, in the server's tensor order) is clipped to the plan's L2 norm (and DP-FedAvg's
``clipping_norm`` when asked), weighted (``num-examples`` as in a plain reply: 1 under user-level DP),
quantized (``QuantizationPlan.encode``), masked and sent packed to b bits. A user who declines the round
(its policy, its budget, a new user, training that diverged or failed) sends a zero contribution of
weight 0: the server cannot tell it from the others, and no reason leaves the device.

What a reply carries: ``secagg.reply`` (the protocol's reply: keys, ciphertexts, shares) and, at
masked-input, ``secagg.vector``. No metrics: the weight is inside the sum; steps, loss and epsilon stay
on the device. A request the user refuses (``ProtocolError``: out of order, inconsistent, too few
neighbours) gets an empty reply on a device (it simply does not take part) and an error entry in a
cohort reply; either way the server counts a dropout.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedpersona.client.cohort import cohort_of, train_cohort
from fedpersona.client.device import device_for, train_on_device
from fedpersona.config import RunConfig
from fedpersona.device.state import SECURE_AGGREGATION_FILE
from fedpersona.io import atomic_write_json
from fedpersona.protocol import (ARRAYS, COHORT_ERROR, SECAGG_PLAN, SECAGG_REPLY, SECAGG_REQUEST, SECAGG_VECTOR,
                                 cohort_key)
from fedpersona.round.train import RoundResult
from fedpersona.secagg import Client, ProtocolError, QuantizationPlan
from fedpersona.secagg import messages as m
from fedpersona.secagg.quantize import clip_l2
from fedpersona.secagg.wire import pack_vector

log = logging.getLogger(__name__)

STORE_FOLDER = "secagg"
CLIPPING_NORM_KEY = "clipping_norm"  # DP-FedAvg's clip in the train config (Flower's client-side wrapper)

Contribution = Callable[[], tuple[np.ndarray, float]]  # the update (d,) and its weight


class SecretFile:
    """One participant's ``Client`` state in a JSON file (bytes as base64), written atomically.

    Args:
        path: the file (its folder is created owner-only if missing).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        """The saved state, None if there is none (or it cannot be read: the round is lost for this user)."""
        try:
            import json

            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return {key: _decode(value) for key, value in raw.items()} if isinstance(raw, dict) else None

    def save(self, state: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(self.path, {key: _encode(value) for key, value in state.items()})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def num_params(arrays: ArrayRecord) -> int:
    """Coordinates of the global tensors: the update's length."""
    return sum(int(np.prod(arrays[key].shape)) for key in arrays.keys())


def plan_of(content: RecordDict) -> QuantizationPlan:
    """The masked-input message's ``QuantizationPlan`` (ProtocolError if missing or malformed)."""
    record = content.config_records.get(SECAGG_PLAN)
    try:
        return QuantizationPlan(clip_norm=float(record["clip-norm"]), weight_cap=float(record["weight-cap"]),
                                max_summands=int(record["max-summands"]), modulus_bits=int(record["modulus-bits"]))
    except Exception as exc:  # noqa: BLE001 - a missing record, key or a value out of range: the server's fault
        raise ProtocolError(f"the masked-input request's {SECAGG_PLAN} is missing or invalid ({exc})") from None


def contribution_of(result: RoundResult, received: ArrayRecord, config: RunConfig,
                    train_config: Mapping[str, Any]) -> tuple[np.ndarray, float]:
    """A trained (or declined) user's update and weight: what goes into the sum.

    Args:
        result: the user's round (shared tensors only; declined: nothing).
        received: the global tensors the server sent (their order is the vector's order).
        config: the run configuration.
        train_config: the message's config (DP-FedAvg's ``clipping_norm`` when the server asks for it).

    Returns:
        (update float64 (d,), weight): ``shared - received`` clipped to ``clipping_norm`` if asked, and
        ``num-examples`` as a plain reply would claim it (1 under user-level DP); (zeros, 0.0) if declined.
    """
    base = [received[key].numpy().astype(np.float64).ravel() for key in received.keys()]
    size = sum(part.size for part in base)
    if result.declined:
        return np.zeros(size), 0.0
    parts = [result.shared[key].detach().to("cpu").double().numpy().ravel() - ref
             for key, ref in zip(received.keys(), base, strict=True)]
    update = np.concatenate(parts) if parts else np.zeros(0)
    if (clip := float(train_config.get(CLIPPING_NORM_KEY, 0) or 0)) > 0:
        update = clip_l2(update, clip)
    return update, 1.0 if config.user_dp_noise > 0 else float(result.num_examples)


def answer(request: Mapping[str, Any], secrets: SecretFile, contribution: Contribution | None = None,
           plan: QuantizationPlan | None = None, num_params: int | None = None,
           rounding_seed: int | None = None) -> RecordDict:
    """One participant's reply to one stage's request, its state loaded from and saved to ``secrets``.

    Args:
        request: the protocol request (``fedpersona.secagg.messages``), addressed to this participant.
        secrets: where its ``Client`` state lives between stages (removed after the unmask stage).
        contribution: masked-input only: computes (update, weight), called once the request is checked.
        plan: masked-input only: the round's quantization plan.
        num_params: masked-input only: coordinates of the global tensors received (checked against the setup's
            vector length before anything is trained).
        rounding_seed: masked-input only: seeds the stochastic rounding of the update (a simulation: the run's
            seed, the user and the round, so a run repeats); None (a device): fresh randomness.

    Returns:
        The reply's records: ``secagg.reply``, and ``secagg.vector`` at masked-input.

    Raises:
        ProtocolError: the request is refused (out of order, inconsistent, no state for it).
    """
    stage, user = request.get(m.STAGE), m.get_int(request, m.USER)
    if stage == m.SETUP:
        client = Client(user)
        reply = client.setup(request)
    else:
        saved = secrets.load()
        if saved is None or saved.get("user") != user:
            raise ProtocolError(f"user {user} holds no secure-aggregation state for a {stage!r} request")
        client = Client.from_state(saved)
        if stage == m.SHARE_KEYS:
            reply = client.share_keys(request)
        elif stage == m.UNMASK:
            reply = client.unmask(request)
        elif stage == m.MASKED_INPUT:
            reply = _masked_input(client, request, contribution, plan, num_params, rounding_seed)
        else:
            raise ProtocolError(f"unknown secure-aggregation stage {stage!r}")
    if client.expects is None:
        secrets.clear()  # the round's secrets are forgotten
    else:
        secrets.save(client.to_state())
    records = RecordDict()
    vector = reply.pop(m.MASKED_VECTOR, None)
    records[SECAGG_REPLY] = ConfigRecord(reply)
    if vector is not None:
        records[SECAGG_VECTOR] = ArrayRecord({m.MASKED_VECTOR: Array(pack_vector(vector, client.modulus_bits))})
    return records


def _masked_input(client: Client, request: Mapping[str, Any], contribution: Contribution | None,
                  plan: QuantizationPlan | None, num_params: int | None,
                  rounding_seed: int | None = None) -> dict[str, Any]:
    if contribution is None or plan is None or num_params is None:
        raise ProtocolError("a masked-input request needs the round's plan and global tensors")
    if plan.vector_length(num_params) != client.vector_length:
        raise ProtocolError(f"the global tensors hold {num_params} coordinates; the setup's vector length is "
                            f"{client.vector_length}")
    if plan.modulus_bits != client.modulus_bits:
        raise ProtocolError(f"the plan's {plan.modulus_bits} bits differ from the setup's {client.modulus_bits}")
    if client.expects != m.MASKED_INPUT:  # a repeated or early request: refused before anything is trained
        raise ProtocolError(f"user {client.user} expects a {client.expects!r} request, not a masked-input one")
    m.expect(request, m.MASKED_INPUT, client.round_id)  # a stale or forged request: refused before training
    update, weight = contribution()
    if update.shape != (num_params,):
        raise ProtocolError(f"the update has {update.size} coordinates, the global tensors {num_params}")
    rng = np.random.default_rng(None if rounding_seed is None else [rounding_seed, user_seed(client.user),
                                                                      m.get_int(request, m.ROUND)])
    vector = plan.encode(update, weight, rng)
    return client.masked_input(request, vector)


def user_seed(user: int) -> int:
    """A participant id as a non-negative seed word (ids are user indices in a simulation)."""
    return int(user) % (2**63)


# ---- the ClientApp's entry point ---------------------------------------------------------------------
def answer_message(msg: Message, context: Context) -> RecordDict:
    """The content of the reply to a ``train.secure_aggregation`` message (a device's, or a cohort's)."""
    if cohort_of(msg) is not None:
        return _answer_cohort(msg, context)
    state = device_for(context.node_config)
    if state is None:
        raise ProtocolError("secure aggregation runs on a device (fedpersona client) or in a simulation's cohort "
                            "messages; this node is neither")
    return _answer_device(msg, context, state)


def check_bounds(request: Mapping[str, Any]) -> None:
    """Hold a request to a device's bounds before any work (``fedpersona.client.request``'s): at most
    ``MAX_CONFIG_KEYS`` keys, lists of at most ``MAX_LIST_ITEMS`` items (neighbours, holders: a server cannot
    make a device do a million key agreements), values of at most ``MAX_TEXT_CHARS`` bytes or characters.

    Raises:
        ProtocolError: a bound broken.
    """
    from fedpersona.client.request import MAX_CONFIG_KEYS, MAX_LIST_ITEMS, MAX_TEXT_CHARS

    if len(request) > MAX_CONFIG_KEYS:
        raise ProtocolError(f"the request holds {len(request)} keys (at most {MAX_CONFIG_KEYS})")
    for key, value in request.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if len(items) > MAX_LIST_ITEMS:
            raise ProtocolError(f"request key {key!r} lists {len(items)} items (at most {MAX_LIST_ITEMS})")
        if any(isinstance(item, (str, bytes)) and len(item) > MAX_TEXT_CHARS for item in items):
            raise ProtocolError(f"request key {key!r} holds a value over {MAX_TEXT_CHARS} bytes")


def _answer_device(msg: Message, context: Context, state: Any) -> RecordDict:
    from fedpersona.client.watch import note

    record = msg.content.config_records.get(SECAGG_REQUEST)
    request = dict(record) if record is not None else {}
    stage = request.get(m.STAGE)
    received = msg.content.array_records.get(ARRAYS, ArrayRecord())
    train_config = msg.content.config_records.get("config", ConfigRecord())

    def contribution() -> tuple[np.ndarray, float]:
        """Train as a plain round would (every bound and policy check of ``train_on_device``); a decline or a
        failure adds a zero contribution, its reason kept on the device."""
        from fedpersona.client.device import read_request
        from fedpersona.device.policy import Decline
        from fedpersona.round.train import declined_result

        config = RunConfig()
        try:
            parsed = read_request(msg.content)  # every field within its bound, first
            if isinstance(parsed, Decline):
                result = declined_result(parsed.reason)
            else:
                config = parsed.config
                result = train_on_device(state, parsed.config, parsed.extras, parsed.shared, context.node_config,
                                         parsed.simulation_keys, secure=True)
        except Exception as exc:  # noqa: BLE001 - the server gets a zero contribution, no reason
            note(f"training failed on this device ({type(exc).__name__}: {exc}); it adds nothing to the sum",
                 level=logging.ERROR, exc_info=exc)
            result = declined_result("diverged")
        return contribution_of(result, received, config, train_config)

    try:
        check_bounds(request)  # list lengths and sizes, before any work
        plan = plan_of(msg.content) if stage == m.MASKED_INPUT else None
        return answer(request, SecretFile(state.dir / SECURE_AGGREGATION_FILE),
                      contribution if stage == m.MASKED_INPUT else None, plan, num_params(received))
    except ProtocolError as exc:
        note(f"secure aggregation: this device declines the {stage} request: {exc}", level=logging.WARNING)
        return RecordDict()  # nothing: to the server, a dropout


def _answer_cohort(msg: Message, context: Context) -> RecordDict:
    users, store = cohort_of(msg)
    requests = {u: msg.content.config_records.get(cohort_key(u, SECAGG_REQUEST)) for u in users}
    secrets = {u: SecretFile(store.root / STORE_FOLDER / f"{u}.json") for u in users}
    stages = {str(r.get(m.STAGE)) if r is not None else None for r in requests.values()}
    if stages != {m.MASKED_INPUT}:
        out: dict[int, RecordDict | BaseException] = {}
        for user, record in requests.items():
            try:
                if record is None:
                    raise ProtocolError(f"the cohort message holds no request for user {user}")
                out[user] = answer(dict(record), secrets[user])
            except Exception as exc:  # noqa: BLE001 - this user's part fails, the others go on
                out[user] = exc
        return pack_cohort_reply(out)
    config, extras = RunConfig.from_message(msg.content["config"])
    received = msg.content.array_records.get(ARRAYS, ArrayRecord())
    shared = received.to_torch_state_dict() if len(received) else None
    train_config = msg.content["config"]
    plan = plan_of(msg.content)

    def user_reply(config: RunConfig, user: int, result: RoundResult) -> RecordDict:
        return answer(dict(requests[user]), secrets[user],
                      lambda: contribution_of(result, received, config, train_config), plan, num_params(received),
                      rounding_seed=config.seed)  # simulated users: a run repeats, rounding included

    return train_cohort(msg, context, config, extras, shared, user_reply)


def pack_cohort_reply(parts: Mapping[int, RecordDict | BaseException]) -> RecordDict:
    """A cohort reply: each user's records under ``user-<u>.<kind>``, or one line for a user that failed."""
    reply = RecordDict()
    for user, records in parts.items():
        if isinstance(records, BaseException):
            reason = f"{type(records).__name__}: {records}".splitlines()[0][:300]
            reply[cohort_key(user, COHORT_ERROR)] = ConfigRecord({"reason": reason})
            continue
        for kind, record in records.items():
            reply[cohort_key(user, kind)] = record
    return reply


def describe_secure_reply(message: Message, reply: Message, notes: list[str] | tuple[str, ...] = ()) -> str:
    """The device's own line for one secure-aggregation stage it answered (``fedpersona client``'s terminal).

    Args:
        message: the stage's request message.
        reply: the reply sent.
        notes: what the device noted on the task (a decline's reason, ``fedpersona.client.watch``).

    Returns:
        One line: what was sent, or that the request was declined.
    """
    record = message.content.config_records.get(SECAGG_REQUEST)
    stage = str(record.get(m.STAGE)) if record is not None else "?"
    if reply.has_error() or not len(reply.content):
        return f"secure aggregation: declined the {stage} request; nothing was sent (details in the log)"
    lines = {
        m.SETUP: "secure aggregation: made this round's two key pairs, sent their public halves",
        m.SHARE_KEYS: "secure aggregation: sent key shares, each encrypted to one neighbour",
        m.MASKED_INPUT: "secure aggregation: " + (f"{notes[-1]}; sent a zero contribution, masked" if notes else
                                                 "trained, then sent the update clipped, quantized and masked"),
        m.UNMASK: "secure aggregation: sent the unmasking shares; this round's secrets are deleted",
    }
    return lines.get(stage, f"secure aggregation: answered the {stage} request")
