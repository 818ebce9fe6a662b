#!/usr/bin/env bash
# Run the command blocks of Markdown files as written (CI runs this after the tests, in the set-up .venv): the
# README's and the documentation's tutorials (.ci/run names the files).
#
# A block takes part when the line just above its ```bash fence is a marker (invisible on GitHub and in the docs):
#   <!-- ci: run [slow] [tmpdir | tmpdir=NAME] [timeout=SECONDS] -->  run the block with `bash -e -o pipefail`,
#       from the repository root (tmpdir: from a fresh empty directory; tmpdir=NAME: the same fresh directory for
#       every block of that file marked with that NAME, in order, so a tutorial's blocks build on each other),
#       .venv/bin first on PATH, stdin closed; timeout defaults to 600 s; slow: skipped when README_CHECK_QUICK=1
#   <!-- ci: in .ci/run -->  .ci/run must contain every command line of the block verbatim (it runs them)
# Each block is printed, then its status and wall time; the first failing block fails the check (exit 1).
# Flower's files (FLWR_HOME) go to a temporary folder, and a local SuperLink that a block started there is
# stopped at the end (a safety net: blocks stop what they start by its pid).
# Usage: bash scripts/check_readme.sh [FILE.md ...]   (default: README.md)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(README.md)
[ -x .venv/bin/python ] || { echo "check_readme: no .venv here; run: bash scripts/setup.sh" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-readme.XXXXXX")
export PATH="$ROOT/.venv/bin:$PATH" VIRTUAL_ENV="$ROOT/.venv" FLWR_HOME="$WORK/flwr-home"
cleanup() {
  # The local SuperLink `flwr run` starts is detached and outlives the block: stop the one under our FLWR_HOME.
  local pids
  pids=$(pgrep -f -- "--log-file $FLWR_HOME/local-superlink/" || true)
  if [ -n "$pids" ]; then
    echo "check_readme: stopping the local SuperLink a block started (pid $pids)"
    kill $pids 2>/dev/null || true
    for _ in $(seq 20); do  # it stops its own children (SuperExec, simulation) as it goes: wait up to 10 s
      pgrep -f -- "--log-file $FLWR_HOME/local-superlink/" >/dev/null || break
      sleep 0.5
    done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# Extract the marked blocks of every file, numbered across files: $WORK/block-N.sh (the block's text) and
# $WORK/block-N.meta (file, line, marker options).
COUNT=0
for FILE in "${FILES[@]}"; do
  [ -f "$FILE" ] || { echo "check_readme: $FILE: no such file" >&2; exit 2; }
  awk -v dir="$WORK" -v n="$COUNT" '
    function fail(msg) { printf "check_readme: %s:%d: %s\n", FILENAME, NR, msg > "/dev/stderr"; bad = 1; exit 2 }
    state == 2 {  # inside a marked block
      if ($0 ~ /^```[[:space:]]*$/) { state = 0; close(file); next }
      print > file; next
    }
    state == 1 {  # the line after a marker must open a bash block
      if ($0 !~ /^```(bash|sh)[[:space:]]*$/) fail("a <!-- ci: ... --> marker must stand just above a ```bash fence")
      n++; file = sprintf("%s/block-%d.sh", dir, n)
      printf "%s %d %s\n", FILENAME, NR + 1, opts > sprintf("%s/block-%d.meta", dir, n)
      close(sprintf("%s/block-%d.meta", dir, n))
      printf "" > file
      state = 2; next
    }
    /^<!-- ci:.*-->[[:space:]]*$/ {
      opts = $0; sub(/^<!-- ci:[[:space:]]*/, "", opts); sub(/[[:space:]]*-->[[:space:]]*$/, "", opts)
      state = 1; next
    }
    END { if (!bad && state == 2) fail("a marked block has no closing fence"); if (!bad) print n + 0 > (dir "/count") }
  ' "$FILE" || exit 2
  before=$COUNT
  COUNT=$(cat "$WORK/count")
  [ "$COUNT" -gt "$before" ] || { echo "check_readme: no <!-- ci: ... --> blocks in $FILE" >&2; exit 2; }
done

ran=0 skipped=0 total_start=$(date +%s)
for ((i = 1; i <= COUNT; i++)); do
  read -r file line opts < "$WORK/block-$i.meta"
  block="$WORK/block-$i.sh"
  echo
  echo "=== $file:$line  [ci: $opts]"
  sed 's/^/  | /' "$block"
  kind=${opts%% *}
  if [ "$kind" = "in" ]; then  # "in .ci/run": the block's commands must be what CI runs
    target=${opts#in }
    missing=0
    while IFS= read -r cmd; do
      [[ -z "${cmd// }" || "$cmd" =~ ^[[:space:]]*# ]] && continue
      grep -qF -- "$cmd" "$target" || { echo "--- FAILED: $target does not run: $cmd"; missing=1; }
    done < "$block"
    [ $missing -eq 0 ] || exit 1
    echo "--- ok: $target runs this block"
    continue
  fi
  if [ "$kind" != "run" ]; then
    echo "--- FAILED: unknown marker 'ci: $opts' (run ... | in FILE)"; exit 2
  fi
  timeout_s=600 cwd=$ROOT slow=0
  for opt in ${opts#run}; do
    case $opt in
      slow) slow=1 ;;
      tmpdir) cwd=$(mktemp -d "$WORK/block-$i.XXXXXX") ;;
      tmpdir=*)  # one fresh directory per file and name, shared by the blocks that name it
        shared="$WORK/shared-$(printf '%s' "$file" | tr -c 'A-Za-z0-9' _)-${opt#tmpdir=}"
        mkdir -p "$shared" && cwd=$shared ;;
      timeout=*) timeout_s=${opt#timeout=} ;;
      *) echo "--- FAILED: unknown option '$opt' in 'ci: $opts'"; exit 2 ;;
    esac
  done
  if [ $slow -eq 1 ] && [ "${README_CHECK_QUICK:-0}" = "1" ]; then
    echo "--- skipped (slow; README_CHECK_QUICK=1)"; skipped=$((skipped + 1)); continue
  fi
  start=$(date +%s)
  (cd "$cwd" && exec timeout --kill-after=30 "$timeout_s" bash -e -o pipefail "$block") < /dev/null 2>&1 \
    | sed 's/^/  > /'
  rc=${PIPESTATUS[0]}
  took=$(( $(date +%s) - start ))
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "--- FAILED: timed out after ${timeout_s}s ($file:$line)"
    else
      echo "--- FAILED: exit $rc after ${took}s ($file:$line)"
    fi
    exit 1
  fi
  echo "--- ok (${took}s)"
  ran=$((ran + 1))
done
echo
echo "check_readme: ${FILES[*]}: $ran block(s) ran, $skipped skipped, $COUNT marked, all ok ($(( $(date +%s) - total_start ))s)"
