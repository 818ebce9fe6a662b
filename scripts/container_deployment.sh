#!/usr/bin/env bash
# The container deployment end to end, with podman and podman-compose on this host: a server and two devices
# over TLS complete a federated round (docker/docker-compose.yml; what was exercised: docker/README.md).
#
#   sudo scripts/container_deployment.sh        # exit 0 only when the round completed
#
# Steps, each printed with its time: the Debian base image (docker/build-base-image.sh, when missing), the
# server and device images (docker/build-images.sh: skipped when unchanged, under a minute after a code change),
# certificates (docker/certs.sh), one pair file per device (`fedpersona data synthetic`, run in the device
# image), `fedpersona feedback import` into each device's own state volume, the server and both devices
# (podman-compose up), the wait for the server's summary, and its check (summary.json: 1 round, both devices
# trained and evaluated, none failed, pair-level epsilon <= 8). It then stops and removes what it started, by
# container id and volume name (a compose project name of its own: fedpersona-demo-TIME-PID), and nothing else.
#
# Environment:
#   FEDPERSONA_PORT  the SuperLink's port on this host (default 19092; the server listens on 127.0.0.1 only)
#   WORK             working folder (default runs/containers): RUN folders, tools, build logs
#   WAIT_S           seconds to wait for the server to finish (default 900)
#   SKIP_BUILD=1     use the images as they are (they must exist)
#   GIT_REV=HEAD     build the package from that commit instead of the working tree (docker/build-images.sh)
#   KEEP=1           leave containers and volumes in place (removed by hand: the script prints how)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-$ROOT/runs/containers}"
PORT="${FEDPERSONA_PORT:-19092}"
WAIT_S="${WAIT_S:-900}"
TAG=0.1.0
SERVER_IMAGE="localhost/fedpersona-server:$TAG"
CLIENT_IMAGE="localhost/fedpersona-client:$TAG"
BASE_IMAGE=localhost/debian-python:bookworm
PODMAN_COMPOSE_VERSION=1.6.0
PROJECT="fedpersona-demo-$(date +%Y%m%d-%H%M%S)-$$"
RUN="$WORK/$PROJECT"
CONTAINER_UID=49999  # the images' user "app"

PODMAN_GLOBAL_ARGS="${PODMAN_GLOBAL_ARGS-}"
if [[ -z "$PODMAN_GLOBAL_ARGS" ]] && command -v runc >/dev/null; then
  PODMAN_GLOBAL_ARGS="--runtime runc --cgroup-manager=cgroupfs"  # crun fails on these machines
fi
read -r -a PODMAN <<< "podman $PODMAN_GLOBAL_ARGS"

START=$SECONDS
STEP_START=$SECONDS
say() { printf '[container_deployment %s +%4ds] %s\n' "$(date +%H:%M:%S)" "$((SECONDS - START))" "$*"; }
step() { STEP_START=$SECONDS; say "$*"; }
done_step() { say "  done in $((SECONDS - STEP_START)) s${1:+: $1}"; }
die() { say "FAILED: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (rootful podman, as on these machines): sudo $0"
command -v podman >/dev/null || die "podman not found: docker/build-base-image.sh installs it (Debian)"
command -v python3 >/dev/null || die "python3 not found (needed for podman-compose and the checks)"
mkdir -p "$WORK" "$RUN/logs"

if python3 - "$PORT" <<'EOF'
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(0)
sys.exit(1)
EOF
then die "port $PORT is in use on this host; set FEDPERSONA_PORT to a free one"; fi

# ---- what this run started, ended on every path ----------------------------------------------------------
containers=()
volumes=()
compose=()
ours() {  # this project's containers and volumes, by the label podman-compose gives them
  mapfile -t containers < <("${PODMAN[@]}" ps -a -q --filter "label=io.podman.compose.project=$PROJECT")
  mapfile -t volumes < <("${PODMAN[@]}" volume ls -q --filter "label=io.podman.compose.project=$PROJECT")
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  ours
  if ((${#containers[@]})); then
    for id in "${containers[@]}"; do
      "${PODMAN[@]}" logs "$id" > "$RUN/logs/container-$id.log" 2>&1 || true
    done
  fi
  if [[ "${KEEP:-0}" == 1 ]]; then
    say "KEEP=1: left containers ${containers[*]:-none} and volumes ${volumes[*]:-none}"
    say "  remove them: podman rm -f ${containers[*]:-}; podman volume rm ${volumes[*]:-}"
  else
    if ((${#containers[@]})); then
      "${PODMAN[@]}" stop -t 20 "${containers[@]}" >/dev/null 2>&1 || true
      "${PODMAN[@]}" rm -f "${containers[@]}" >/dev/null 2>&1 || true
    fi
    if ((${#volumes[@]})); then "${PODMAN[@]}" volume rm -f "${volumes[@]}" >/dev/null 2>&1 || true; fi
    say "stopped and removed ${#containers[@]} containers and ${#volumes[@]} volumes of $PROJECT"
  fi
  say "files of this run: $RUN"
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# ---- 1. images -------------------------------------------------------------------------------------------
if ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
  step "base image $BASE_IMAGE missing: docker/build-base-image.sh"
  "$ROOT/docker/build-base-image.sh" > "$RUN/logs/base-image.log" 2>&1 \
    || { tail -20 "$RUN/logs/base-image.log"; die "base image build failed (log: $RUN/logs/base-image.log)"; }
  done_step
fi
if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
  for image in "$SERVER_IMAGE" "$CLIENT_IMAGE"; do
    "${PODMAN[@]}" image exists "$image" || die "SKIP_BUILD=1 but $image does not exist"
  done
else
  step "images $SERVER_IMAGE and $CLIENT_IMAGE from ${GIT_REV:-the working tree} (docker/build-images.sh)"
  BASE="$BASE_IMAGE" TAG="$TAG" BUILD_LOG="$RUN/logs/build.log" "$ROOT/docker/build-images.sh" \
    | sed 's/^/  /' || die "image build failed (log: $RUN/logs/build.log)"
  done_step
fi

# ---- 2. podman-compose -----------------------------------------------------------------------------------
if command -v podman-compose >/dev/null; then
  PC=(podman-compose)
else
  if [[ ! -x "$WORK/tools/bin/podman-compose" ]]; then
    step "podman-compose $PODMAN_COMPOSE_VERSION into $WORK/tools (pip)"
    python3 -m venv "$WORK/tools"
    "$WORK/tools/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION" > "$RUN/logs/pip.log" 2>&1 \
      || die "pip install podman-compose failed (log: $RUN/logs/pip.log)"
    done_step
  fi
  PC=("$WORK/tools/bin/podman-compose")
fi
say "compose: $("${PC[@]}" --version 2>/dev/null | head -1); project $PROJECT; port $PORT"
compose=("${PC[@]}" --podman-args "$PODMAN_GLOBAL_ARGS" --in-pod false -p "$PROJECT"
         -f "$ROOT/docker/docker-compose.yml")
export FEDPERSONA_PORT="$PORT" FEDPERSONA_HOST=127.0.0.1 FEDPERSONA_CERTS="$RUN/certs" \
       FEDPERSONA_FEEDBACK="$RUN/feedback" FEDPERSONA_SETTINGS="$RUN/server-settings.toml"

# ---- 3. certificates, pair files, settings ----------------------------------------------------------------
step "certificates (docker/certs.sh)"
"$ROOT/docker/certs.sh" "$RUN/certs" | sed 's/^/  /'
chown -R "$CONTAINER_UID:$CONTAINER_UID" "$RUN/certs"  # the server's key is 0600: readable by the container user
done_step

step "pair files of two synthetic users (fedpersona data synthetic, in the device image)"
mkdir -p "$RUN/feedback"
for i in 1 2; do  # users 0 and 1 of PreferenceSimulator("conflicting", 2, seed 0): opposite persona groups
  "${PODMAN[@]}" run --rm --network none --user root -v "$RUN/feedback:/out" "$CLIENT_IMAGE" \
    data synthetic --scenario conflicting --users 2 --seed 0 --user "$((i - 1))" --user-id "user-$i" \
    --out "/out/user-$i.jsonl" | sed 's/^/  /' || die "fedpersona data synthetic failed in $CLIENT_IMAGE"
done
chmod 644 "$RUN"/feedback/*.jsonl
done_step

# a quick round: small settings, the server's default pair-level DP (epsilon 8), which the devices' policy allows
cat > "$RUN/server-settings.toml" <<'EOF'
[fedpersona]
rounds = 1
min-users = 2
fraction-train = 1.0
round-timeout = 600
max-steps = 2
epochs = 1
max-length = 40
batch-size = 4
EOF

# ---- 4. each device imports its own pairs into its own state volume ---------------------------------------
for i in 1 2; do
  step "client-$i: fedpersona feedback import (podman-compose run)"
  "${compose[@]}" run --rm --no-deps -T "client-$i" feedback import /feedback/pairs.jsonl --state /state \
    > "$RUN/logs/import-$i.log" 2>&1 || { cat "$RUN/logs/import-$i.log"; die "import into client-$i failed"; }
  grep -v '^\(podman\|[0-9a-f]\{64\}$\)' "$RUN/logs/import-$i.log" | tail -2 | sed 's/^/  /'
  done_step
done

# ---- 5. server and devices --------------------------------------------------------------------------------
step "podman-compose up -d: server (TLS, 127.0.0.1:$PORT) and two devices"
"${compose[@]}" up -d > "$RUN/logs/up.log" 2>&1 || { cat "$RUN/logs/up.log"; die "podman-compose up failed"; }
ours
server_id="$("${PODMAN[@]}" ps -a -q --filter "label=io.podman.compose.project=$PROJECT" \
             --filter "label=io.podman.compose.service=server")"
[[ -n "$server_id" ]] || die "no server container after up (log: $RUN/logs/up.log)"
done_step "containers ${containers[*]}"

step "waiting for the round (the server exits after its summary; at most $WAIT_S s)"
# short polls, not one long `podman wait`: a signal to this script is handled within seconds
deadline=$((SECONDS + WAIT_S))
server_state() { "${PODMAN[@]}" inspect --format '{{.State.Status}}' "$server_id"; }
while [[ "$(server_state)" =~ ^(created|configured|running|paused|stopping)$ ]]; do
  if ((SECONDS >= deadline)); then
    "${PODMAN[@]}" logs --tail 30 "$server_id" 2>&1 | sed 's/^/  server| /'
    die "the server did not finish within $WAIT_S s"
  fi
  sleep 3
done
rc="$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$server_id")"
"${PODMAN[@]}" logs "$server_id" > "$RUN/logs/server.log" 2>&1 || true
sed 's/^/  server| /' "$RUN/logs/server.log" | tail -25
[[ "$rc" == 0 ]] || die "the server exited with status $rc (log: $RUN/logs/server.log)"
done_step "server exited 0"

# ---- 6. the check -----------------------------------------------------------------------------------------
step "checking the server's summary.json"
"${PODMAN[@]}" cp "$server_id:/state/out/summary.json" "$RUN/summary.json"
"${PODMAN[@]}" cp "$server_id:/state/out/metrics.jsonl" "$RUN/metrics.jsonl" 2>/dev/null || true
python3 - "$RUN/summary.json" <<'EOF' || die "summary.json does not show a completed round with 2 users"
import json, sys
summary = json.load(open(sys.argv[1]))
keys = ("rounds", "num_users", "train_answers", "evaluated_users", "client_failures", "rejected_replies",
        "epsilon_max", "personalized_accuracy_mean", "global_accuracy_mean", "base_accuracy_mean", "wall_seconds")
print("  summary:", json.dumps({k: summary.get(k) for k in keys}))
assert summary["rounds"] == 1, "rounds"
assert summary["num_users"] == 2 and summary["train_answers"] == 2, "both devices trained"
assert summary["evaluated_users"] == 2 and summary["personalized_accuracy_mean"] is not None, "both evaluated"
assert summary["client_failures"] == 0, "no device failed"
assert summary["epsilon_max"] is not None and 0 < summary["epsilon_max"] <= 8.0 + 1e-6, "DP spent within 8"
EOF
done_step
say "round completed over TLS in containers: $((SECONDS - START)) s in all"
