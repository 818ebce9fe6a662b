"""Load a frozen base causal LM and its tokenizer: the embedded default, any HF id, or a local folder.

Loaded once per process and kept (``functools.cache``): simulations swap adapter tensors per client,
never the base model.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from fedpersona.errors import UsageError
from fedpersona.model.embedded import EMBEDDED_NAME, ensure_embedded

log = logging.getLogger(__name__)


def resolve_model_path(model: str) -> str:
    """``embedded`` (or ``embedded:SEED``) -> its cached folder; anything else is an HF id or local path."""
    if model == EMBEDDED_NAME or model.startswith(EMBEDDED_NAME + ":"):
        seed = int(model.split(":", 1)[1]) if ":" in model else 0
        return str(ensure_embedded(seed))
    return model


@functools.cache
def load_base(model: str = EMBEDDED_NAME, device: str = "cpu"):
    """Return ``(model, tokenizer)``: frozen, in eval mode, on ``device``; one copy per process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers

    transformers.logging.set_verbosity_error()  # no loading bars or deprecation chatter in user output
    transformers.logging.disable_progress_bar()
    path = resolve_model_path(model)
    local = Path(path)
    if (local.exists() or path.startswith((".", "/"))) and not (local / "config.json").exists():
        raise UsageError(f"--model {model}: no config.json in that folder; pass an HF model folder or id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {model}: cannot load it ({first}); pass a local folder or a cached HF id") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # many causal LMs ship without a pad token
    base.to(device)
    base.requires_grad_(False)
    base.eval()
    log.info("loaded base model %s (%d parameters) on %s", model, sum(p.numel() for p in base.parameters()), device)
    return base, tokenizer
