#!/usr/bin/env bash
# Set up, then run the whole test suite (pure functions, GE gates, training, and the real end-to-end DAG).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
.venv/bin/python -m pytest -q -ra "$@"
