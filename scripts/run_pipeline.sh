#!/usr/bin/env bash
# Set up, then materialize the whole DAG with a preset (default: the embedded SmolLM2-135M model).
#   bash scripts/run_pipeline.sh [default|tiny]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-default}
source scripts/setup.sh
export DPO_HOME=${DPO_HOME:-$PWD/.dpo_home}
export DAGSTER_HOME=${DAGSTER_HOME:-$DPO_HOME/dagster}
# Dagster + MLflow stores created once under a lock: runs started together on a new home raced here.
.venv/bin/python -m resources.home init

start=$(date +%s)
.venv/bin/dagster asset materialize -m dpo_assets.definitions --select '*' \
  --config-json "$(.venv/bin/python -m dpo_assets.presets "$preset")"
report=$(ls -td "$DPO_HOME"/artifacts/evaluation_report/*/ | head -1)
echo
echo "== evaluation report ($preset preset, $(( $(date +%s) - start )) s): ${report}report.md"
cat "${report}report.md"
echo "   plot: ${report}success_by_task.png"
echo
echo "Dagster UI:  DAGSTER_HOME=$DAGSTER_HOME DPO_HOME=$DPO_HOME bash scripts/ui.sh   (dg dev; stops whole on Ctrl-C/SIGTERM)"
echo "MLflow UI:   .venv/bin/mlflow ui --backend-store-uri sqlite:///$DPO_HOME/mlflow.db --default-artifact-root $DPO_HOME/mlartifacts"
