#!/usr/bin/env bash
# The README's "run it for real" steps with SmolLM2-135M-Instruct: a TLS server and two devices on
# loopback, each device holding one persona of the generated:styles scenario (user 0: concise, formal,
# prose; user 7: detailed, casual, list), then each device's personal and global answer to a test prompt.
#   bash scripts/deploy_smollm2.sh [WORKDIR]      (default runs/deploy-smollm2; about 10 min on 2 cores)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
W="${1:-$ROOT/runs/deploy-smollm2}"
FP="$ROOT/.venv/bin/fedpersona"
PY="$ROOT/.venv/bin/python"
PORT="${PORT:-9092}"
rm -rf "$W" && mkdir -p "$W" && cd "$W"
"$ROOT/docker/certs.sh" certs >/dev/null
"$FP" data styles --users 8 --out styles.jsonl
# each device imports its own user's rows: 36 training and 12 test pairs (a laptop-sized workload)
"$PY" - <<'PYEOF'
import json
rows = [json.loads(line) for line in open("styles.jsonl")]
for name, user in (("alice", "user0000"), ("bob", "user0007")):
    mine = [r for r in rows if r["user_id"].startswith(user)]
    keep = [r for r in mine if r["split"] == "train"][:36] + [r for r in mine if r["split"] == "test"][:12]
    with open(f"{name}.jsonl", "w") as out:
        out.writelines(json.dumps({**r, "user_id": name}) + "\n" for r in keep)
PYEOF
"$FP" feedback import alice.jsonl --state alice
"$FP" feedback import bob.jsonl --state bob
# The README's figures were measured without DP: the server asks for none (--no-dp) and both devices'
# policies accept that (--allow-no-dp) and share their held-out accuracies (--share-evaluation).
"$FP" server --state server-state --certificates certs --port "$PORT" --config "$ROOT/configs/smollm2.toml" \
    --rounds 3 --min-users 2 --fraction 1.0 --no-dp > server.log 2>&1 &
SERVER=$!
sleep 5
"$FP" client --server "127.0.0.1:$PORT" --state alice --root-certificates certs/ca.crt --allow-no-dp --share-evaluation > alice.log 2>&1 &
ALICE=$!
"$FP" client --server "127.0.0.1:$PORT" --state bob --root-certificates certs/ca.crt --allow-no-dp --share-evaluation > bob.log 2>&1 &
BOB=$!
trap 'kill $ALICE $BOB $SERVER 2>/dev/null || true' EXIT
wait $SERVER
kill $ALICE $BOB 2>/dev/null || true
wait $ALICE $BOB 2>/dev/null || true
cat server.log | tail -20
PROMPT="$("$PY" -c 'import json; print([json.loads(l) for l in open("alice.jsonl") if json.loads(l)["split"] == "test"][0]["prompt"])')"
for who in alice bob; do
  for s in 1 0; do
    echo "== $who, strength $s: $PROMPT"
    "$FP" generate --state "$who" "$PROMPT" --strength "$s" --max-new-tokens 96
  done
done
