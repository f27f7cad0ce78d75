#!/usr/bin/env bash
# Screenshots of the Dagster asset page and an MLflow episode trace: bash scripts/screenshots.sh [--home DPO_HOME] [--out DIR]
cd "$(dirname "$0")/.." && exec nice -n 10 .venv/bin/python scripts/screenshots.py "$@"
