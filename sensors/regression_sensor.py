"""regression_sensor: an evaluation that does not promote, or a failed pair quality gate, is
recorded and (up to a bound) rerun from the rollouts with twice the samples per seed.

Reacts to new `evaluation_report` materializations whose metadata `decision` is "keep previous" or
"needs review", and to failed asset checks `preference_pairs_*`. It records why as MLflow tags on
the stage's run (metadata `mlflow_run_id`) and as an AssetObservation in Dagster, then requests an
`improvement_round` run with `rollout_trajectories.config.samples_per_seed` doubled, at most
DPO_REGRESSION_MAX_RETRIES (default 2; 0 = record only) times per original run. The run key is
`<original run>:retry-<n>`, so a failed check and a "keep previous" from one run, or a
re-evaluated tick, yield one rerun; the cursor holds the last event ids seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import dagster as dg
from mlflow.exceptions import MlflowException

from dpo_driver import audit
from dpo_driver.runconfig import TRIGGER_TAG, improvement_run_config, preset, preset_name
from resources import MLflowTracker

REGRESSION_DECISIONS = ("keep previous", "needs review")
ATTEMPT_TAG, ROOT_TAG = "dpo/retry_attempt", "dpo/retry_root"
# The assets it watches, by key: sensors/ never imports dpo_assets (which imports sensors/).
EVALUATION_REPORT, PREFERENCE_PAIRS = dg.AssetKey("evaluation_report"), dg.AssetKey("preference_pairs")
BATCH = 50  # events read per tick and source; the cursor carries on from there next tick


@dataclass
class Regression:
    asset_key: dg.AssetKey
    reason: str
    run_id: str  # Dagster run that produced the event; "" for runless events
    storage_id: int
    mlflow_run_id: str | None


@dataclass
class Rerun:
    run_key: str
    attempt: int
    root: str
    run_config: dict


def plan_rerun(source: str, run_tags: Mapping[str, str], base_config: dict, max_retries: int) -> Rerun | None:
    """The next retry of ``source`` (a run id) with K doubled, or None once ``max_retries`` are used.

    Retries of retries count against the original run (tags carry root and attempt), so the bound holds.
    """
    attempt = int(run_tags.get(ATTEMPT_TAG, 0)) + 1
    if attempt > max_retries:
        return None
    root = run_tags.get(ROOT_TAG) or source
    return Rerun(f"{root}:retry-{attempt}", attempt, root, improvement_run_config(base_config, samples_factor=2))


@dataclass
class RegressionCursor:
    evaluation: int | None = None  # storage id of the last evaluation_report materialization seen
    checks: dict[str, int] = field(default_factory=dict)  # check name -> last execution record id seen

    @classmethod
    def parse(cls, text: str | None) -> RegressionCursor:
        return cls(**json.loads(text)) if text else cls()

    def dump(self) -> str:
        return json.dumps({"evaluation": self.evaluation, "checks": self.checks}, sort_keys=True)


def _text(metadata: Mapping, key: str) -> str | None:
    value = metadata.get(key)
    return None if value is None else str(getattr(value, "value", value))


def _evaluation_regressions(instance: dg.DagsterInstance, cursor: RegressionCursor) -> list[Regression]:
    if cursor.evaluation is None:  # first tick: only the latest evaluation, not the whole history
        records = instance.fetch_materializations(EVALUATION_REPORT, limit=1).records
    else:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=EVALUATION_REPORT, after_storage_id=cursor.evaluation),
            limit=BATCH, ascending=True).records
    found = []
    for record in records:
        cursor.evaluation = record.storage_id
        metadata = record.asset_materialization.metadata
        decision = _text(metadata, "decision")
        if decision in REGRESSION_DECISIONS:
            found.append(Regression(EVALUATION_REPORT, f"evaluation decided {decision!r}", record.run_id,
                                    record.storage_id, _text(metadata, "mlflow_run_id")))
    return found


def _check_regressions(instance: dg.DagsterInstance, check_keys: list[dg.AssetCheckKey],
                       cursor: RegressionCursor) -> list[Regression]:
    found = []
    for key in check_keys:
        last = cursor.checks.get(key.name)
        history = instance.event_log_storage.get_asset_check_execution_history(key, limit=1 if last is None else BATCH)
        for record in sorted((r for r in history if last is None or r.id > last), key=lambda r: r.id):
            evaluation = record.event.asset_check_evaluation if record.event else None
            if evaluation is None:  # planned, not evaluated yet: wait, unless its run is over
                run = instance.get_run_by_id(record.run_id)
                if run is not None and not run.is_finished:
                    break
            elif not evaluation.passed:
                mlflow_run_id = _text(evaluation.metadata, "mlflow_run_id") or _pairs_mlflow_run(instance, evaluation)
                why = evaluation.description or _text(evaluation.metadata, "failed_expectations")
                detail = f": {why[:200]}" if why else ""
                found.append(Regression(PREFERENCE_PAIRS, f"quality gate {key.name} failed{detail}",
                                        record.run_id, record.id, mlflow_run_id))
            cursor.checks[key.name] = record.id
    return found


def _pairs_mlflow_run(instance: dg.DagsterInstance, evaluation: dg.AssetCheckEvaluation) -> str | None:
    target = evaluation.target_materialization_data
    if target is None:
        return None
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=PREFERENCE_PAIRS, storage_ids=[target.storage_id]), limit=1).records
    return _text(records[0].asset_materialization.metadata, "mlflow_run_id") if records else None


def _pair_check_keys(context: dg.SensorEvaluationContext) -> list[dg.AssetCheckKey]:
    repo = context.repository_def
    if repo is None:
        return []
    return sorted((k for k in repo.asset_graph.asset_check_keys
                   if k.asset_key == PREFERENCE_PAIRS and k.name.startswith("preference_pairs_")),
                  key=lambda k: k.name)


def _record_in_mlflow(context, tracker: MLflowTracker, mlflow_run_id: str | None, reason: str, action: str) -> bool:
    if not mlflow_run_id:
        context.log.warning(f"{reason}: no mlflow_run_id in the event's metadata, nothing tagged in MLflow")
        return False
    client = tracker.tracker().client
    try:
        client.set_tag(mlflow_run_id, "regression.reason", reason)
        client.set_tag(mlflow_run_id, "regression.action", action)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # store unreachable: fail the tick, the cursor stays, the next tick retries
        context.log.warning(f"MLflow run {mlflow_run_id} not found in {tracker.tracker().tracking_uri}")
        return False
    return True


@dg.sensor(name="regression_sensor", job_name="improvement_round", minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.STOPPED)
def regression_sensor(context: dg.SensorEvaluationContext, tracker: MLflowTracker) -> dg.SensorResult:
    """Evaluation not promoting, or a failed preference_pairs gate: record why, rerun with 2x samples (bounded)."""
    cursor = RegressionCursor.parse(context.cursor)
    regressions = _evaluation_regressions(context.instance, cursor)
    regressions += _check_regressions(context.instance, _pair_check_keys(context), cursor)
    by_source: dict[str, list[Regression]] = {}  # several failed gates of one run: one record, one rerun
    for regression in regressions:
        by_source.setdefault(regression.run_id or f"event-{regression.storage_id}", []).append(regression)
    max_retries = int(os.environ.get("DPO_REGRESSION_MAX_RETRIES", "2"))
    requests, observations = [], []
    for source, found in by_source.items():
        reason = "; ".join(dict.fromkeys(r.reason for r in found))
        run = context.instance.get_run_by_id(found[0].run_id) if found[0].run_id else None
        base = dict(run.run_config) if run is not None else preset(preset_name())  # runless: the preset
        rerun = plan_rerun(source, run.tags if run is not None else {}, base, max_retries)
        if rerun is None:
            action = f"no rerun: {max_retries} retries used" if max_retries else "no rerun: reruns are off"
        else:
            k = rerun.run_config["ops"]["rollout_trajectories"]["config"]["samples_per_seed"]
            action = f"rerun {rerun.run_key} with samples_per_seed={k}"
            requests.append(dg.RunRequest(
                run_key=rerun.run_key, run_config=rerun.run_config,
                tags={TRIGGER_TAG: "regression", ATTEMPT_TAG: str(rerun.attempt), ROOT_TAG: rerun.root,
                      "dpo/retry_reason": reason[:200]}))
        context.log.info(f"run {found[0].run_id or 'runless'}: {reason}; {action}")
        tagged = all([_record_in_mlflow(context, tracker, m, reason, action)
                      for m in dict.fromkeys(r.mlflow_run_id for r in found)])
        # A tick that fails after this line is evaluated again and writes the record again; the
        # run key in details tells such repeats apart from a second rerun.
        audit.record("rerun" if rerun else "regression", f"{reason}; {action}", tracker.tracker(),
                     dagster_run_id=found[0].run_id or None, mlflow_run_id=found[0].mlflow_run_id if tagged else None,
                     details={"run_key": rerun.run_key, "attempt": rerun.attempt, "root": rerun.root} if rerun else {})
        for asset_key in dict.fromkeys(r.asset_key for r in found):
            observations.append(dg.AssetObservation(asset_key=asset_key, metadata={
                "regression_reason": reason, "regression_action": action, "source_run_id": found[0].run_id,
                "mlflow_run_id": found[0].mlflow_run_id or "", "mlflow_tagged": tagged}))
    return dg.SensorResult(run_requests=requests, asset_events=observations, cursor=cursor.dump(),
                           skip_reason=None if regressions else "no new regression or failed pair gate")
