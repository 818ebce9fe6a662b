"""Simulated users' private state, keyed by user, outside any Flower node.

In a simulation at scale a worker trains whichever users a message names (``fedpersona.server.user_grid``),
so a user's private adapter, round counter and privacy ledger cannot live in a node's ``Context`` (which
Ray would also ship to the actor and back on every call, growing with the users it held). They live in
one folder per run instead, two small files per user and round it trained in: ``<user>.r<round>.safetensors``
(private tensors) and ``<user>.r<round>.json`` (rounds trained, ledger), each written atomically (temp file +
rename), so a worker killed mid-write leaves the previous state. Users who never trained have no files: a
population of 10,000 costs nothing until its users train.

Why versions by round: a resumed simulation (``simulate --resume``) reruns the rounds after its last
checkpoint, and a user that trained in a round the killed run did not finish must start that round again
from the state it had before it. So a user trains round ``r`` from its newest state of a round before ``r``
and is evaluated in round ``r`` on its newest state up to ``r`` (``as_of``); each save keeps the newest
earlier version beside it (the server's checkpoints keep two rounds too) and removes older ones.

A run without checkpoints makes its folder in the temp folder and removes it at its end
(``UserStore.create`` / ``UserStore.remove``); a run with checkpoints keeps it beside them
(``CHECKPOINT_DIR/users``), so a resumed run finds its users. Every worker of a simulation on one machine
reaches it; on a multi-machine Ray cluster the folder must be on storage every node mounts at the same path
(set ``TMPDIR``, or the checkpoint folder, to such a path). Real devices keep their state in their own state
folder (``fedpersona.device.state``), not here.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedpersona.io import atomic_write, atomic_write_json


_VERSION = re.compile(r"^(?P<user>\d+)\.r(?P<round>\d+)\.json$")


class UserFiles:
    """One simulated user's ``PrivateStore`` (``fedpersona.round.stores``) in a ``UserStore`` folder.

    Args:
        root: the store's folder.
        user: the user's index.
        server_round: the round this object works for: it reads the newest state of a round ``<= as_of`` and
            writes the state of ``server_round``.
        as_of: the newest round whose state may be read (``server_round - 1`` to train, ``server_round`` to
            evaluate); None: the newest of all.
    """

    def __init__(self, root: Path, user: int, server_round: int = 0, as_of: int | None = None) -> None:
        self.root = root
        self.user = int(user)
        self.server_round = int(server_round)
        self.as_of = as_of
        self._read = self._newest(as_of)

    def _rounds(self) -> list[int]:
        found = []
        for path in self.root.glob(f"{self.user}.r*.json"):
            match = _VERSION.match(path.name)
            if match and int(match.group("user")) == self.user:
                found.append(int(match.group("round")))
        return sorted(found)

    def _newest(self, as_of: int | None) -> int | None:
        rounds = [r for r in self._rounds() if as_of is None or r <= as_of]
        return rounds[-1] if rounds else None

    def _path(self, server_round: int, suffix: str) -> Path:
        return self.root / f"{self.user}.r{server_round}.{suffix}"

    def _meta(self, server_round: int | None) -> dict:
        if server_round is None:
            return {}
        try:
            return json.loads(self._path(server_round, "json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def _write_meta(self, **changes) -> None:
        base = self._meta(self.server_round) or self._meta(self._read)
        atomic_write_json(self._path(self.server_round, "json"), {**base, **changes})
        self._prune()

    def _prune(self) -> None:
        """Keep this round's version and the newest one before it; older versions go."""
        older = [r for r in self._rounds() if r < self.server_round]
        for old in older[:-1]:
            for suffix in ("safetensors", "json"):
                self._path(old, suffix).unlink(missing_ok=True)

    def load_private(self) -> dict[str, torch.Tensor] | None:
        """The private tensors of the newest round ``<= as_of`` that has them, None if the user has none."""
        for server_round in reversed([r for r in self._rounds() if self.as_of is None or r <= self.as_of]):
            path = self._path(server_round, "safetensors")
            if path.exists():
                return load_file(path)
        return None

    def save_private(self, tensors: Mapping[str, torch.Tensor], rounds_trained: int) -> None:
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        atomic_write(self._path(self.server_round, "safetensors"), lambda tmp: save_file(cpu, str(tmp)))
        self._write_meta(rounds_trained=rounds_trained)

    def rounds_trained(self) -> int:
        return int(self._meta(self._read).get("rounds_trained", 0))

    def load_ledger(self) -> str | None:
        return (self._meta(self.server_round) or self._meta(self._read)).get("ledger")

    def save_ledger(self, ledger_json: str) -> None:
        self._write_meta(ledger=ledger_json)


class UserStore:
    """The folder of a simulation run's users' private state."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def create(cls, under: str | Path | None = None) -> UserStore:
        """A fresh, private (mode 0700) folder: ``under/users`` (kept for a resume; emptied when the run starts
        afresh), else a new one in the system's temp folder.

        Args:
            under: the run's checkpoint folder, or None.

        Returns:
            The store.
        """
        if under is None:
            return cls(tempfile.mkdtemp(prefix="fedpersona-users-"))
        root = Path(under) / "users"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(root)

    def clear(self) -> None:
        """Remove every user's state (a run that starts afresh in a kept folder)."""
        for path in self.root.glob("*.r*.*"):
            if path.suffix in (".json", ".safetensors"):
                path.unlink(missing_ok=True)

    def user(self, index: int, server_round: int = 0, as_of: int | None = None) -> UserFiles:
        """User ``index``'s files for ``server_round`` (see ``UserFiles``).

        Raises:
            FileNotFoundError: the store was removed (its run ended).
        """
        if not self.root.is_dir():
            raise FileNotFoundError(f"the simulation's user store {self.root} is gone (removed at the end of its run)")
        return UserFiles(self.root, int(index), server_round, as_of)

    def users_with_state(self) -> int:
        """How many users have private state (have trained)."""
        return len({path.name.split(".", 1)[0] for path in self.root.glob("*.r*.safetensors")})

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
