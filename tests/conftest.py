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
    from fedpersona.round.resident import resident_for
    from fedpersona.config import RunConfig
    from fedpersona.model.adapters import Role

    resident = resident_for(RunConfig())
    yield resident
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)


@pytest.fixture
def cli(capsys):
    """``cli("feedback", "add", ...)`` runs ``fedpersona ARGV`` in-process: (exit code, stdout, stderr)."""
    from fedpersona.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main(list(argv))
        out, err = capsys.readouterr()
        return int(done.value.code or 0), out, err

    return run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test with real processes (SuperLink/SuperNode, a Ray cluster; "
                                       "runs by default)")
