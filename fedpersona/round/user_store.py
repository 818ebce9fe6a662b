"""Simulated users' private state, keyed by user, outside any Flower node.

In a simulation at scale a worker trains whichever users a message names (``fedpersona.server.user_grid``),
so a user's private adapter, round counter and privacy ledger cannot live in a node's ``Context`` (which
Ray would also ship to the actor and back on every call, growing with the users it held). They live in
one folder per run instead, two small files per user that has trained: ``<user>.safetensors`` (private
tensors) and ``<user>.json`` (rounds trained, ledger), each written atomically (temp file + rename), so
a worker killed mid-write leaves the previous state. Users who never trained have no files: a population
of 10,000 costs nothing until its users train.

The folder is made by the server for one run and removed at its end (``UserStore.create`` /
``UserStore.remove``) in its temp folder; every worker of a simulation on one machine reaches it. On a
multi-machine Ray cluster that folder must be on storage every node mounts at the same path (set
``TMPDIR`` to such a path for the server). Real devices keep their state in their own state
folder (``fedpersona.device.state``), not here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedpersona.io import atomic_write, atomic_write_json


class UserFiles:
    """One simulated user's ``PrivateStore`` (``fedpersona.round``) in a ``UserStore`` folder."""

    def __init__(self, root: Path, user: int) -> None:
        self.tensors_path = root / f"{user}.safetensors"
        self.meta_path = root / f"{user}.json"

    def _meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def _write_meta(self, **changes) -> None:
        meta = {**self._meta(), **changes}
        atomic_write_json(self.meta_path, meta)

    def load_private(self) -> dict[str, torch.Tensor] | None:
        return load_file(self.tensors_path) if self.tensors_path.exists() else None

    def save_private(self, tensors: Mapping[str, torch.Tensor], rounds_trained: int) -> None:
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        atomic_write(self.tensors_path, lambda tmp: save_file(cpu, str(tmp)))
        self._write_meta(rounds_trained=rounds_trained)

    def rounds_trained(self) -> int:
        return int(self._meta().get("rounds_trained", 0))

    def load_ledger(self) -> str | None:
        return self._meta().get("ledger")

    def save_ledger(self, ledger_json: str) -> None:
        self._write_meta(ledger=ledger_json)


class UserStore:
    """The folder of a simulation run's users' private state."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def create(cls) -> UserStore:
        """A fresh, private (mode 0700) folder in the system's temp folder."""
        return cls(tempfile.mkdtemp(prefix="fedpersona-users-"))

    def user(self, index: int) -> UserFiles:
        if not self.root.is_dir():
            raise FileNotFoundError(f"the simulation's user store {self.root} is gone (removed at the end of its run)")
        return UserFiles(self.root, int(index))

    def users_with_state(self) -> int:
        """How many users have private state (have trained)."""
        return sum(1 for _ in self.root.glob("*.safetensors"))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
