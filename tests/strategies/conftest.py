"""Fixtures of the strategy tests."""

import pytest


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower messages need a task identity; outside a running ServerApp we set one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
