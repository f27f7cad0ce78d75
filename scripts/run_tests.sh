#!/usr/bin/env bash
# Set up, then run the whole test suite (pure functions, GE gates, training, and the real end-to-end DAG).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# A Docker engine + base image for the docker-marked tests; without one they skip, CI stays green.
bash scripts/docker_engine.sh || echo "docker engine unavailable; docker tests will skip"
.venv/bin/ruff check --no-cache .
# --durations: the slowest tests are listed at the end of every run, so CI time can be tracked test by test.
# -n 2 --dist loadfile: two workers, each taking whole files (a module's shared fixtures are built once).
# Much of a test's time is Chromium, subprocesses and Dagster bookkeeping, not arithmetic: the last
# one-worker CI used 20 of the 55 core-minutes its 27.6 minutes on 2 cores offered.
.venv/bin/python -m pytest -q -ra --durations=25 -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
