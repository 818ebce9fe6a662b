"""The settings of one user's local training, free of torch: what ``RunConfig.train_settings`` hands the
trainer (so the configuration module imports no deep-learning stack, and the command line stays fast)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSettings:
    """One user's local training.

    Attributes:
        epochs: passes over the user's training pairs per round.
        max_steps: at most this many optimizer steps per round (0: no cap).
        min_steps: users with few pairs still take this many steps (they cycle their data).
        batch_size: preference pairs per optimizer step.
        lr: learning rate of the private tensors (AdamW).
        shared_lr: learning rate of the shared tensors (lower: they are averaged with other users').
        weight_decay: AdamW's weight decay.
        beta: KL strength of the loss.
        loss: the loss spec (``fedpersona.alignment.losses.get_loss``).
        max_length: tokens of prompt + response kept per side.
    """

    epochs: int = 2
    max_steps: int = 0  # 0: no cap; else stop after this many optimizer steps per round
    min_steps: int = 0  # users with few pairs still take this many steps (they cycle their data)
    batch_size: int = 8
    lr: float = 1e-2  # learning rate of private tensors
    shared_lr: float = 2e-3  # learning rate of shared tensors (lower: they are averaged with other users')
    weight_decay: float = 0.0
    beta: float = 0.1
    loss: str = "dpo"
    max_length: int = 96

    def steps_for(self, num_pairs: int) -> int:
        steps = max(self.epochs * math.ceil(num_pairs / self.batch_size), self.min_steps)
        return min(steps, self.max_steps) if self.max_steps else steps


# Decoding defaults of every generation path (fedpersona.alignment.generation): 1.0 / 0 are off. No token 3-gram
# twice: the embedded model's demo devices (server defaults, DP on, 5 rounds, 5 seeds) looped at strength 1
# (repeated word 3-grams up to 0.27 vs 0.00 global) and do not with it (<= 0.004); a repetition penalty
# (CTRL) needed 1.3 for the same and also pushes down the prompt's own words. Measured in
# docs/explanation/personal-generation.md (SmolLM2 too).
REPETITION_PENALTY = 1.0
NO_REPEAT_NGRAM = 3
