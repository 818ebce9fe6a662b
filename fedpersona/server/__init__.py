"""The Flower ServerApp: the federated loop around a strategy, its records and its grids.

- ``app``: the ServerApp (what ``flwr run .``, a SuperLink and ``fedpersona simulate`` run);
- ``federation``: ``run_federation``, the loop on one screen around Flower's ``Strategy.start``;
- ``recorder``: per-round records, every reply screened before aggregation, the summary contract;
- ``user_grid``/``progress_grid``: simulated users as virtual nodes over worker nodes; live progress;
- ``checkpoint``/``resume``/``strategy_state``: per-round checkpoints and resuming from them;
- ``sampling``: seeded user sampling that replays.
"""
