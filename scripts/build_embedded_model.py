"""Re-make the embedded default model that ships in the package: ``fedpersona/model/shipped/embedded-v{N}-seed0``.

    .venv/bin/python scripts/build_embedded_model.py           # build and replace the shipped folder
    .venv/bin/python scripts/build_embedded_model.py --check   # build and compare with it; writes nothing

It runs ``build_embedded`` with the recipe's defaults (seed 0, 800 steps, batch 32) into a temp folder,
keeps the files ``from_pretrained`` needs, records their sha256 in ``SHA256SUMS`` and swaps the folder in
whole. It takes about 10 CPU-minutes (2 cores), so CI never runs it: the tests check the shipped files
against ``SHA256SUMS`` instead (tests/model/test_embedded_shipped.py pins the model.safetensors hash too;
update that constant when you re-make the folder on purpose, e.g. after bumping ``BUILD_VERSION``).
A rebuild on the same machine is bit-identical; another machine's floating point may differ, which is
why the bits ship instead of the recipe.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from fedpersona.model.embedded import SHIPPED_SEED, build_embedded, read_sums, shipped_path, write_sums

# what from_pretrained reads for the model and the tokenizer; nothing else ships
KEEP = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def build_into(folder: Path) -> dict[str, str]:
    """Build the shipped seed's model into the new folder ``folder``; return the recorded hashes."""
    with tempfile.TemporaryDirectory(prefix="fedpersona-embedded-") as tmp:
        built = Path(tmp) / "model"
        with torch.random.fork_rng():
            build_embedded(built, seed=SHIPPED_SEED)
        folder.mkdir()
        for name in KEEP:
            if (built / name).is_file():
                shutil.copyfile(built / name, folder / name)
                (folder / name).chmod(0o644)
        missing = {"config.json", "model.safetensors", "tokenizer.json"} - {f.name for f in folder.iterdir()}
        if missing:
            raise SystemExit(f"build_embedded wrote no {', '.join(sorted(missing))}")
    return write_sums(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="build and compare with the shipped folder; write nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    target = shipped_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        new = build_into(staging / "new")
        if args.check:
            old = read_sums(target) if target.is_dir() else {}
            for name in sorted(set(old) | set(new)):
                print(f"{'same' if old.get(name) == new.get(name) else 'DIFFERS'}  {name}  "
                      f"shipped {old.get(name, '-')}  built {new.get(name, '-')}")
            return 0 if old == new else 1
        if target.exists():  # swap: the old folder out, the new one in (two renames), then drop the old
            os.replace(target, staging / "old")
        os.replace(staging / "new", target)
        target.chmod(0o755)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name, digest in new.items():
        print(f"{digest}  {name}")
    print(f"wrote {target} ({sum(f.stat().st_size for f in target.iterdir())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
