"""``flower-supernode`` with a chosen node heartbeat interval: ``python -m fedpersona.deploy.supernode_main ARGS``.

Why: the SuperLink takes a node for dead only when its heartbeat lapses, after twice the interval
the node declared (30 s in flwr 1.41, a constant). A device killed mid-round therefore stalls the
round for up to a minute. Devices on flaky links, or short rounds, want that sooner; the SuperLink
accepts any interval from 10 s to 30 min, but flwr 1.41 offers no flag to choose it.

This sets the interval (``FEDPERSONA_HEARTBEAT_INTERVAL`` seconds) in exactly the two places the
SuperNode process reads it: the node heartbeat sent to the SuperLink (``fleet_http_connection``)
and the cadence of the heartbeat sender (``supercore.heartbeat``). Task heartbeats between the
SuperNode and its ClientApp runs live in other processes and keep Flower's default.
"""

from __future__ import annotations

import os
import sys

ENV = "FEDPERSONA_HEARTBEAT_INTERVAL"


def main() -> None:
    interval = float(os.environ.get(ENV) or 0)
    if interval:
        import flwr.supercore.heartbeat as sender
        import flwr.supernode.fleet_http_connection as connection

        for module in (sender, connection):
            if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):  # a Flower that moved it: say so, do not guess
                raise SystemExit(f"fedpersona: {module.__name__} has no HEARTBEAT_DEFAULT_INTERVAL; this flwr "
                                 "does not support --heartbeat-interval; drop the option")
            module.HEARTBEAT_DEFAULT_INTERVAL = interval
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
