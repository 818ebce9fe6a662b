#!/usr/bin/env bash
# Build the server and device images with podman from the repository's working tree (as exercised here;
# docker/README.md). An image is rebuilt when what it is made of changed (its label fedpersona.source holds a
# hash of the package's files, the Dockerfile, the base image and the torch arguments); cached layers keep a
# rebuild after a code change under a minute. So the images hold the code as it is now.
#
#   docker/build-images.sh
#
# Environment:
#   BASE             base image (default: localhost/debian-python:bookworm when it exists, made by
#                    docker/build-base-image.sh; python:3.11-slim otherwise)
#   TAG              image tag (default 0.1.0): localhost/fedpersona-server:TAG, localhost/fedpersona-client:TAG
#   TORCH_VERSION    2.13.0
#   TORCH_INDEX_URL  where CPU torch comes from (default: PyTorch's CPU index; with HOST_PIP, pip's own index,
#                    so that the CPU wheel in the host's find-links folder is the one installed)
#   HOST_PIP         auto (default), 1 or 0: mount this host's CA bundle, pip configuration and the local
#                    folders it names (find-links, file:// indexes) read-only into the build, for machines
#                    whose registry traffic goes through a proxy with its own CA and whose pip has local wheels
#   FORCE=1          build even when the images' source hash matches
#   GIT_REV          build the package from this commit (git archive) instead of the working tree, e.g. HEAD
#   PODMAN_GLOBAL_ARGS  default "--runtime runc --cgroup-manager=cgroupfs" when runc is installed
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TAG="${TAG:-0.1.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if [[ -z "${PODMAN_GLOBAL_ARGS+x}" ]]; then
  PODMAN_GLOBAL_ARGS=""
  command -v runc >/dev/null && PODMAN_GLOBAL_ARGS="--runtime runc --cgroup-manager=cgroupfs"
fi
read -r -a PODMAN <<< "podman $PODMAN_GLOBAL_ARGS"
say() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'build-images: %s\n' "$*" >&2; exit 2; }

command -v podman >/dev/null || die "podman not found (docker/build-base-image.sh installs it on Debian)"
if [[ -z "${BASE:-}" ]]; then
  BASE=python:3.11-slim
  "${PODMAN[@]}" image exists localhost/debian-python:bookworm && BASE=localhost/debian-python:bookworm
fi

mounts=()
host_pip="${HOST_PIP:-auto}"
if [[ "$host_pip" == auto ]]; then
  host_pip=0
  command -v pip >/dev/null && [[ -n "$(pip config list 2>/dev/null)" ]] && host_pip=1
fi
if [[ "$host_pip" == 1 ]]; then
  add_mount() { [[ -e "$1" ]] && mounts+=(-v "$1:${2:-$1}:ro"); return 0; }
  add_mount /etc/ssl/certs/ca-certificates.crt
  add_mount /etc/pip.conf
  add_mount /etc/xdg/pip
  add_mount "$HOME/.config/pip" /root/.config/pip
  # the folders pip's settings name: find-links folders, file:// indexes (with their files/ beside simple/)
  while read -r path; do
    [[ "$path" == */simple ]] && path="${path%/simple}"
    add_mount "$path"
  done < <(pip config list 2>/dev/null | grep -E 'find-links|index-url' | grep -oE "(file://)?/[^ ']+" \
           | sed 's#^file://##; s#/$##' | sort -u)
  if [[ -z "${TORCH_INDEX_URL:-}" ]]; then
    TORCH_INDEX_URL="$(pip config get global.index-url 2>/dev/null || echo https://pypi.org/simple)"
  fi
fi
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"

context="$ROOT"
if [[ -n "${GIT_REV:-}" ]]; then
  context="$(mktemp -d)"
  trap 'rm -rf "$context"' EXIT
  git -C "$ROOT" archive "$GIT_REV" pyproject.toml README.md fedpersona | tar -x -C "$context" \
    || die "git archive $GIT_REV failed"
fi

# what an image is made of: the package's files (not README.md, which only fills the package's description),
# the Dockerfile and its ignore file, the base image and the torch arguments
source_hash() {
  {
    (cd "$context" && find pyproject.toml fedpersona -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
       | sort -z | xargs -0 sha256sum)
    cat "$ROOT/docker/Dockerfile.$1" "$ROOT/docker/Dockerfile.$1.dockerignore"
    "${PODMAN[@]}" image inspect --format '{{.Id}}' "$BASE" 2>/dev/null || echo "$BASE"
    echo "$TORCH_VERSION $TORCH_INDEX_URL"
  } | sha256sum | cut -c1-16
}

say "base $BASE, torch $TORCH_VERSION from $TORCH_INDEX_URL; package from ${GIT_REV:-the working tree}"
say "build mounts: ${mounts[*]:-none}"
for role in server client; do
  image="localhost/fedpersona-$role:$TAG"
  hash="$(source_hash "$role")"
  old_id="$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
  if [[ -n "$old_id" && "${FORCE:-0}" != 1 ]] \
     && [[ "$("${PODMAN[@]}" image inspect --format '{{index .Labels "fedpersona.source"}}' "$image")" == "$hash" ]]; then
    say "$image is up to date (source $hash); FORCE=1 builds it anyway"
    continue
  fi
  t0=$SECONDS
  "${PODMAN[@]}" build --network host --layers --label "fedpersona.source=$hash" \
    -f "$ROOT/docker/Dockerfile.$role" --ignorefile "$ROOT/docker/Dockerfile.$role.dockerignore" \
    --build-arg "BASE=$BASE" --build-arg "TORCH_VERSION=$TORCH_VERSION" \
    --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
    "${mounts[@]}" -t "$image" "$context" >> "${BUILD_LOG:-/dev/stderr}" 2>&1 \
    || die "podman build of $image failed${BUILD_LOG:+ (log: $BUILD_LOG)}"
  new_id="$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$image")"
  # the image this one replaced, now untagged: removed with its own layers (one in use by a container stays)
  if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then "${PODMAN[@]}" rmi "$old_id" >/dev/null 2>&1 || true; fi
  size="$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
  say "$image built in $((SECONDS - t0)) s ($size, source $hash)"
done
