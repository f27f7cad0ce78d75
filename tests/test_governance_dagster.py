"""Blocking gate failures reach the audit log from inside a real Dagster check, with both run ids."""

import dagster as dg

from dpo_assets.governance import audit_failed_gates
from dpo_driver import audit
from dpo_driver.quality import ExpectationOutcome, GateResult
from resources import MLflowTracker


def gate(passed: bool) -> GateResult:
    outcome = ExpectationOutcome("expect_table_row_count_to_be_between", ["pair_id"], passed, {"observed_value": 3}, {"min_value": 10})
    return GateResult("count", passed, [outcome], [], {})


def test_a_failed_gate_is_audited_with_the_check_run_and_the_judged_mlflow_run(tmp_path, monkeypatch, audit_log):
    monkeypatch.setenv("DPO_HOME", str(tmp_path / "home"))

    @dg.asset
    def pairs(tracker: MLflowTracker) -> dg.MaterializeResult:
        with tracker.tracker().stage_run("pairs", {}) as run:
            pass
        return dg.MaterializeResult(value=1, metadata={"mlflow_run_id": run.run_id})

    @dg.multi_asset_check(specs=[dg.AssetCheckSpec(f"pairs_{g}", asset="pairs", blocking=True) for g in ("count", "format")])
    def pairs_gates(context: dg.AssetCheckExecutionContext, tracker: MLflowTracker):
        gates = {"count": gate(False), "format": gate(True)}
        audit_failed_gates(context, tracker, "pairs", gates)
        for name, g in gates.items():
            yield dg.AssetCheckResult(asset_key="pairs", check_name=f"pairs_{name}", passed=g.passed)

    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        result = dg.materialize([pairs, pairs_gates], resources={"tracker": MLflowTracker()}, instance=instance,
                                raise_on_error=False)
        mlflow_run_id = instance.get_latest_materialization_event(dg.AssetKey("pairs")).asset_materialization.metadata[
            "mlflow_run_id"].value
    (entry,) = audit.read(audit_log)  # the passing gate wrote nothing
    assert entry["event"] == "gate_failure" and entry["details"] == {"check": "pairs_count", "asset": "pairs"}
    assert entry["dagster_run_id"] == result.run_id and entry["mlflow_run_id"] == mlflow_run_id
    assert "expect_table_row_count_to_be_between(pair_id)" in entry["reason"]
    tags = MLflowTracker().tracker().client.get_run(mlflow_run_id).data.tags
    assert tags["audit.last_event"] == f"{entry['time']} gate_failure: {entry['reason']}"
