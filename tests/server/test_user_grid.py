"""Users are not nodes: the UserGrid packs users into cohort messages for a pool of nodes and unpacks the
cohort replies into one reply per user, the real ClientApp answering the cohort in between."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpersona.client.app import app as client_app
from fedpersona.round.user_store import UserStore
from fedpersona.config import RunConfig
from fedpersona.model.adapters import Role
from fedpersona.protocol import COHORT
from fedpersona.server.user_grid import USER_NODE_BASE, UserGrid, split_reply, user_of

CONFIG = RunConfig(num_users=6, min_steps=2, epochs=1, gen_prompts=0)


class PoolGrid:
    """The pool side of a simulation, in process: each pushed cohort message is answered by the real
    ClientApp (no Ray: the grid's packing is what is tested here; tests/simulations run it on Ray)."""

    def __init__(self, nodes):
        self.nodes, self.pushed, self.replies = nodes, [], {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for k, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.pushed)}-{k}"
            self.pushed.append(msg)
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={}, state=RecordDict(),
                              run_config={})
            self.replies[msg.metadata.message_id] = client_app(msg, context)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture
def store(tmp_path):
    return UserStore(tmp_path / "users")


def _grid(store, nodes=(11, 12), cohort_size=16):
    store.root.mkdir(parents=True, exist_ok=True)
    return UserGrid(PoolGrid(nodes), num_users=CONFIG.num_users, cohort_size=cohort_size, store=str(store.root),
                    pool_size=len(nodes))


def _train_messages(grid, users, shared):
    content = RecordDict({"arrays": ArrayRecord(shared),
                          "config": ConfigRecord({**CONFIG.to_flat(), "server-round": 1})})
    return [Message(content=content, dst_node_id=USER_NODE_BASE + u, message_type=MessageType.TRAIN) for u in users]


def test_users_are_listed_as_virtual_nodes_in_user_order(store):
    grid = _grid(store)
    ids = grid.get_node_ids()
    assert [user_of(n) for n in ids] == list(range(CONFIG.num_users))
    with pytest.raises(ValueError):
        user_of(5)


def test_cohorts_fill_the_pool_and_respect_cohort_size(store):
    grid = _grid(store, nodes=(1, 2), cohort_size=2)
    msgs = _train_messages(grid, range(5), {})
    assert [len(c) for c in grid.cohorts(msgs, workers=2)] == [2, 2, 1]
    assert [len(c) for c in _grid(store, cohort_size=16).cohorts(msgs, workers=2)] == [3, 2]


def test_one_reply_per_user_in_order_private_state_in_the_store(split_resident, store):
    shared = split_resident.adapters.tensors(Role.SHARED)
    grid = _grid(store)
    users = [4, 1, 3]
    replies = list(grid.send_and_receive(_train_messages(grid, users, shared)))
    # two cohort messages (one per pool node) went out, each naming its users and the store
    pushed = grid.inner.pushed
    assert sorted(m.metadata.dst_node_id for m in pushed) == [11, 12]
    assert sorted(u for m in pushed for u in m.content.config_records[COHORT]["users"]) == sorted(users)
    # back: one reply per user, as if from the user's own node, in the order asked, shared tensors only
    assert [user_of(r.metadata.src_node_id) for r in replies] == users
    for reply in replies:
        assert not reply.has_error(), reply.error
        assert list(reply.content.array_records) == ["arrays"]
        assert set(reply.content["arrays"].keys()) == set(shared)
        assert not reply.content.config_records
    # each trained user's private tensors are in the store, nobody else's; none of them was sent
    assert store.users_with_state() == 3
    for u in users:
        private = store.user(u).load_private()
        assert private and store.user(u).rounds_trained() == 1
        sent = [a for r in replies for a in r.content["arrays"].to_numpy_ndarrays()]
        for tensor in private.values():
            assert not any(s.shape == tensor.shape and np.array_equal(s, tensor.numpy()) for s in sent)
    assert store.user(0).load_private() is None


def test_a_failed_cohort_becomes_an_error_reply_for_each_of_its_users(store):
    from flwr.app.error import Error

    grid = _grid(store)
    msgs = _train_messages(grid, [0, 2], {})
    for m in msgs:
        m.metadata.__dict__["_message_id"] = f"v{user_of(m.metadata.dst_node_id)}"
    failed = Message(Error(0, "boom"), reply_to=msgs[0])
    out = split_reply(failed, msgs)
    assert [r.has_error() for r in out] == [True, True] and "boom" in out[1].error.reason
    # a reply holding nothing for a user: an error for that user only
    partial = Message(RecordDict({"user-0.metrics": ConfigRecord({"x": 1})}), reply_to=msgs[0])
    out = split_reply(partial, msgs)
    assert out[1].has_error() and "user 2" in out[1].error.reason
