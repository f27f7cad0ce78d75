#!/usr/bin/env bash
# Idempotent: a running Docker engine and a local Debian base image, on a machine with no systemd
# and no image registry (the docker-marked tests need both; CI calls this before the tests).
#   1. Debian's docker.io + debootstrap, when missing
#   2. dockerd in the background, when no engine answers (log: /tmp/dockerd.log)
#   3. $DPO_BASE_IMAGE (default dpo-driver-base:bookworm) from `debootstrap --variant=minbase`,
#      when missing: nothing can be pulled here, so the base is built from the Debian mirror.
set -euo pipefail

BASE_IMAGE=${DPO_BASE_IMAGE:-dpo-driver-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
t0=$(date +%s)
say() { echo "[docker_engine +$(( $(date +%s) - t0 ))s] $*"; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} (Debian)"
  $SUDO apt-get update -qq
  # Wait for the dpkg lock instead of failing: other setup scripts may be installing too.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
    --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (log: /tmp/dockerd.log)"
  # setsid: the engine outlives this script and the CI shell that ran it.
  $SUDO setsid dockerd >/tmp/dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    tail -20 /tmp/dockerd.log >&2
    say "dockerd did not answer within 60 s" >&2
    exit 1
  fi
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "building $BASE_IMAGE with debootstrap from $MIRROR"
  root=$(mktemp -d /tmp/dpo-debootstrap.XXXXXX)
  trap '$SUDO rm -rf "$root"' EXIT
  $SUDO debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/tmp/debootstrap.log 2>&1 \
    || { tail -20 /tmp/debootstrap.log >&2; exit 1; }
  $SUDO tar -C "$root" -c . | docker import -c 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
fi
say "ready: engine $(docker version --format '{{.Server.Version}}'), base image $BASE_IMAGE"
