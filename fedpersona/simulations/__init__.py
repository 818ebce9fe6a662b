"""Simulations on Ray: one machine, many GPUs, or a cluster.

- ``launcher``: ``simulate`` (Flower's simulation engine on Ray, a resident model per worker);
- ``session``: several runs in one Ray start-up (test suites, sweeps);
- ``benchmark``: schemes x strategies side by side, one table and plots;
- ``styles``: the generated real-model scenarios; ``plots``/``tracking``: figures and experiment trackers.
"""
