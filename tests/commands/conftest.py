"""Fixtures of the device-command tests: a device state after one brief local round."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpersona.device.state import DeviceState


def train_state(state_dir: Path) -> None:
    """A device state after one brief local round: memory, private adapter, shared adapter, meta."""
    from fedpersona.round.resident import resident_for
    from fedpersona.round.train import train_round
    from fedpersona.config import RunConfig
    from fedpersona.data.schema import UserData
    from fedpersona.data.synthetic import PreferenceSimulator
    from fedpersona.model.adapters import Role

    # Default model/scheme/ranks/seed: the same resident model `generate` rebuilds (one per process).
    config = RunConfig(epochs=1, max_steps=4, batch_size=4, lr=2e-2, shared_lr=1e-2, accelerator="cpu")
    data = PreferenceSimulator("conflicting", 2, 0).user_data(0)
    user = UserData(data.user_id, data.train[:12], data.test[:4])
    with DeviceState(state_dir) as st:
        st.bind(config.model, config.scheme)
        for pair in user.train + user.test:
            st.memory.add(pair)
        resident = resident_for(config)
        resident.adapters.reset(Role.SHARED)
        result = train_round(config, user, 0, 1, resident.adapters.tensors(Role.SHARED), st)
        st.save_shared(result.shared, server_round=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Iterator[Path]:
    """A trained state; the process's resident model is reset afterwards for other tests."""
    from fedpersona.round.resident import resident_for
    from fedpersona.config import RunConfig
    from fedpersona.model.adapters import Role

    state = tmp_path_factory.mktemp("device") / "state"
    train_state(state)
    yield state
    resident = resident_for(RunConfig(accelerator="cpu"))
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)
