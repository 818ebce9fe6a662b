#!/usr/bin/env bash
# Build the Debian base image localhost/debian-python:bookworm from Debian's own packages, for machines
# that run podman but cannot pull from a public container registry (see docker/README.md).
#
#   sudo docker/build-base-image.sh            # idempotent: does nothing when the image exists
#
# Steps (each one printed with its time): install podman, runc and debootstrap when missing (apt-get);
# write /etc/containers/containers.conf when absent (runc needs default_ulimits = [] here); debootstrap a
# minbase bookworm with python3, python3-venv, python3-pip and ca-certificates into a temporary ROOTFS;
# unmount ROOTFS/proc (debootstrap leaves it mounted: the tarball would take the host's /proc with it);
# drop apt's caches; `tar | podman import` it as IMAGE.
#
# Environment: IMAGE (default localhost/debian-python:bookworm), SUITE (bookworm), DEBIAN_MIRROR
# (http://deb.debian.org/debian), WORK_DIR (where ROOTFS is made, default /var/tmp; removed after).
# Anywhere else, `--build-arg BASE=python:3.11-slim` (the Dockerfiles' default) needs no base image at all.
set -euo pipefail

IMAGE="${IMAGE:-localhost/debian-python:bookworm}"
SUITE="${SUITE:-bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WORK_DIR="${WORK_DIR:-/var/tmp}"

say() { printf '[build-base-image %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'build-base-image: %s\n' "$*" >&2; exit 2; }

[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap and rootful podman need it): sudo $0"

missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get; install them with your package manager"
  say "installing ${missing[*]} (apt-get)"
  t0=$SECONDS
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  say "installed in $((SECONDS - t0)) s"
fi

conf=/etc/containers/containers.conf
if [[ ! -e $conf ]]; then
  # runc fails on setrlimit RLIMIT_NOFILE/NPROC without these (checked on these machines)
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\npids_limit = 0\n' > "$conf"
  say "wrote $conf (default_ulimits = [], pids_limit = 0)"
elif ! grep -q 'default_ulimits *= *\[\]' "$conf"; then
  say "warning: $conf has no 'default_ulimits = []'; runc may fail on setrlimit"
fi

PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
if "${PODMAN[@]}" image exists "$IMAGE"; then
  say "$IMAGE exists; nothing to do (podman rmi $IMAGE to build it again)"
  exit 0
fi

rootfs="$(mktemp -d "$WORK_DIR/debian-python-rootfs.XXXXXX")"
cleanup() {
  # never remove a tree with a live mount inside: the host's /proc, /sys or /dev could go with it
  for m in proc sys dev/pts dev; do
    mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m"
  done
  if ! grep -q " $rootfs/" /proc/mounts; then rm -rf --one-file-system "$rootfs"; fi
}
trap cleanup EXIT

say "debootstrap --variant=minbase $SUITE into $rootfs (a few minutes)"
t0=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  "$SUITE" "$rootfs" "$DEBIAN_MIRROR" > "$rootfs.log" 2>&1 \
  || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
say "debootstrap done in $((SECONDS - t0)) s"

for m in proc sys dev/pts; do
  mountpoint -q "$rootfs/$m" && umount -l "$rootfs/$m"
done
grep -q " $rootfs/" /proc/mounts && die "something is still mounted under $rootfs; unmount it first"

# what a container does not need: downloaded .debs, package lists, man pages, docs
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/man/* "$rootfs"/usr/share/doc/* "$rootfs"/var/log/*.log
say "rootfs: $(du -sh --one-file-system "$rootfs" | cut -f1)"

t0=$SECONDS
tar --numeric-owner -C "$rootfs" -c . | "${PODMAN[@]}" import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $SUITE + python3, python3-venv, python3-pip, ca-certificates" \
  - "$IMAGE" >/dev/null
rm -f "$rootfs.log"
size="$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
say "imported $IMAGE in $((SECONDS - t0)) s: $size"
"${PODMAN[@]}" run --rm --network=host "$IMAGE" python3 --version
