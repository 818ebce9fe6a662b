"""Pair-level DP-SGD on a resident model with Opacus: one preference pair is one privacy unit.

The algorithm is DP-SGD (Abadi et al., 2016, arXiv 1607.00133) with Poisson sampling, accounted with
RDP (Mironov, 2017) or PRV (Gopi et al., 2021) by ``fedpersona.privacy.ledger``:

1. every logical step draws a Poisson batch: each training pair joins with probability
   ``q = expected_batch / n`` (``settings.batch_size``); an empty batch still takes a noise-only step
   (skipping it would depend on the data);
2. per-pair gradients come from Opacus's ``grad_sample_mode="hooks"`` attached to the PEFT model
   (``wrap_model=False``): the chosen batch and then the rejected batch go through two forward calls in
   the same pair order, one backward on the summed pairwise loss, and Opacus sums both calls into ONE
   ``grad_sample`` row per pair (both sides of a pair are one record, clipped together);
3. all trainable tensors, shared and private, are clipped jointly to ``max_grad_norm`` (one flat clip;
   a private adapter trained without DP would let the shared update depend on data through it), or,
   with ``private_clip_share`` f > 0, group-wise: private tensors to ``C sqrt(f)`` and shared ones to
   ``C sqrt(1 - f)``, the same sensitivity ``C`` (``fedpersona.privacy.group_clipping``);
4. Gaussian noise ``N(0, (noise * C)^2)`` is added to the clipped sum (``DPOptimizer``), divided by the
   expected batch size, and AdamW steps (private tensors at ``lr``, shared at ``shared_lr``);
5. optionally (``count_noise`` > 0) the user's pair count is released once, with Gaussian noise, as its
   FedAvg weight, inside the same budget (``PrivacyLedger``): otherwise an 8-pair user, whose update is
   mostly noise, weighs as much as a 150-pair one.

A logical batch larger than ``max_physical_batch`` pairs or ``max-tokens-per-batch`` padded tokens
(``fedpersona.alignment.microbatch``) is split into chunks whose clipped per-pair gradients
are accumulated (``DPOptimizer.signal_skip_step``, as Opacus's BatchMemoryManager does) before one noisy
step: the same result as one big batch. The ledger's accountant counts logical steps only.

Opacus pieces and their cost. The grad-sample hooks are attached at the start of each call and removed
at its end (about 3 ms + 1 ms on the embedded model). Keeping them on the resident model across users
would save that, but PyTorch's full backward hooks wrap every LoRA layer even while disabled, which
measured twice as slow for any non-DP training and still intercepts evaluation on the same model; the
``DPOptimizer`` wraps a fresh AdamW per call anyway (optimizer state is per round, as in ``train_local``).
The order avoids Opacus #820 / peft #3409 (LoRA silently never updating): PEFT model built and on its
device, ``requires_grad`` only on adapter tensors (the split policy), ``model.train()``, optimizer over
those very Parameter objects, then hooks; tests assert that adapters move.

Randomness. ``DPSettings.reproducible=False`` (the default, and what a real device must use) draws the
Poisson sampling and the noise from fresh OS-seeded generators: anyone who can recompute the seeds
(the server knows the run seed, user index and round) could otherwise subtract the noise and learn which
pairs were sampled, and the guarantee would not hold against them. ``reproducible=True`` derives both
from ``seed`` for simulations and tests. The noise comes from torch's Mersenne Twister, not a CSPRNG, and
Opacus's ``secure_mode`` floating-point hardening is not used.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedpersona.alignment.batching import EncodedPair
from fedpersona.alignment.microbatch import pair_chunks
from fedpersona.alignment.trainer import (
    Progress,
    TrainSettings,
    encode_pairs,
    pair_losses,
    parameter_groups,
    reference_logps,
)
from fedpersona.data.schema import PreferencePair
from fedpersona.errors import UsageError
from fedpersona.model.adapters import Role
from fedpersona.model.resident import ResidentModel
from fedpersona.privacy.accountant import Phase, check_accountant, sample_rate_for
from fedpersona.privacy.ledger import PrivacyLedger, default_delta

# on_step(step, batch indices, gradient the optimizer uses: (sum of clipped per-pair grads + noise) / E)
StepProbe = Callable[[int, Sequence[int], Mapping[str, torch.Tensor]], None]
_NOISE_SEED_SALT = 0x5EED_D1FF
_COUNT_SEED_SALT = 0xC0_0174


@dataclass(frozen=True)
class DPSettings:
    """Pair-level DP-SGD settings of one user. The expected batch size is ``TrainSettings.batch_size``."""

    target_epsilon: float = 8.0  # inf: clip only, no noise, no guarantee (tests and ablations)
    delta: float | None = None  # None: default_delta(number of the user's training pairs)
    max_grad_norm: float = 1.0  # C: per-pair clipping norm over all trainable tensors jointly
    accountant: str = "rdp"  # "rdp" or "prv"
    max_physical_batch: int = 32  # pairs per forward/backward; larger logical batches are accumulated
    private_clip_share: float = 0.0  # 0: one joint clip; f in (0, 1): private group C*sqrt(f), shared C*sqrt(1-f)
    count_noise: float = 0.0  # > 0: release n + N(0, count_noise^2) once as the aggregation weight (in the budget)
    reproducible: bool = False  # True: sampling and noise seeded from the round seed (simulation only)

    def validate(self) -> None:
        check_accountant(self.accountant)
        if not (self.target_epsilon > 0):
            raise UsageError(f"dp target epsilon {self.target_epsilon!r} is invalid: it must be > 0 (inf: clip only)")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise UsageError(f"dp max grad norm {self.max_grad_norm!r} is invalid: it must be a finite number > 0")
        if not 0.0 <= self.private_clip_share < 1.0:
            raise UsageError(f"dp private clip share {self.private_clip_share!r} is invalid: it must be in [0, 1) "
                             "(0: one joint clip)")
        if not (math.isfinite(self.count_noise) and self.count_noise >= 0):
            raise UsageError(f"dp count noise {self.count_noise!r} is invalid: it must be a finite number >= 0 "
                             "(0: release no pair count, every user weighs the same)")
        if self.max_physical_batch < 1:
            raise UsageError(f"dp max physical batch {self.max_physical_batch!r} is invalid: it must be >= 1")
        if self.delta is not None and not (0.0 < self.delta < 1.0):
            raise UsageError(f"dp delta {self.delta!r} is invalid: it must be in (0, 1), well below 1/pairs")

    def delta_for(self, num_pairs: int) -> float:
        return default_delta(num_pairs) if self.delta is None else float(self.delta)


@dataclass(frozen=True)
class DPTrainStats:
    """What one DP round did. Only ``steps`` (fixed by the plan), the epsilon fields and the
    ``aggregation_weight`` (the released, noised pair count) may be sent;
    ``pairs_seen`` and ``mean_loss`` depend on the data and the Poisson draws: keep them on the device."""

    steps: int  # logical (noisy) optimizer steps == accountant steps
    pairs_seen: int
    mean_loss: float
    epsilon: float  # spent after this round, at ``delta``
    delta: float
    noise_multiplier: float
    sample_rate: float
    physical_batches: int = 0
    empty_batches: int = 0
    declined: bool = False  # the budget would be exceeded: nothing was trained
    aggregation_weight: int = 1  # the ledger's released pair count (1 if none): what may be sent as num-examples


def plan_ledger(num_pairs: int, settings: TrainSettings, dp: DPSettings, planned_rounds: int, *,
                release_count: bool = True, seed: int = 0, prior: Sequence[Phase] = ()) -> PrivacyLedger:
    """A user's ledger, noise calibrated once for ``planned_rounds`` rounds of ``settings.steps_for(n)``
    steps at ``q = batch_size / n``. Pass the most rounds the user may train in (e.g. the run's rounds):
    the budget then holds even if the user is sampled every round.

    With ``dp.count_noise`` > 0 and ``release_count``, it also draws the user's released pair count
    ``n + N(0, count_noise^2)`` (its aggregation weight; in the budget, see ``PrivacyLedger``), from the OS
    entropy source, or from ``seed`` when ``dp.reproducible``. ``prior``: phases retired ledgers already
    spent on these pairs (``PrivacyLedger.prior``); raises ``BudgetSpent`` if they reach the target."""
    dp.validate()
    if planned_rounds < 1:
        raise UsageError(f"planned rounds {planned_rounds!r} is invalid: it must be >= 1")
    q = sample_rate_for(settings.batch_size, num_pairs)
    steps = settings.steps_for(num_pairs) * planned_rounds
    count_noise, released = 0.0, None
    if release_count and dp.count_noise > 0 and not math.isinf(dp.target_epsilon):
        rng = random.Random(seed ^ _COUNT_SEED_SALT) if dp.reproducible else random.SystemRandom()
        count_noise, released = dp.count_noise, num_pairs + rng.gauss(0.0, dp.count_noise)
    return PrivacyLedger.calibrate(dp.target_epsilon, dp.delta_for(num_pairs), q, steps, dp.accountant,
                                   count_noise=count_noise, released_count=released, prior=list(prior))


def planned_participations(rounds: int, fraction: float, quantile: float = 0.9) -> int:
    """Rounds to calibrate a user's noise for when each round samples users independently with probability
    ``fraction``: the ``quantile`` of Binomial(rounds, fraction), i.e. enough for 90% of users to train in
    every round they are sampled for. Calibrating for all ``rounds`` (the worst case) would spend the
    budget on rounds a user is unlikely to see; a user sampled more often than planned declines the rounds
    its ledger cannot afford, so the guarantee holds either way."""
    if fraction >= 1.0:
        return rounds
    total = 0.0
    for k in range(rounds + 1):
        total += math.comb(rounds, k) * fraction**k * (1.0 - fraction) ** (rounds - k)
        if total >= quantile:
            return max(k, 1)
    return rounds


# ---- per-pair gradients ------------------------------------------------------------------------------
def _trainable(resident: ResidentModel) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in resident.adapters.params.items() if p.requires_grad}


def _clear_dp_state(params: Mapping[str, torch.nn.Parameter]) -> None:
    """Drop gradients and the attributes Opacus puts on parameters (per-sample grads, counters)."""
    for p in params.values():
        p.grad = None
        for attr in ("grad_sample", "_current_grad_sample", "summed_grad", "_forward_counter"):
            if hasattr(p, attr):
                delattr(p, attr)


def _register_custom_grad_samplers(model: torch.nn.Module) -> None:
    """Modules with their own trainable tensors outside LoRA (e.g. PAL's mixture logits) state their
    per-sample gradient rule as ``per_sample_gradients(activations, backprops)``: register it with Opacus
    (its grad-sampler registry is keyed by module class), so those tensors are clipped and noised too."""
    from opacus.grad_sample import GradSampleHooks

    for module in model.modules():
        cls = type(module)
        if hasattr(cls, "per_sample_gradients") and cls not in GradSampleHooks.GRAD_SAMPLERS:
            GradSampleHooks.GRAD_SAMPLERS[cls] = lambda layer, activations, backprops: (
                layer.per_sample_gradients(activations, backprops))


@contextmanager
def per_pair_hooks(resident: ResidentModel) -> Iterator[object]:
    """Opacus grad-sample hooks on the PEFT model (``hooks`` mode, ``wrap_model=False``, sum reduction)
    for the duration of the block; the model is in train mode inside and eval mode after."""
    from opacus.grad_sample.utils import prepare_module

    trainable = _trainable(resident)
    if not trainable:
        raise UsageError("DP training needs trainable adapter tensors; this scheme has none")
    trainable_base = [n for n, p in resident.model.named_parameters() if p.requires_grad and "lora_" not in n]
    if trainable_base:
        raise RuntimeError(f"non-adapter tensors are trainable ({trainable_base[:3]}); DP-SGD covers adapters only")
    lm = resident.model.get_base_model()
    if getattr(lm, "is_activation_checkpointing", None) or getattr(lm, "gradient_checkpointing", False):
        raise UsageError("DP-SGD cannot run with activation checkpointing (Opacus's per-pair gradient hooks "
                         "would see recomputed activations): set gradient-checkpointing=false")
    _register_custom_grad_samplers(resident.model)
    resident.model.train()  # Opacus records activations only in train mode
    hooks = prepare_module(resident.model, "hooks", wrap_model=False, batch_first=True, loss_reduction="sum",
                           strict=True)
    try:
        with warnings.catch_warnings():
            # the first LoRA layers' inputs need no grad; PyTorch warns that the full hook still fires
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield hooks
    finally:
        hooks.remove_hooks()
        _clear_dp_state(trainable)
        resident.model.eval()


def _backward_chunk(resident: ResidentModel, encoded: Sequence[EncodedPair], ref: torch.Tensor,
                    settings: TrainSettings) -> torch.Tensor:
    """Two forward calls (chosen, then rejected, same pair order) and one backward of the summed loss:
    with hooks on, every trainable tensor gets ``grad_sample`` with one row per pair (both sides)."""
    losses = pair_losses(resident, encoded, ref, settings, separate_sides=True)
    losses.sum().backward()
    return losses.detach()


def per_pair_gradients(resident: ResidentModel, pairs: Sequence[PreferencePair], settings: TrainSettings
                       ) -> dict[str, torch.Tensor]:
    """Unclipped per-pair gradients ``name -> [num_pairs, *shape]`` of every trainable tensor, exactly as
    DP-SGD sees them before clipping (for audits and tests)."""
    encoded = encode_pairs(resident.prompt_format, pairs, settings.max_length)
    ref = reference_logps(resident, encoded).to(resident.device)  # the cache returns CPU tensors
    params = _trainable(resident)
    with per_pair_hooks(resident):
        _backward_chunk(resident, encoded, ref, settings)
        return {name: p.grad_sample.detach().clone() for name, p in params.items()}


# ---- training ----------------------------------------------------------------------------------------
def _generators(seed: int, reproducible: bool, device: str) -> tuple[torch.Generator, torch.Generator]:
    sampling, noise = torch.Generator(), torch.Generator(device=device)
    if reproducible:
        sampling.manual_seed(int(seed))
        noise.manual_seed((int(seed) ^ _NOISE_SEED_SALT) & (2**63 - 1))
    else:
        sampling.seed()  # non-deterministic seeds (std::random_device)
        noise.seed()
    return sampling, noise


def train_local_dp(resident: ResidentModel, pairs: Sequence[PreferencePair], settings: TrainSettings, seed: int,
                   dp: DPSettings, ledger: PrivacyLedger, *, on_step: StepProbe | None = None,
                   progress: Progress | None = None) -> DPTrainStats:
    """One round of pair-level DP-SGD on this user's pairs; records the steps taken in ``ledger``.

    Takes ``settings.steps_for(n)`` logical steps at ``q = batch_size / n`` with the ledger's noise
    multiplier. If that would push the ledger past its target epsilon, nothing is trained and the stats
    say ``declined=True``. ``on_step`` (optional) sees each step's privatized gradient (post-processing).
    ``progress`` (optional, ``fedpersona.alignment.trainer.Progress``) hears the reference log-probs and
    ``("train", step, total steps)`` for the device's own terminal; it never leaves the device.
    """
    dp.validate()
    n = len(pairs)
    if n < 1:
        raise UsageError("DP training needs at least one training pair")
    q = sample_rate_for(settings.batch_size, n)
    total_steps = settings.steps_for(n)

    def stats(steps=0, seen=0, loss=math.nan, physical=0, empty=0, declined=False) -> DPTrainStats:
        return DPTrainStats(steps, seen, loss, ledger.spent_epsilon(), ledger.delta, ledger.noise_multiplier, q,
                            physical, empty, declined, ledger.aggregation_weight)

    if ledger.would_exceed(total_steps, q):
        return stats(declined=True)

    encoded = encode_pairs(resident.prompt_format, pairs, settings.max_length)
    ref = reference_logps(resident, encoded, progress=progress).to(resident.device)  # the cache returns CPU tensors
    params = _trainable(resident)
    names = {id(p): name for name, p in params.items()}
    sampling, noise_gen = _generators(seed, dp.reproducible, resident.device)
    expected_batch = min(settings.batch_size, n)

    optimizer = _dp_optimizer(
        torch.optim.AdamW(parameter_groups(resident, settings), weight_decay=settings.weight_decay),
        resident, dp, noise_multiplier=ledger.noise_multiplier, expected_batch_size=expected_batch,
        loss_reduction="mean", generator=noise_gen,
    )
    if {id(p) for p in optimizer.params} != set(names):
        raise RuntimeError("the DP optimizer does not hold exactly the trainable adapter tensors")
    taken: list[int] = []  # one entry per step the optimizer took (its step hook, where Opacus accounts)
    current: dict[str, list[int]] = {"batch": []}

    def step_hook(opt) -> None:
        taken.append(len(current["batch"]))
        if on_step is not None:
            grads = {names[id(p)]: p.grad.detach().clone() for p in opt.params}
            on_step(len(taken) - 1, list(current["batch"]), grads)

    optimizer.attach_step_hook(step_hook)
    seen, physical, empty, loss_sum = 0, 0, 0, 0.0
    if progress is not None:
        progress("train", 0, total_steps)
    try:
        with per_pair_hooks(resident):
            for step in range(total_steps):
                batch = torch.nonzero(torch.rand(n, generator=sampling) < q).flatten().tolist()  # Poisson
                current["batch"] = batch
                loss, chunks = _logical_step(optimizer, resident, encoded, ref, settings, params, batch,
                                             dp.max_physical_batch)
                seen, physical, loss_sum = seen + len(batch), physical + chunks, loss_sum + loss
                empty += not batch
                if progress is not None:
                    progress("train", step + 1, total_steps)
    finally:  # steps taken changed the adapters: they count even if a later one failed
        ledger.record(len(taken), q)
    if len(taken) != total_steps:
        raise RuntimeError(f"DP optimizer took {len(taken)} steps for {total_steps} logical batches")
    return stats(len(taken), seen, loss_sum / max(seen, 1), physical, empty)


def _dp_optimizer(optimizer: torch.optim.Optimizer, resident: ResidentModel, dp: DPSettings, **kwargs):
    """Opacus's ``DPOptimizer`` (one joint clip), or group-wise clipping of the private and shared tensors
    when ``dp.private_clip_share`` asks for it and both groups train (same sensitivity and noise)."""
    from opacus.optimizers import DPOptimizer

    roles = {id(p): resident.adapters.roles[name] for name, p in _trainable(resident).items()}
    labels = [0 if roles[id(p)] is Role.PRIVATE else 1 for group in optimizer.param_groups for p in group["params"]]
    if dp.private_clip_share > 0 and len(set(labels)) == 2:
        from fedpersona.privacy.group_clipping import GroupClippingDPOptimizer, group_norms

        return GroupClippingDPOptimizer(optimizer, groups=labels, max_grad_norm=dp.max_grad_norm,
                                        group_max_norms=group_norms(dp.max_grad_norm, dp.private_clip_share),
                                        **kwargs)
    return DPOptimizer(optimizer, max_grad_norm=dp.max_grad_norm, **kwargs)


def _logical_step(optimizer, resident: ResidentModel, encoded: Sequence[EncodedPair], ref: torch.Tensor,
                  settings: TrainSettings, params: Mapping[str, torch.nn.Parameter], batch: list[int],
                  max_physical_batch: int) -> tuple[float, int]:
    """One DP-SGD step on one Poisson batch, in physical chunks; returns (loss sum, number of chunks).

    Every chunk but the last is clipped and accumulated into ``summed_grad`` with the step skipped
    (as Opacus's BatchMemoryManager does); the last one adds the noise once and steps once. An empty
    batch gets zero-row per-sample gradients, so the step is pure noise.
    """
    # physical batches: at most max_physical_batch pairs and max_tokens_per_batch padded tokens per forward
    # (chosen and rejected go through separate forwards here, so a pair is one row of each)
    chunks = [[batch[k] for k in chunk] for chunk in
              pair_chunks([encoded[i] for i in batch], resident.max_tokens_per_batch, rows_per_item=1,
                          max_items=max_physical_batch)]
    if not chunks:
        for p in params.values():
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    loss = 0.0
    for k, chunk in enumerate(chunks):
        loss += float(_backward_chunk(resident, [encoded[i] for i in chunk], ref[chunk], settings).sum())
        if k < len(chunks) - 1:
            optimizer.signal_skip_step(do_skip=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, len(chunks)
