"""A round's message as a device reads it: every field within a bound, checked before anything else.

A server chooses its messages, and a device must not do for a message more than a round is worth: a
100 MB ``run-lineage`` made a device train, pay epsilon for the round and then fail to store the reply
(so nothing was sent); a ``shared-rank`` of a million would build a model the device cannot hold; a
``scheme`` of ``module:NAME`` would import a module on the device. So before the message is parsed into
a ``RunConfig``, before any state file is read and before anything is spent, ``check_request`` holds
every field to a bound:

* the message: at most ``MAX_RECORDS`` records; array records only ``arrays``, of at most
  ``MAX_ARRAYS`` arrays and ``MAX_SHARED_BYTES`` bytes in all (the exact keys and shapes are checked
  against the run's model once it is loaded: ``shared_problem``);
* the config record: at most ``MAX_CONFIG_KEYS`` keys of at most ``MAX_KEY_CHARS`` characters; a text
  value at most ``MAX_TEXT_CHARS`` characters, a list at most ``MAX_LIST_ITEMS`` items; every number
  finite and within ``MAX_MAGNITUDE``; the settings that size the device's work within
  ``SETTING_BOUNDS``; ``run-lineage`` a short id (``LINEAGE``); plug-in specs by registered name only;
* then it must parse: a value ``RunConfig`` refuses is a ``bad-request`` decline, not an exception.

A message over a size bound is declined ``message-too-large``, one out of range or unreadable
``bad-request``; both before anything is read, spent or stored (``fedpersona.client.device``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpersona.device.policy import Decline
from fedpersona.protocol import ARRAYS, RUN_LINEAGE

MAX_RECORDS = 8  # a train/evaluate message holds "arrays" and "config" (a mod may add one or two)
MAX_ARRAYS = 4096  # tensors of the shared adapter (a LoRA on every linear layer of a large model: ~1,000)
MAX_SHARED_BYTES = 1 << 30  # 1 GiB in all; the exact layout is checked once the model is loaded
MAX_CONFIG_KEYS = 512  # RunConfig has ~75 settings; a strategy adds a few
MAX_KEY_CHARS = 64
MAX_TEXT_CHARS = 1024  # a model id or path, a loss spec, a list of target modules
MAX_LIST_ITEMS = 1024
MAX_MAGNITUDE = 1e15  # no setting is meaningful beyond it (ints and floats)
LINEAGE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # the server's is a uuid4 hex (fedpersona.server.resume)
# Settings that size the device's work or memory: (least, most). Anything larger is no round a device serves.
SETTING_BOUNDS: dict[str, tuple[float, float]] = {
    "rounds": (1, 1_000_000),
    "epochs": (1, 1_000),
    "min-steps": (0, 100_000),
    "max-steps": (0, 100_000),
    "batch-size": (1, 65_536),
    "max-length": (8, 32_768),
    "max-tokens-per-batch": (8, 1 << 24),
    "shared-rank": (1, 4_096),
    "private-rank": (1, 4_096),
    "pal-prototypes": (1, 256),
    "dp-max-physical-batch": (1, 65_536),
    "dp-planned-rounds": (0, 1_000_000),
    "server-round": (0, 1 << 40),
}
PLUGIN_SETTINGS = ("scheme", "loss", "strategy", "tracker")  # registry specs: NAME(key=value); no module:NAME


def check_request(content: Any) -> Decline | None:
    """Why a device does not read this message (a size or range bound broken), None if it may.

    Args:
        content: the message's ``RecordDict``.

    Returns:
        ``Decline("message-too-large" | "bad-request", what)`` or None; the text stays on the device.
    """
    records = list(content.keys())
    if len(records) > MAX_RECORDS:
        return Decline("message-too-large", f"the message holds {len(records)} records (at most {MAX_RECORDS})")
    for name, record in content.array_records.items():
        if name != ARRAYS:
            return Decline("bad-request", f"the message holds an array record {_short(name)!r}; a round sends "
                           f"only {ARRAYS!r}")
        if len(record) > MAX_ARRAYS:
            return Decline("message-too-large", f"{ARRAYS!r} holds {len(record)} arrays (at most {MAX_ARRAYS})")
        total = sum(len(array.data) for array in record.values())
        if total > MAX_SHARED_BYTES:
            return Decline("message-too-large", f"{ARRAYS!r} holds {total / 2**20:.0f} MiB (at most "
                           f"{MAX_SHARED_BYTES / 2**20:.0f} MiB)")
    config = content.config_records.get("config")
    if config is None:
        return Decline("bad-request", "the message holds no 'config' record")
    return check_config(config)


def check_config(config: Mapping[str, Any]) -> Decline | None:
    """``check_request`` for the config record alone (keys, texts, lists, numbers, lineage, plug-ins)."""
    if len(config) > MAX_CONFIG_KEYS:
        return Decline("message-too-large", f"the config holds {len(config)} keys (at most {MAX_CONFIG_KEYS})")
    for key, value in config.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
            return Decline("message-too-large", f"a config key of {len(str(key))} characters (at most "
                           f"{MAX_KEY_CHARS})")
        values = value if isinstance(value, list) else [value]
        if len(values) > MAX_LIST_ITEMS:
            return Decline("message-too-large", f"config {key!r} holds {len(values)} items (at most "
                           f"{MAX_LIST_ITEMS})")
        for item in values:
            if (problem := _item_problem(key, item)) is not None:
                return problem
    lineage = config.get(RUN_LINEAGE)
    if lineage not in (None, "") and not (isinstance(lineage, str) and LINEAGE.fullmatch(lineage)):
        size = len(lineage) if isinstance(lineage, (str, bytes)) else 0
        code = "message-too-large" if size > 64 else "bad-request"
        return Decline(code, f"{RUN_LINEAGE} must be a short id (1 to 64 of A-Z a-z 0-9 . _ -), got "
                       f"{'%d characters' % size if size else type(lineage).__name__}")
    for key, (least, most) in SETTING_BOUNDS.items():
        value = config.get(key, config.get(key.replace("-", "_")))
        if value is not None and not (isinstance(value, (int, float)) and least <= value <= most):
            return Decline("bad-request", f"config {key}={_short(repr(value))} is outside what this device serves "
                           f"({least:g} to {most:g})")
    for key in PLUGIN_SETTINGS:
        value = config.get(key)
        if isinstance(value, str) and ":" in value.split("(", 1)[0]:
            return Decline("bad-request", f"config {key}={_short(value)!r} names a module to import; a device "
                           "runs registered methods only")
    return None


def _item_problem(key: str, item: Any) -> Decline | None:
    if isinstance(item, (str, bytes)) and len(item) > MAX_TEXT_CHARS:
        return Decline("message-too-large", f"config {key!r} holds {len(item)} characters (at most "
                       f"{MAX_TEXT_CHARS})")
    if isinstance(item, bool) or not isinstance(item, (int, float, np.number)):
        return None
    if not math.isfinite(float(item)) or abs(float(item)) > MAX_MAGNITUDE:
        return Decline("bad-request", f"config {key}={item!r} is not a finite number of at most {MAX_MAGNITUDE:g}")
    return None


def shared_problem(expected: Mapping[str, Any], shared: Mapping[str, Any] | None) -> Decline | None:
    """Whether the server's shared tensors are exactly the run's (names, shapes), floating point and finite.

    Args:
        expected: the run's shared tensors by name (the resident model's ``Role.SHARED`` tensors).
        shared: what the message carries (None: no arrays).

    Returns:
        ``Decline("bad-shared", what)`` or None.
    """
    import torch

    if not expected:
        return None if not shared else Decline("bad-shared", f"the server sent {len(shared)} shared tensors for a "
                                               "scheme that has none")
    if shared is None:
        return Decline("bad-shared", "the server sent no shared tensors for a scheme that has them")
    if set(shared) != set(expected):
        missing, unknown = sorted(set(expected) - set(shared)), sorted(set(shared) - set(expected))
        return Decline("bad-shared", f"the shared tensors do not match the run's model: missing {missing[:2]}, "
                       f"unknown {[_short(n) for n in unknown[:2]]}")
    for name, tensor in shared.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            return Decline("bad-shared", f"the server's {name} has shape {tuple(tensor.shape)}, the run's model "
                           f"{tuple(expected[name].shape)}")
        if not tensor.is_floating_point():
            return Decline("bad-shared", f"the server's {name} is {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            return Decline("bad-shared", f"the server's {name} holds NaN or Inf")
    return None


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
