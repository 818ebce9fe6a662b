"""Load a frozen base causal LM and its tokenizer: the embedded default, any HF id, a local folder, or a
GGUF checkpoint (a ``.gguf`` file, a folder holding one, or a short name such as ``smollm2-135m-instruct``;
converted once to an HF folder by :mod:`fedpersona.model.gguf`).

Loaded once per process and kept (``functools.cache``): simulations swap adapter tensors per client,
never the base model. ``check_model`` refuses a bad reference (one line) without building, converting or
loading anything, so commands call it before their heavy imports (Flower, Ray, transformers).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from fedpersona.errors import UsageError
from fedpersona.model.embedded import EMBEDDED_NAME, SHIPPED_SEED, cache_root, embedded_path, ensure_embedded, shipped_sums
from fedpersona.model.allocator import bound_allocator_cache
from fedpersona.model.gguf import SHORT_NAMES, ensure_converted, file_digest, gguf_source

log = logging.getLogger(__name__)

_CHOICES = f"embedded, {', '.join(SHORT_NAMES)}, an HF model folder or id, or a .gguf file"  # for error lines


def resolve_model_path(model: str) -> str:
    """What ``from_pretrained`` should load for ``--model``: ``embedded`` -> the folder shipped in the
    package; ``embedded:SEED`` -> its cached folder (built once; seed 0 is the shipped one); a GGUF reference
    -> its converted folder (converted once); a local folder -> itself; anything else is taken for an HF id.

    Raises UsageError (one line) for whatever :func:`check_model` refuses."""
    seed = _embedded_seed(model)
    if seed is not None:
        return str(ensure_embedded(seed))
    source = gguf_source(model)
    if source is not None:
        return str(ensure_converted(source, label=model))
    return _plain_model(model)


def check_model(model: str) -> None:
    """Raise UsageError (one line: what, where, how to fix) for a ``--model`` that cannot be loaded, at once:
    a malformed ``embedded:SEED``, a missing or unreadable local path, a GGUF reference whose file or package
    is missing, a malformed HF id, an HF id that is neither cached nor reachable (the Hub is probed once per
    process). Builds, converts, downloads and loads nothing: commands call it before their heavy imports."""
    seed = _embedded_seed(model)
    if seed is not None:
        if seed == SHIPPED_SEED:
            ensure_embedded(seed)  # the shipped folder checked against its hashes (~1 ms)
        return
    if gguf_source(model) is None:
        _plain_model(model)


def _plain_model(model: str) -> str:
    """A local folder (checked) or an HF id (:func:`_hub_model`)."""
    local = Path(model).expanduser()
    looks_local = local.exists() or model.startswith((".", "/", "~"))  # an HF id is "name" or "org/name"
    if looks_local and not local.exists():
        raise UsageError(f"--model {model}: no such file or folder; pass {_CHOICES}")
    if looks_local and local.is_file():
        raise UsageError(f"--model {model}: a file, but not a .gguf checkpoint; pass {_CHOICES}")
    if looks_local and not (local / "config.json").exists():
        raise UsageError(f"--model {model}: no config.json (nor a .gguf file) in that folder; pass {_CHOICES}")
    return str(local) if looks_local else _hub_model(model)


def _embedded_seed(model: str) -> int | None:
    if model == EMBEDDED_NAME or model.startswith(EMBEDDED_NAME + ":"):
        seed = model.split(":", 1)[1] if ":" in model else "0"
        if not seed.isdigit():
            raise UsageError(f"--model {model}: the seed after 'embedded:' must be a whole number >= 0 "
                             f"(embedded:0 is the shipped model); pass embedded or embedded:SEED")
        return int(seed)
    return None


@functools.cache
def model_sha256(model: str) -> str | None:
    """A hash of the base model's bits, for summary.json (once per process; never builds, converts or downloads).

    The SHA-256 of the weight files' bytes, files sorted by name and read in 1 MiB blocks (``*.safetensors``,
    else ``*.bin``); for a single-file model it is that file's ``sha256sum``. The shipped embedded model: its
    recorded ``model.safetensors`` hash. A GGUF reference: the ``.gguf`` file's hash (the one its converted
    folder is named by). None when the bits are not here (an HF id not in the local cache, an embedded seed not
    built yet) or cannot be read."""
    try:
        seed = _embedded_seed(model)
        if seed == SHIPPED_SEED:
            return shipped_sums()["model.safetensors"]
        if seed is not None:
            return _weights_sha256(embedded_path(seed))
        source = gguf_source(model)
        if source is not None:
            return file_digest(source, cache_root() / "models")
        local = Path(model).expanduser()
        if local.is_dir():
            return _weights_sha256(local)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        return _weights_sha256(Path(cached).parent) if isinstance(cached, str) else None
    except (UsageError, OSError, ValueError, RuntimeError) as err:
        log.info("no model_sha256 for %s: %s", model, err)
        return None


def _weights_sha256(folder: Path) -> str | None:
    import hashlib

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


HUB_PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here (one probe per process), None if it can or
    if a proxy decides (``HTTPS_PROXY``). ``HF_HUB_OFFLINE=1`` counts as unreachable."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{host} cannot be reached: {err.strerror or err}"
    return None


def _hub_model(model_id: str) -> str:
    """An HF id as ``from_pretrained`` should get it: the cached snapshot folder when the Hub cannot be
    reached (no retries against a network that is not there), else the id (downloaded or refreshed).

    Raises UsageError at once for a malformed id, and for an id that is neither cached nor downloadable
    (instead of a minute of retries in transformers)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError as err:
        raise UsageError(f"--model {model_id}: not a local path nor an HF id ({err}); pass {_CHOICES}") from None
    offline = hub_unreachable()
    if offline is None:
        return model_id
    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent)
    raise UsageError(f"--model {model_id}: not in the local Hugging Face cache and the Hub is out of reach "
                     f"({offline}); download it where there is a network (`hf download {model_id}`), "
                     f"or pass {_CHOICES}")


@functools.cache
def load_base(model: str = EMBEDDED_NAME, device: str = "cpu"):
    """Return ``(model, tokenizer)``: frozen, fp32, in eval mode, on ``device``; one copy per process.

    Raises UsageError when ``model`` cannot be resolved (:func:`resolve_model_path`) or loaded."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()  # no loading bars or deprecation chatter in user output
    transformers.logging.disable_progress_bar()
    path = resolve_model_path(model)
    bound_allocator_cache()  # a process that holds a model trains or evaluates it: keep its RSS honest
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
