"""Where a user's private tensors, round counter and privacy ledger persist between rounds.

The round code (``fedpersona.round.train`` / ``evaluate``) reads and writes a user's private state only
through a ``PrivateStore``: the run's user store in a simulation (``fedpersona.round.user_store``), the
device's state folder in deployment (``fedpersona.client.device.DeviceStore``), or this process's memory
(``MemoryStore``: benchmarks and tests). Nothing in a store ever goes into a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch


class PrivateStore(Protocol):
    """Where a user's private tensors and small counters persist between rounds."""

    def load_private(self) -> dict[str, torch.Tensor] | None: ...

    def save_private(self, tensors: Mapping[str, torch.Tensor], rounds_trained: int) -> None: ...

    def rounds_trained(self) -> int: ...

    def load_ledger(self) -> str | None: ...

    def save_ledger(self, ledger_json: str) -> None: ...


class MemoryStore:
    """A ``PrivateStore`` in this process's memory (benchmarks and tests: one per simulated user)."""

    def __init__(self) -> None:
        self.private: dict[str, torch.Tensor] | None = None
        self.ledger: str | None = None
        self.rounds = 0

    def load_private(self) -> dict[str, torch.Tensor] | None:
        return None if self.private is None else {k: v.clone() for k, v in self.private.items()}

    def save_private(self, tensors: Mapping[str, torch.Tensor], rounds_trained: int) -> None:
        self.private, self.rounds = {k: v.clone() for k, v in tensors.items()}, rounds_trained

    def rounds_trained(self) -> int:
        return self.rounds

    def load_ledger(self) -> str | None:
        return self.ledger

    def save_ledger(self, ledger_json: str) -> None:
        self.ledger = ledger_json
