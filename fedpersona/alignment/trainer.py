"""Local preference training on one user's pairs: DPO-family loss, AdamW, deterministic on CPU.

The trainer works on a resident model (see ``fedpersona.model.resident``): it trains whatever adapter
tensors the split policy marks trainable (shared and private) and never touches the frozen base.
Reference log-probs come from the frozen base, computed once per pair and cached.

Who watches a round (a device's terminal) passes a ``Progress`` callable: ``progress(phase, done, total)``
with phase ``"reference"`` (chunks of pairs whose reference log-probs are computed) or ``"train"``
(optimizer steps). It is a plain callable so that this floor knows nothing of Flower or of run settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedpersona.alignment.batching import EncodedPair, collate, encode_pairs, sequence_logprobs
from fedpersona.alignment.losses import get_loss
from fedpersona.alignment.settings import TrainSettings
from fedpersona.alignment.microbatch import pair_chunks
from fedpersona.data.schema import PreferencePair
from fedpersona.model.adapters import Role
from fedpersona.model.resident import ResidentModel


Progress = Callable[[str, int, int], None]  # (phase, done, total): see the module doc


@dataclass(frozen=True)
class TrainStats:
    steps: int
    pairs_seen: int
    mean_loss: float


def inference_chunks(resident: ResidentModel, encoded: Sequence[EncodedPair],
                     batch_size: int = 64) -> list[Sequence[EncodedPair]]:
    """``encoded`` cut in order into forward-sized chunks: at most ``batch_size`` pairs and
    ``resident.max_tokens_per_batch`` padded tokens (both sides in one forward)."""
    return [[encoded[i] for i in chunk]
            for chunk in pair_chunks(encoded, resident.max_tokens_per_batch, max_items=batch_size)]


@torch.no_grad()
def reference_logps(resident: ResidentModel, encoded: Sequence[EncodedPair], batch_size: int = 64,
                    progress: Progress | None = None) -> torch.Tensor:
    """``[N, 2]`` (chosen, rejected) log-probs under the frozen base, from the cache where possible;
    computed in chunks of at most ``batch_size`` pairs and ``resident.max_tokens_per_batch`` tokens.
    ``progress("reference", pairs done, pairs missing)`` before the first chunk and after each (only when
    some are missing from the cache)."""
    cache = resident.ref_cache
    missing = [e for e in encoded if cache.get(e.key) is None]
    if missing:
        was_training = resident.model.training
        resident.model.eval()
        done = 0
        if progress is not None:
            progress("reference", 0, len(missing))
        with resident.model.disable_adapter():
            for chunk in inference_chunks(resident, missing, batch_size):
                sides = [e.chosen for e in chunk] + [e.rejected for e in chunk]
                logps, _ = sequence_logprobs(resident.model, collate(sides, resident.pad_id, resident.device))
                for i, e in enumerate(chunk):
                    cache.put(e.key, (float(logps[i]), float(logps[len(chunk) + i])))
                done += len(chunk)
                if progress is not None:
                    progress("reference", done, len(missing))
        resident.model.train(was_training)
    # PEFT's disable_adapter() (here and in evaluation) ends by marking every active adapter tensor
    # trainable again, FROZEN ones too (ffa's A): put the split policy's trainability back before training.
    for name, param in resident.adapters.params.items():
        param.requires_grad_(resident.adapters.roles[name] is not Role.FROZEN)
    return torch.tensor([cache.get(e.key) for e in encoded], dtype=torch.float32, device=resident.device)


def pair_policy_logps(resident: ResidentModel, chunk: Sequence[EncodedPair], *, separate_sides: bool = False):
    """Policy log-probs and lengths for chosen and rejected of each pair.

    One forward over chosen+rejected is fastest; ``separate_sides`` makes two calls (chosen batch, then
    rejected batch, same pair order), which per-pair DP-SGD needs so that both sides of a pair land in
    one per-sample gradient row.
    """
    if separate_sides:
        pc, lc = sequence_logprobs(resident.model, collate([e.chosen for e in chunk], resident.pad_id, resident.device))
        pr, lr = sequence_logprobs(resident.model, collate([e.rejected for e in chunk], resident.pad_id, resident.device))
        return pc, pr, lc, lr
    n = len(chunk)
    sides = [e.chosen for e in chunk] + [e.rejected for e in chunk]
    logps, lens = sequence_logprobs(resident.model, collate(sides, resident.pad_id, resident.device))
    return logps[:n], logps[n:], lens[:n], lens[n:]


def pair_losses(resident: ResidentModel, chunk: Sequence[EncodedPair], ref: torch.Tensor, settings: TrainSettings,
                *, separate_sides: bool = False) -> torch.Tensor:
    """Per-pair loss (no reduction) for a chunk of encoded pairs with their reference log-probs."""
    pc, pr, lc, lr = pair_policy_logps(resident, chunk, separate_sides=separate_sides)
    loss_fn = get_loss(settings.loss)
    return loss_fn(pc, pr, ref[:, 0], ref[:, 1], beta=settings.beta, len_c=lc, len_r=lr)


def trainable_parameters(resident: ResidentModel) -> list[torch.nn.Parameter]:
    return [p for p in resident.adapters.params.values() if p.requires_grad]


def parameter_groups(resident: ResidentModel, settings: TrainSettings) -> list[dict]:
    """AdamW groups: private tensors at ``lr``, shared tensors at ``shared_lr``."""
    state = resident.adapters
    groups = []
    for role, lr in ((Role.PRIVATE, settings.lr), (Role.SHARED, settings.shared_lr)):
        params = [state.params[n] for n in state.names(role) if state.params[n].requires_grad]
        if params:
            groups.append({"params": params, "lr": lr})
    return groups


def train_local(resident: ResidentModel, pairs: Sequence[PreferencePair], settings: TrainSettings,
                seed: int, progress: Progress | None = None) -> TrainStats:
    """Plain (non-private) local training: shuffled mini-batches for ``settings.epochs`` epochs.

    Each optimizer step sees ``batch_size`` pairs; a batch over ``resident.max_tokens_per_batch`` padded
    tokens runs as several micro-batches whose gradients accumulate (the mean over the whole batch).
    ``progress`` (optional) hears ``("reference", ...)`` and ``("train", step, total steps)``."""
    encoded = encode_pairs(resident.prompt_format, pairs, settings.max_length)
    ref = reference_logps(resident, encoded, progress=progress)
    optimizer = torch.optim.AdamW(parameter_groups(resident, settings), weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(int(seed))
    total_steps = settings.steps_for(len(encoded))
    resident.model.train()
    steps, seen, loss_sum = 0, 0, 0.0
    if progress is not None:
        progress("train", 0, total_steps)
    while steps < total_steps:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for micro in pair_chunks([encoded[i] for i in idx], resident.max_tokens_per_batch):
                part = [idx[k] for k in micro]
                losses = pair_losses(resident, [encoded[i] for i in part], ref[part], settings)
                (losses.sum() / len(idx)).backward()
                batch_loss += float(losses.detach().sum())
            optimizer.step()
            steps, seen, loss_sum = steps + 1, seen + len(idx), loss_sum + batch_loss
            if progress is not None:
                progress("train", steps, total_steps)
            if steps >= total_steps:
                break
    resident.model.eval()
    return TrainStats(steps, seen, loss_sum / max(seen, 1))
