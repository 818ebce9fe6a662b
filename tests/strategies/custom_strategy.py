"""A user's own strategy, loaded as ``tests.strategies.custom_strategy:DampedFedAvg`` by the tests."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg


class DampedFedAvg(FedAvg):
    """FedAvg that moves only part of the way: ``new = old + damping * (average - old)``."""

    def __init__(self, damping: float = 0.5, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 2, min_available_nodes: int = 2) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes)
        if not 0.0 < damping <= 1.0:
            raise ValueError("damping must be in (0, 1]")
        self.damping = damping
        self.previous: dict | None = None
        self.aggregations = 0

    def configure_train(self, server_round, arrays, config, grid):
        self.previous = {k: v.numpy().copy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.previous is None:
            return arrays, metrics
        self.aggregations += 1
        mixed = {k: Array(self.previous[k] + self.damping * (v.numpy() - self.previous[k])) for k, v in arrays.items()}
        return ArrayRecord(mixed), metrics


class BadSettingFedAvg(FedAvg):
    """FedAvg that sends every client an invalid setting in training: every training call fails (a test of
    a run that trains nothing)."""

    def configure_train(self, server_round, arrays, config, grid):
        config["batch-size"] = "lots"
        return super().configure_train(server_round, arrays, config, grid)
