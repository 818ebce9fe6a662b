#!/usr/bin/env bash
# The README's "run it for real" steps with SmolLM2-135M-Instruct: a TLS server and two devices on
# loopback, each device holding one persona of the generated:styles scenario (user 0: concise, formal,
# prose; user 7: detailed, casual, list), then what each device writes with `fedpersona generate` on the
# held-out prompts and on prompts from outside the scenario, judged at its poles.
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
# What each device writes: `fedpersona generate` (greedy, its default; 96 new tokens) at strength 1 (personal)
# and 0 (global) on the 8 held-out prompts of the scenario (no device trained on them) and 4 prompts from
# outside it, each answer judged at the device's poles (fedpersona.alignment.judges: words, list structure,
# informal markers) and for loops (repeated word 3-grams).
"$PY" - <<'PYEOF' > prompts.txt
import json
held_out = list(dict.fromkeys(json.loads(l)["prompt"] for l in open("alice.jsonl") if json.loads(l)["split"] == "test"))
unseen = ["How do I fix a squeaky door?", "What should I bring to a picnic?", "How can I learn to play the guitar?",
          "How do I keep my car battery from dying in winter?"]
print("\n".join(held_out + unseen))
PYEOF
: > answers.jsonl
while IFS= read -r PROMPT; do
  for who in alice bob; do
    for s in 1 0; do
      TEXT="$("$FP" generate --state "$who" "$PROMPT" --strength "$s" --max-new-tokens 96 2>/dev/null)"
      "$PY" -c 'import json, sys; print(json.dumps(dict(zip(("who", "strength", "prompt", "text"), sys.argv[1:]))))' \
        "$who" "$s" "$PROMPT" "$TEXT" >> answers.jsonl
    done
  done
done < prompts.txt
"$PY" - <<'PYEOF'
import json
from fedpersona.alignment.judges import JUDGES, repeated_ngram_share, user_poles
poles = {"alice": user_poles("user0000-concise-formal-prose"), "bob": user_poles("user0007-detailed-casual-list")}
rows = [json.loads(line) for line in open("answers.jsonl")]
for who in ("alice", "bob"):
    for strength, label in (("1", "personal"), ("0", "global")):
        mine = [r for r in rows if r["who"] == who and r["strength"] == strength]
        # `generate` prints the answer only: one cut at the token cap is judged by what it says (no cut flag)
        hits = {d: sum(JUDGES[d].at_pole(r["text"], p) for r in mine) / len(mine) for d, p in poles[who].items()}
        rep3 = sum(repeated_ngram_share(r["text"]) for r in mine) / len(mine)
        print(f"{who:<5} {label:<8} at {'/'.join(poles[who].values())}: " +
              ", ".join(f"{d} {v:.2f}" for d, v in hits.items()) +
              f"; overall {sum(hits.values()) / len(hits):.2f}; repeated 3-grams {rep3:.3f} ({len(mine)} prompts)")
for r in rows[:8]:
    print(f"\n== {r['who']}, strength {r['strength']}: {r['prompt']}\n{r['text']}")
PYEOF
