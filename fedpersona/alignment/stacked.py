"""Stacked multi-user training: several users trained together, one forward/backward per step.

A simulation worker receives a *cohort* of users per message (``fedpersona.client.cohort``).
``train_local`` trains them one after another on the resident model; on a small model most of that time is per-step overhead (Python, kernel
launches, one optimizer step per user), not arithmetic. ``train_stacked`` gives the same result (to
float tolerance) with one joint step for all of them, their adapters stacked:

* every trainable adapter tensor (SHARED and PRIVATE LoRA A/B) gets a per-user copy, stacked along a new
  leading user dimension ``[U, *shape]``; FROZEN tensors (ffa's A) and the base stay single and shared;
* while training, each PEFT ``lora.Linear`` computes ``base(x) + sum_k scaling_k B_k[u] A_k[u] x`` row by
  row, with ``u`` the user of the row: its adapters joined into one LoRA of rank sum(r_k) (scaling folded into
  B), gathered by a row -> user index, then ``bmm`` and a fused ``baddbmm`` (cheaper than PEFT's own path);
* the joint step's loss is the sum over users of each user's batch-mean loss, so a user's stacked slice
  receives exactly its own gradient; AdamW is elementwise, so one AdamW over the stacked tensors is each
  user's own AdamW. Every user takes its steps from the first joint step on without gaps, so all users
  still training share the same step count (the same bias correction); a user's tensors are read out
  when it finishes its steps, and what later steps do to its slice is ignored;
* each user sees the batches ``train_local`` would show it with its seed (the same generator, the same
  ``settings.steps_for``), reference log-probs from the frozen base and ``pair_losses``;
* a joint step over ``resident.max_tokens_per_batch`` padded tokens runs as token-budget micro-batches
  (pairs sorted by width, so each micro-batch pads little) whose gradients accumulate.

Not supported (``stacking_supported`` says why): pair-level DP-SGD (per-pair clipping and noise belong to
one user's optimizer; Opacus wraps the model for one user), adapter tensors that are not the A/B weights
of a plain PEFT ``lora.Linear`` (PAL's mixture logits and its hooks on ``lora_B``, LoRA embeddings,
quantized layers), LoRA variants (DoRA, ...), LoRA dropout, LoRA bias and merged adapters.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedpersona.alignment.batching import EncodedPair, encode_pairs
from fedpersona.alignment.microbatch import pair_chunks, pair_width
from fedpersona.alignment.trainer import TrainSettings, TrainStats, pair_losses, reference_logps
from fedpersona.data.schema import PreferencePair
from fedpersona.model.adapters import Role
from fedpersona.model.resident import ResidentModel


@dataclass(frozen=True)
class StackedJob:
    """One user of a cohort: its training pairs, its ``train_local`` seed, and its starting tensors
    (``shared``: usually the server's, the same for every job; ``private``: the user's own), named as
    ``resident.adapters.tensors(Role.SHARED / Role.PRIVATE)`` names them."""

    pairs: Sequence[PreferencePair]
    seed: int
    shared: Mapping[str, torch.Tensor]
    private: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class StackedResult:
    """One user's trained tensors (detached CPU copies, same names and shapes as the job's) and stats."""

    shared: dict[str, torch.Tensor]
    private: dict[str, torch.Tensor]
    stats: TrainStats


@dataclass(frozen=True)
class _Site:
    """A PEFT ``lora.Linear`` and, per active adapter in its forward order, (A name, B name, scaling)."""

    module: torch.nn.Module
    adapters: tuple[tuple[str, str, float], ...]


# ---- what can be batched --------------------------------------------------------------------------------
def _lora_linear_class() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


def _site_refusal(name: str, module: torch.nn.Module) -> str | None:
    """Why one LoRA layer cannot run the per-row forward (None: it can)."""
    if type(module) is not _lora_linear_class():
        return f"{name} is a {type(module).__name__}, not a plain PEFT lora.Linear"
    if module.merged or module.disable_adapters:
        return f"{name} has its adapters merged or disabled"
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if adapter in module.lora_variant:
            return f"{name}: adapter {adapter} is a LoRA variant ({type(module.lora_variant[adapter]).__name__})"
        dropout = module.lora_dropout[adapter]
        if not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 1.0) != 0:
            return f"{name}: adapter {adapter} has LoRA dropout (its random masks are drawn per call)"
        if module.lora_B[adapter].bias is not None:
            return f"{name}: adapter {adapter} has a LoRA bias"
        for part in (module.lora_A[adapter], module.lora_B[adapter]):
            if part._forward_hooks or part._forward_pre_hooks or part._backward_hooks:
                # e.g. PAL's mixture gain on lora_B's input, Opacus's per-sample hooks: the per-row
                # forward does not call these modules, so their hooks would silently not run
                return f"{name}: adapter {adapter} has hooks on its LoRA layers"
    return None


def _sites(resident: ResidentModel) -> tuple[list[_Site], str | None]:
    """The model's LoRA layers and which adapter tensors each one applies, or why the model cannot be
    cohort-batched (then the list is empty)."""
    sites, covered = [], set()
    for name, module in resident.model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_B")):
            continue
        if not module.lora_A and not getattr(module, "lora_embedding_A", None):
            continue  # a LoRA layer with no adapter of ours
        if (reason := _site_refusal(name, module)) is not None:
            return [], reason
        adapters = []
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                a, b = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
                adapters.append((a, b, float(module.scaling[adapter])))
                covered |= {a, b}
        sites.append(_Site(module, tuple(adapters)))
    stray = sorted(set(resident.adapters.params) - covered)
    if stray:
        return [], (f"adapter tensor {stray[0]} is not the A/B weight of an active LoRA linear layer "
                    "(e.g. PAL's mixture logits): only those are stacked per user")
    return sites, None


def stacking_supported(resident: ResidentModel, settings: TrainSettings, *, dp: bool = False) -> str | None:
    """None if ``train_stacked`` can train users of ``resident`` with ``settings`` (the result equals
    ``train_local`` user after user), else a one-line reason.

    ``dp``: pair-level DP-SGD is asked for (never batched: its per-pair clipping and noise belong to one
    user's optimizer). Checks the model's LoRA layers (plain PEFT ``lora.Linear``, no variant, dropout,
    bias, hooks or merge; every adapter tensor an A/B weight of one). Any pairwise loss works: the joint
    step calls the same ``pair_losses`` as ``train_local``."""
    if dp:
        return "pair-level DP-SGD clips and noises per pair within one user: users train one after another"
    return _sites(resident)[1]


# ---- the per-row forward --------------------------------------------------------------------------------
class _Rows:
    """The user of each row of the batch now going through the model (set per micro-batch)."""

    index: torch.Tensor | None = None


def _row_weights(weight: torch.Tensor, rows: _Rows, batch: int) -> torch.Tensor:
    """``weight`` ``[U, out, in]`` taken per row by the user index: ``[batch, out, in]``."""
    index = rows.index
    if index is None or batch != index.shape[0]:
        raise RuntimeError(f"cohort forward: input of {batch} rows but a row index of "
                           f"{None if index is None else index.shape[0]}")
    return weight[index]


def _apply(x: torch.Tensor, weight: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """``x @ weight.T``: ``weight`` ``[out, in]`` for every row, or stacked ``[U, out, in]`` and taken per
    row by the user index. ``x`` is ``[B, ..., in]`` with B the batch rows."""
    if weight.dim() == 2:
        return F.linear(x, weight)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, tokens, in]
    out = torch.bmm(flat, _row_weights(weight, rows, x.shape[0]).transpose(1, 2))
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _add_applied(result: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """``result + h @ weight.T`` in one fused call (``addmm`` / ``baddbmm``), ``weight`` as in ``_apply``."""
    if weight.dim() == 2:
        flat = h.reshape(-1, h.shape[-1])
        return torch.addmm(result.reshape(-1, result.shape[-1]), flat, weight.t()).reshape(result.shape)
    flat = h.reshape(h.shape[0], -1, h.shape[-1])
    base = result.reshape(result.shape[0], -1, result.shape[-1])
    return torch.baddbmm(base, flat, _row_weights(weight, rows, h.shape[0]).transpose(1, 2)).reshape(result.shape)


def _joined(site: _Site, weights: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's active adapters as one LoRA of rank sum(r): A's stacked along the rank, B's (times their
    scaling) along the rank. ``sum_k s_k B_k A_k x`` is ``[s_1 B_1 .. s_K B_K] [A_1; ..; A_K] x``: one gather
    and two matmuls per layer instead of two per adapter, and the scaling on the small B, not the output.
    A single (FROZEN) tensor among stacked ones is expanded to every user."""
    a_parts = [weights[a] for a, _, _ in site.adapters]
    b_parts = [weights[b] * scaling for _, b, scaling in site.adapters]
    if len(a_parts) == 1:
        return a_parts[0], b_parts[0]
    users = max((t.shape[0] for t in a_parts + b_parts if t.dim() == 3), default=None)
    if users is not None:
        a_parts = [t if t.dim() == 3 else t.expand(users, *t.shape) for t in a_parts]
        b_parts = [t if t.dim() == 3 else t.expand(users, *t.shape) for t in b_parts]
    return torch.cat(a_parts, dim=-2), torch.cat(b_parts, dim=-1)


def _site_forward(site: _Site, weights: Mapping[str, torch.Tensor], rows: _Rows):
    """The forward of ``site.module`` with per-user adapters: PEFT's vanilla LoRA (base output plus each
    active adapter's ``scaling * B A x``), its adapters joined into one (``_joined``), A and B taken per row."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not site.adapters:
            return result
        result_dtype = result.dtype
        a, b = _joined(site, weights)
        h = _apply(x.to(a.dtype), a, rows)
        return _add_applied(result.to(b.dtype), h, b, rows).to(result_dtype)

    return forward


@contextmanager
def _per_user_forward(sites: Sequence[_Site], weights: Mapping[str, torch.Tensor], rows: _Rows) -> Iterator[None]:
    """Within the block, every LoRA layer applies the stacked per-user adapters; its own forward after."""
    saved = []
    try:
        for site in sites:
            saved.append((site.module, site.module.__dict__.get("forward")))  # an instance forward (accelerate hooks)
            site.module.forward = types.MethodType(_site_forward(site, weights, rows), site.module)
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


# ---- one user's batches, as train_local draws them -----------------------------------------------------
def batch_schedule(num_pairs: int, settings: TrainSettings, seed: int) -> list[list[int]]:
    """The pair positions of each optimizer step ``train_local`` takes on ``num_pairs`` pairs with
    ``seed``: a fresh seeded permutation per pass, cut into ``batch_size`` batches, for
    ``settings.steps_for(num_pairs)`` steps (none without pairs, where ``train_local`` would never end)."""
    if num_pairs == 0:
        return []
    generator = torch.Generator().manual_seed(int(seed))
    total = settings.steps_for(num_pairs)
    batches: list[list[int]] = []
    while len(batches) < total:
        order = torch.randperm(num_pairs, generator=generator).tolist()
        for start in range(0, num_pairs, settings.batch_size):
            batches.append(order[start : start + settings.batch_size])
            if len(batches) >= total:
                break
    return batches


# ---- training -------------------------------------------------------------------------------------------
def _stacked_start(resident: ResidentModel, jobs: Sequence[StackedJob]) -> dict[str, torch.Tensor]:
    """Leaf tensors ``[U, *shape]`` of every SHARED and PRIVATE tensor, slice u at job u's start values.

    Each job goes through ``AdapterState.load`` (its names checked, earlier releases' names accepted)."""
    state = resident.adapters
    names = state.names(Role.SHARED) + state.names(Role.PRIVATE)
    columns: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for job in jobs:
        state.load(job.shared, Role.SHARED)
        state.load(job.private, Role.PRIVATE)
        for n in names:
            columns[n].append(state.params[n].detach().clone())
    return {n: torch.stack(columns[n]).requires_grad_(True) for n in names}


def _optimizer(resident: ResidentModel, stacked: Mapping[str, torch.Tensor],
               settings: TrainSettings) -> torch.optim.Optimizer:
    """``train_local``'s AdamW groups (private at ``lr``, shared at ``shared_lr``) over stacked tensors."""
    state = resident.adapters
    groups = []
    for role, lr in ((Role.PRIVATE, settings.lr), (Role.SHARED, settings.shared_lr)):
        params = [stacked[n] for n in state.names(role)]
        if params:
            groups.append({"params": params, "lr": lr})
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)


def _user_tensors(resident: ResidentModel, stacked: Mapping[str, torch.Tensor], u: int,
                  role: Role) -> dict[str, torch.Tensor]:
    return {n: stacked[n][u].detach().cpu().clone() for n in resident.adapters.names(role)}


def _joint_step(resident: ResidentModel, settings: TrainSettings, items: Sequence[tuple[int, int]],
                encoded: Sequence[Sequence[EncodedPair]], refs: Sequence[torch.Tensor],
                batch_sizes: Sequence[int], rows: _Rows, loss_sums: torch.Tensor) -> None:
    """Accumulate one joint step's gradient: for the ``(user, pair position)`` items of all users, the
    gradient of sum over users of (that user's summed pair losses / its batch size), in token-budget
    micro-batches. Adds each user's summed losses to ``loss_sums`` ``[U]`` (float64)."""
    device = resident.device
    items = sorted(items, key=lambda item: pair_width(encoded[item[0]][item[1]]))  # less padding per chunk
    pairs = [encoded[u][i] for u, i in items]
    for chunk in pair_chunks(pairs, resident.max_tokens_per_batch):
        part = [items[k] for k in chunk]
        users = torch.tensor([u for u, _ in part], device=device)
        ref = torch.stack([refs[u][i] for u, i in part])
        weight = torch.tensor([1.0 / batch_sizes[u] for u, _ in part], device=device)
        rows.index = torch.cat([users, users])  # chosen rows then rejected rows (pair_policy_logps)
        losses = pair_losses(resident, [pairs[k] for k in chunk], ref, settings)
        (losses * weight).sum().backward()
        loss_sums.index_add_(0, users, losses.detach().to(loss_sums.dtype))


def _train(resident: ResidentModel, sites: Sequence[_Site], jobs: Sequence[StackedJob],
           encoded: Sequence[Sequence[EncodedPair]], refs: Sequence[torch.Tensor],
           settings: TrainSettings, proximal_mu: float) -> list[StackedResult]:
    state = resident.adapters
    stacked = _stacked_start(resident, jobs)
    weights = {**{n: p.detach() for n, p in state.params.items()}, **stacked}  # FROZEN ones stay single
    schedules = [batch_schedule(len(e), settings, job.seed) for e, job in zip(encoded, jobs, strict=True)]
    anchors = {n: stacked[n].detach().clone() for n in state.names(Role.SHARED)} if proximal_mu > 0 else {}
    optimizer = _optimizer(resident, stacked, settings)
    loss_sums = torch.zeros(len(jobs), dtype=torch.float64, device=resident.device)
    finals: dict[int, tuple[dict, dict]] = {u: (_user_tensors(resident, stacked, u, Role.SHARED),
                                                _user_tensors(resident, stacked, u, Role.PRIVATE))
                                            for u, s in enumerate(schedules) if not s}
    rows = _Rows()
    resident.model.train()
    with _per_user_forward(sites, weights, rows):
        for step in range(max((len(s) for s in schedules), default=0)):
            active = [u for u, s in enumerate(schedules) if step < len(s)]
            items = [(u, i) for u in active for i in schedules[u][step]]
            sizes = {u: len(schedules[u][step]) for u in active}
            optimizer.zero_grad(set_to_none=True)
            _joint_step(resident, settings, items, encoded, refs, sizes, rows, loss_sums)
            for n, anchor in anchors.items():  # FedProx: mu * (w - w_t), as fedpersona.strategies.proximal
                stacked[n].grad.add_(stacked[n].detach() - anchor, alpha=proximal_mu)
            optimizer.step()
            for u in active:
                if step + 1 == len(schedules[u]):  # done: later steps may still move its slice (AdamW)
                    finals[u] = (_user_tensors(resident, stacked, u, Role.SHARED),
                                 _user_tensors(resident, stacked, u, Role.PRIVATE))
    results = []
    for u, schedule in enumerate(schedules):
        seen = sum(len(b) for b in schedule)
        stats = TrainStats(len(schedule), seen, float(loss_sums[u]) / max(seen, 1))
        results.append(StackedResult(finals[u][0], finals[u][1], stats))
    return results


def _stacked_references(resident: ResidentModel, encoded: Sequence[Sequence[EncodedPair]]) -> list[torch.Tensor]:
    """Each user's ``[n_u, 2]`` reference log-probs, user by user, exactly as ``train_local`` asks for them.

    Not one call for the whole cohort: a batched forward's last bits depend on the pairs batched with it
    (padding changes the kernels' blocking), and the resident's cache keeps the first value it computed. A
    user's values must not depend on which cohort, or which simulation worker, first saw its pairs, or a
    seeded simulation would not repeat to the bit (workers take cohorts in whatever order they come free)."""
    return [reference_logps(resident, user) for user in encoded]


def train_stacked(resident: ResidentModel, jobs: Sequence[StackedJob], settings: TrainSettings, *,
                 proximal_mu: float = 0.0) -> list[StackedResult]:
    """Train each job's user as ``train_local(resident, job.pairs, settings, job.seed)`` would, after loading
    the job's shared and private tensors, but all users in one forward/backward per step.

    Returns one ``StackedResult`` per job, in order; each equals the sequential result to float tolerance
    (summation order differs). ``proximal_mu`` > 0 adds FedProx's ``mu/2 ||w - w_start||^2`` on each user's
    shared tensors (as ``train_local`` inside ``fedpersona.strategies.proximal.proximal_term``).
    The resident model's adapter tensors, trainability and forward are as before the call afterwards
    (also after an error); its reference cache gains the cohort's pairs.

    Raises ``ValueError`` if ``stacking_supported`` refuses the resident or settings, or if a job's tensors
    do not match the layout (as ``AdapterState.load``). Memory: the trainable adapter tensors ``x U``
    (values, gradients, two AdamW moments), plus activations of at most ``max_tokens_per_batch`` tokens.
    """
    sites, reason = _sites(resident)
    reason = reason or stacking_supported(resident, settings)
    if reason is not None:
        raise ValueError(f"cohort training is not supported here: {reason}")
    if not jobs:
        return []
    state = resident.adapters
    saved = {n: p.detach().clone() for n, p in state.params.items()}
    try:
        encoded = [encode_pairs(resident.prompt_format, job.pairs, settings.max_length) for job in jobs]
        refs = _stacked_references(resident, encoded)  # before the per-user forward: needs disable_adapter()
        return _train(resident, sites, jobs, encoded, refs, settings, proximal_mu)
    finally:
        with torch.no_grad():
            for n, p in state.params.items():
                p.copy_(saved[n])
                p.requires_grad_(state.roles[n] is not Role.FROZEN)
        resident.model.eval()
