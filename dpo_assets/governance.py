"""Dagster-side calls into the audit log (dpo_driver/audit.py) for blocking gate failures."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from dpo_driver import audit
from dpo_driver.quality import GateResult
from resources import MLflowTracker


def audit_failed_gates(context: dg.AssetCheckExecutionContext, tracker: MLflowTracker, asset: str,
                       gates: Mapping[str, GateResult], mlflow_run_id: str | None = None) -> None:
    """One `gate_failure` record per failed gate (check `<asset>_<name>`); passing gates write nothing.
    The MLflow run defaults to that of the asset's latest materialization (the one the gates judged)."""
    if mlflow_run_id is None and not all(g.passed for g in gates.values()):
        event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
        value = event.asset_materialization.metadata.get("mlflow_run_id") if event else None
        mlflow_run_id = None if value is None else str(value.value)
    for name, gate in gates.items():
        if not gate.passed:
            why = "; ".join(f"{e.expectation}({', '.join(e.columns)}) observed {str(e.observed)[:150]}" for e in gate.failed)
            audit_gate_failure(context, tracker, asset, f"{asset}_{name}", why or "failed", mlflow_run_id)


def audit_gate_failure(context: dg.AssetCheckExecutionContext, tracker: MLflowTracker, asset: str, check: str,
                       why: str, mlflow_run_id: str | None = None) -> None:
    """Record that blocking check `check` on `asset` failed, tagging `mlflow_run_id` when given."""
    if mlflow_run_id == "none":  # what an untracked sft_adapter value carries (see checks.sft_adapter_validation)
        mlflow_run_id = None
    audit.record("gate_failure", f"blocking check {check} failed: {why}", tracker.tracker(),
                 dagster_run_id=context.run.run_id, mlflow_run_id=mlflow_run_id, details={"check": check, "asset": asset})
