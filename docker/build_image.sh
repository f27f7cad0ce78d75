#!/usr/bin/env bash
# Build one of the two images from this checkout; print its tag on the last line.
#   bash docker/build_image.sh train   [BASE_IMAGE]   training image   (docker/Dockerfile)
#   bash docker/build_image.sh dagster [BASE_IMAGE]   Dagster image    (docker/Dockerfile.dagster)
# BASE_IMAGE defaults to $DPO_BASE_IMAGE or dpo-driver-base:bookworm (scripts/docker_engine.sh).
# The tag is a content hash of the Dockerfile, the pins, the code that goes in, the base image's id
# and the torch wheel: an unchanged checkout costs one `docker image inspect` (no context is sent),
# and a code change rebuilds only the last layers from Docker's layer cache.
# TORCH_WHEEL: a torch wheel to install instead of downloading one. Default on the local Debian
# base: the CPU wheel in pip's find-links folder; on any other base (a CUDA image): none.
# PIP_CERT: CA bundle of a TLS-intercepting proxy between the build and PyPI; used only while building.
set -euo pipefail
cd "$(dirname "$0")/.."

kind=${1:?usage: build_image.sh train|dagster [BASE_IMAGE]}
case "$kind" in
  train)   dockerfile=docker/Dockerfile;         files=(docker/requirements-train.txt dpo_driver) ;;
  dagster) dockerfile=docker/Dockerfile.dagster; files=(pyproject.toml dpo_driver dpo_assets resources sensors) ;;
  *) echo "unknown image kind $kind: train or dagster" >&2; exit 2 ;;
esac
base=${2:-${DPO_BASE_IMAGE:-dpo-driver-base:bookworm}}
repo=${DPO_IMAGE_REPO:-dpo-driver}-$kind
torch_version=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
log=${TMPDIR:-/tmp}/dpo-$kind-image-build.log

base_id=$(docker image inspect --format '{{.Id}}' "$base" 2>/dev/null) || {
  echo "base image $base not found: run scripts/docker_engine.sh (local Debian base) or pull it" >&2
  exit 1
}
wheel=${TORCH_WHEEL-}
if [ -z "$wheel" ] && [[ "$base" == dpo-driver-base:* ]]; then
  links=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
  wheel=$(ls "${links:-/nonexistent}"/torch-"$torch_version"+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
fi
ca=${PIP_CERT:-}

tag=$( { cat "$dockerfile"
         find "${files[@]}" -type f \( -name '*.py' -o -name '*.txt' -o -name '*.toml' \) | sort | xargs cat
         echo "$base_id $(basename "${wheel:-none}") $torch_version"
         if [ -n "$ca" ]; then sha256sum < "$ca"; fi; } | sha256sum | cut -c1-12)
image="$repo:$tag"

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "[build_image] $image is up to date" >&2
else
  ctx=$(mktemp -d "${TMPDIR:-/tmp}/dpo-$kind-ctx.XXXXXX")
  trap 'rm -rf "$ctx"' EXIT
  mkdir -p "$ctx/wheels"
  cp "$dockerfile" "$ctx/Dockerfile"
  tar -c --exclude=__pycache__ --exclude='*.egg-info' "${files[@]}" | tar -x -C "$ctx"
  [ "$kind" = train ] && mv "$ctx/docker/requirements-train.txt" "$ctx/" && rmdir "$ctx/docker"
  if [ -n "$wheel" ]; then ln "$wheel" "$ctx/wheels/" 2>/dev/null || cp "$wheel" "$ctx/wheels/"; fi
  if [ -n "$ca" ]; then cp "$ca" "$ctx/build-ca.crt"; else : > "$ctx/build-ca.crt"; fi
  echo "[build_image] building $image from $base (torch: ${wheel:-base image or PyPI}; log: $log)" >&2
  # The classic builder: Debian's engine has no buildx, and nothing here needs BuildKit.
  if ! DOCKER_BUILDKIT=0 docker build --build-arg BASE_IMAGE="$base" --build-arg TORCH_VERSION="$torch_version" \
       -t "$image" "$ctx" >"$log" 2>&1; then
    tail -30 "$log" >&2
    echo "[build_image] build failed; full log: $log" >&2
    exit 1
  fi
fi
docker tag "$image" "$repo:latest"
echo "$image"
