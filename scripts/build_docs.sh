#!/usr/bin/env bash
# Build the documentation site as CI does: install the docs extra into .venv (pinned versions, only what is
# missing) and run `mkdocs build --strict` (every warning is an error: a broken link, a docstring that does not
# parse, a page missing from disk). The site goes to runs/site (ignored by git), or to $1.
# The reference pages are generated from the code during the build (scripts/gen_docs_reference.py).
# Usage: bash scripts/build_docs.sh [SITE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "build_docs: no .venv here; run: bash scripts/setup.sh" >&2; exit 2; }
if ! .venv/bin/python -c "import mkdocs, material, mkdocstrings_handlers.python, mkdocs_gen_files" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q -e ".[docs]"
fi
export NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true  # a notice about a future MkDocs 2 on every build, not about this site
start=$(date +%s)
.venv/bin/mkdocs build --strict --site-dir "${1:-runs/site}"
echo "build_docs: the site is in ${1:-runs/site} ($(( $(date +%s) - start ))s)"
