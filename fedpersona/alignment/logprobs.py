"""Log-probabilities of response tokens in memory bounded by the scored tokens, not by batch x length x vocab.

The straightforward computation (``full_softmax_logprobs``, kept as the reference for tests and the
benchmark) takes ``log_softmax`` of the LM head's logits at every position of every row: a
``[rows, length, vocab]`` fp32 tensor (128 x 256 x 49,152 floats = 6.4 GB for SmolLM2), and ``gather``
keeps more than one copy alive. Only the response tokens are scored, so ``sequence_logprobs``:

1. runs the decoder body (``model.base_model`` of the HF causal LM, LoRA layers included) for hidden
   states ``[rows, length, hidden]``;
2. keeps the hidden states at the scored positions only (``[scored, hidden]``);
3. applies the LM head and ``-cross_entropy`` (the log-probability of the target token) in chunks of at
   most ``LOGIT_CHUNK_BYTES`` of fp32 logits; with autograd on, each chunk is recomputed in backward
   (``torch.utils.checkpoint``) instead of keeping its logits for it, as fused "linear cross-entropy"
   kernels do (e.g. Liger-Kernel, Hsu et al., 2024, arXiv 2410.10989; Wijmans et al., 2024, arXiv 2411.09009).

Peak extra memory is about ``2 x LOGIT_CHUNK_BYTES`` whatever the vocabulary. Splitting the forward into
body and head must reproduce the model's own logits: that is checked once per model on a short input
(architectures that transform logits after the head, e.g. Gemma 2's soft-capping, are handled; an unknown
transform makes the check fail and the model's own forward is used, chunked over rows).
On CUDA the forward runs under bf16 autocast; the log-softmax is always fp32.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOGIT_CHUNK_BYTES = 64 * 2**20  # fp32 logits materialised at once (x2 with the softmax inside cross_entropy)
_SPLIT_OK_ATTR = "_fedpersona_head_split_ok"


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _head_logits(lm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on hidden states ``[..., hidden]`` -> fp32 logits ``[..., vocab]``, with the logit
    scaling / soft-capping some architectures apply after it."""
    logits = lm.get_output_embeddings()(hidden).float()
    scale = getattr(lm.config, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(lm.config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _body_hidden(lm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def head_split_ok(lm: torch.nn.Module) -> bool:
    """Whether body + head reproduce ``lm``'s own logits (checked once per model on a short input)."""
    cached = getattr(lm, _SPLIT_OK_ATTR, None)
    if cached is not None:
        return cached
    ok = False
    if lm.get_output_embeddings() is not None and lm.base_model is not lm:
        was_training = lm.training
        lm.eval()
        try:
            device = next(lm.parameters()).device
            vocab = lm.get_output_embeddings().weight.shape[0]
            ids = torch.arange(1, 9, device=device).remainder(vocab)[None]
            mask = torch.ones_like(ids)
            want = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            got = _head_logits(lm, _body_hidden(lm, ids, mask))
            ok = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4)
        except Exception:  # an architecture whose body does not take these arguments: use the full forward
            ok = False
        finally:
            lm.train(was_training)
    setattr(lm, _SPLIT_OK_ATTR, ok)
    return ok


def _target_logps(lm: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` for hidden states ``[n, hidden]`` and target ids ``[n]`` -> ``[n]`` (fp32)."""
    return -F.cross_entropy(_head_logits(lm, hidden), targets, reduction="none")


def _chunked_target_logps(lm: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    vocab = lm.get_output_embeddings().weight.shape[0]
    chunk = max(1, LOGIT_CHUNK_BYTES // (4 * vocab))
    if hidden.shape[0] <= chunk:
        return _target_logps(lm, hidden, targets)
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        parts.append(checkpoint(_target_logps, lm, h, t, use_reentrant=False) if recompute
                     else _target_logps(lm, h, t))
    return torch.cat(parts)


def sequence_logprobs(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's scored (response) tokens, and how many tokens were scored.

    ``batch`` is a ``SideBatch`` (``input_ids``/``attention_mask`` ``[B, T]``, ``score_mask`` ``[B, T-1]``:
    1 where token ``t+1`` is scored). Returns two fp32 tensors of shape ``[B]``. Differentiable with
    respect to the trainable (LoRA) parameters; memory is O(B*T*hidden + LOGIT_CHUNK_BYTES)."""
    lm = causal_lm(model)
    device = batch.input_ids.device
    rows, cols = batch.score_mask.nonzero(as_tuple=True)
    targets = batch.input_ids[:, 1:][rows, cols]
    with _autocast(device):
        if head_split_ok(lm):
            hidden = _body_hidden(lm, batch.input_ids, batch.attention_mask)
            token_logps = _chunked_target_logps(lm, hidden[:, :-1][rows, cols], targets)
        else:
            token_logps = _rowwise_full_logps(model, batch, rows, cols, targets)
    sums = torch.zeros(batch.input_ids.shape[0], dtype=torch.float32, device=device).index_add(0, rows, token_logps)
    return sums, batch.score_mask.sum(-1)


def _rowwise_full_logps(model, batch, rows, cols, targets) -> torch.Tensor:
    """Fallback: the model's own forward, one row at a time (memory ``T x vocab``), scored positions only."""
    parts = []
    for row in range(batch.input_ids.shape[0]):
        logits = model(input_ids=batch.input_ids[row : row + 1],
                       attention_mask=batch.attention_mask[row : row + 1]).logits[0, :-1]
        pick = rows == row
        parts.append(-F.cross_entropy(logits[cols[pick]].float(), targets[pick], reduction="none"))
    return torch.cat(parts) if parts else torch.zeros(0, device=batch.input_ids.device)


def full_softmax_logprobs(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward computation: ``log_softmax`` over the whole ``[B, T, vocab]`` logits, then gather.

    Memory grows with batch x length x vocabulary. Kept only as the reference that tests and
    ``benchmarks/real_models.py`` compare ``sequence_logprobs`` with."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * batch.score_mask).sum(-1), batch.score_mask.sum(-1)
