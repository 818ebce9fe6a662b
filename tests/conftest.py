"""Suite-wide settings: one torch thread per process (2-core CI machines; Ray workers take their own)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def split_resident():
    """The process's resident model for the default (split) scheme, restored after the test."""
    from fedpersona.client.local import resident_for
    from fedpersona.config import RunConfig
    from fedpersona.model.adapters import Role

    resident = resident_for(RunConfig())
    yield resident
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)
