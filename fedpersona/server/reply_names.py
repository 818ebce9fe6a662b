"""Who sent a reply, as a person reads it: users, not Flower node ids.

A node id says nothing to an operator (in a simulation it is a virtual id far above 2^40; in a deployment a
random 64-bit number Flower gave the device). What the server can know instead:

* in a simulation, a reply's node is a simulated user's virtual node (``fedpersona.server.user_grid``):
  ``user_of`` gives its index exactly;
* in a deployment, a device reports ``user-index`` in its evaluation replies
  (``fedpersona.client.device``): once a node has reported one, its replies are that user's. Before (a
  first training round) the node id is all there is, said as such. The index is the device's own claim:
  it names, it does not authenticate.
"""

from __future__ import annotations

from flwr.app import Message

from fedpersona.server.user_grid import user_of

USER_INDEX_KEY = "user-index"


class ReplyNames:
    """``names(msg)`` -> ``"user 7"`` (or ``"node 123..."`` while a device's user is not known yet).

    Args:
        simulation: node ids are the simulation's virtual user nodes.
    """

    def __init__(self, simulation: bool = True) -> None:
        self.simulation = simulation
        self.users: dict[int, int] = {}  # node id -> the user index it reported (deployment)

    def learn(self, msg: Message) -> None:
        """Remember the ``user-index`` an accepted evaluation reply reports for its node."""
        for metrics in msg.content.metric_records.values():
            index = metrics.get(USER_INDEX_KEY)
            if isinstance(index, (int, float)) and not isinstance(index, bool) and float(index).is_integer():
                self.users[int(msg.metadata.src_node_id)] = int(index)

    def __call__(self, msg: Message) -> str:
        node = int(msg.metadata.src_node_id)
        if self.simulation:
            try:
                return f"user {user_of(node)}"
            except ValueError:
                pass
        if node in self.users:
            return f"user {self.users[node]}"
        return f"node {node}"
