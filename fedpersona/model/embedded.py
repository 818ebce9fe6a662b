"""The embedded default model: a small Llama and a word-level tokenizer, made here with no download.

Built deterministically from a seed, briefly pre-trained on the preference simulator's text (so it
writes readable answers in every style), then saved as an ordinary Hugging Face folder. The default seed's
folder ships inside the package (``shipped/embedded-v{BUILD_VERSION}-seed0``, with a ``SHA256SUMS``; made by
``scripts/build_embedded_model.py``), so the first run starts at once and every machine starts from the
same bits. Other seeds (``--model embedded:SEED``) are built once (~10 CPU-minutes) into the cache
directory. Either folder loads through the same ``from_pretrained`` path as any user model.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fedpersona.model.prompting import format_prompt

log = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
BUILD_VERSION = 1  # bump when the recipe changes: a new cache folder is built (and the shipped one re-made)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
SHIPPED_SEED = 0  # the seed whose folder ships in the package (the default ``--model embedded``)
SUMS_NAME = "SHA256SUMS"  # in the shipped folder, `sha256sum` format: "<hex>  <file name>" a line


def cache_root() -> Path:
    return Path(os.environ.get("FEDPERSONA_CACHE", Path.home() / ".cache" / "fedpersona"))


def shipped_path() -> Path:
    """The package's own folder of the embedded model for ``SHIPPED_SEED`` (read-only is fine)."""
    return Path(__file__).with_name("shipped") / f"embedded-v{BUILD_VERSION}-seed{SHIPPED_SEED}"


def embedded_path(seed: int = 0) -> Path:
    """Where the embedded model for ``seed`` lies: the shipped folder for ``SHIPPED_SEED``, else the cache's."""
    if seed == SHIPPED_SEED:
        return shipped_path()
    return cache_root() / "models" / f"embedded-v{BUILD_VERSION}-seed{seed}"


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sums(folder: Path) -> dict[str, str]:
    """``{file name: sha256}`` as recorded in ``folder/SHA256SUMS``."""
    sums = {}
    for line in (folder / SUMS_NAME).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def write_sums(folder: Path) -> dict[str, str]:
    """Record the sha256 of every file in ``folder`` (but the record itself) in ``folder/SHA256SUMS``."""
    sums = {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != SUMS_NAME}
    (folder / SUMS_NAME).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


@functools.cache
def shipped_sums() -> dict[str, str]:
    """The shipped folder's recorded hashes, checked once per process against its files (~1 ms).

    Raises RuntimeError when the folder is missing or a file differs from its record (a damaged install)."""
    path = shipped_path()
    if not (path / SUMS_NAME).is_file():
        raise RuntimeError(f"the embedded model that ships with fedpersona is missing ({path}); reinstall fedpersona")
    sums = read_sums(path)
    bad = sorted(name for name, digest in sums.items() if not (path / name).is_file() or sha256_file(path / name) != digest)
    if bad or "model.safetensors" not in sums:
        raise RuntimeError(f"the embedded model that ships with fedpersona is damaged ({path}: "
                           f"{', '.join(bad) or 'no model.safetensors'} not as recorded in {SUMS_NAME}); reinstall fedpersona")
    return sums


def build_tokenizer(words: list[str]):
    """A word-level fast tokenizer over the simulator's vocabulary (punctuation split off, unknown -> <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(set(words) - set(SPECIAL_TOKENS))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _model_config(vocab_size: int, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _pretrain(model, tokenizer, texts: list[tuple[str, str]], seed: int, steps: int, batch_size: int) -> float:
    """Next-token pre-training on prompt + response texts; returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    encoded = [
        tokenizer(format_prompt(p), add_special_tokens=False)["input_ids"]
        + tokenizer(" " + r, add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
        for p, r in texts
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def build_embedded(out: Path, seed: int = 0, steps: int = 800, batch_size: int = 32) -> None:
    """Build, pre-train and save the embedded model and tokenizer into ``out`` (a new folder)."""
    from transformers import LlamaForCausalLM

    from fedpersona.data.synthetic import PreferenceSimulator, vocabulary

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocabulary() + ["user", "assistant", ":"])
    model = LlamaForCausalLM(_model_config(len(tokenizer), tokenizer))
    texts = PreferenceSimulator("conflicting", num_users=1, seed=seed).corpus_sample
    loss = _pretrain(model, tokenizer, texts, seed, steps, batch_size)
    log.info("embedded model pre-trained: %d steps, final LM loss %.3f", steps, loss)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_embedded(seed: int = 0) -> Path:
    """Return the embedded model folder for ``seed``: the shipped one for ``SHIPPED_SEED`` (checked against
    its recorded hashes once per process, never built), else the cached one, built once (~10 CPU-minutes;
    safe across concurrent processes)."""
    if seed == SHIPPED_SEED:
        shipped_sums()
        return shipped_path()
    path = embedded_path(seed)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait and then find it built
        if not (path / "config.json").exists():
            log.info("building the embedded model (once) into %s", path)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
            try:
                with torch.random.fork_rng():
                    build_embedded(tmp, seed)
                os.replace(tmp, path)  # the folder appears whole or not at all
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return path
