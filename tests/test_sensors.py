"""Sensor ticks with build_sensor_context on temporary Dagster instances; no training, no browser."""

import hashlib
import json
import os
import time

import dagster as dg
import pytest
from mlflow import MlflowClient

from dpo_assets import definitions
from dpo_assets.presets import preset
from resources import MLflowTracker
from sensors import new_demos_sensor, regression_sensor
from sensors.regression_sensor import ATTEMPT_TAG, ROOT_TAG

DEMO = {"prompt": 'Task: Click on the "OK" button.\nElements:\n1. button "OK"\nNext action:', "completion": 'click button "OK"'}


def write_demos(path, n: int = 1, settled: bool = True):
    path.write_text("".join(json.dumps({**DEMO, "step": i}) + "\n" for i in range(n)))
    if settled:  # as if written a minute ago: past the settle delay
        old = time.time() - 60
        os.utime(path, (old, old))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def demos(tmp_path, monkeypatch):
    folder = tmp_path / "demos"
    folder.mkdir()
    monkeypatch.setenv("DPO_DEMOS_DIR", str(folder))
    monkeypatch.delenv("DPO_PRESET", raising=False)
    return folder


def tick(sensor, instance, cursor=None, **kwargs):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=definitions.defs, **kwargs)
    return sensor(context), context


def requests_of(result) -> list[dg.RunRequest]:
    return [] if isinstance(result, dg.SkipReason) else list(result.run_requests or [])


# ---- new_demos_sensor -------------------------------------------------------------------------

def test_new_demos_file_requests_one_whole_loop_run_on_that_file(instance, demos):
    digest = write_demos(demos / "mine.jsonl", n=3)
    result, _ = tick(new_demos_sensor, instance)
    (request,) = requests_of(result)
    assert request.run_key == digest
    assert request.run_config["ops"]["sft_adapter"]["config"]["demos_path"] == str(demos / "mine.jsonl")
    assert request.tags["dpo/trigger"] == "new_demos"
    assert dg.validate_run_config(definitions.defs.resolve_job_def("dpo_loop"), request.run_config)


def test_same_file_again_triggers_nothing_and_an_edit_triggers_once(instance, demos):
    path = demos / "mine.jsonl"
    first_digest = write_demos(path, n=2)
    first, context = tick(new_demos_sensor, instance)
    assert len(requests_of(first)) == 1
    cursor = first.cursor

    again, _ = tick(new_demos_sensor, instance, cursor=cursor)  # same state, evaluated twice
    assert requests_of(again) == [] and "no new demos" in again.skip_reason.skip_message
    lost_cursor, _ = tick(new_demos_sensor, instance)  # cursor lost: same run key, so Dagster launches nothing new
    assert [r.run_key for r in requests_of(lost_cursor)] == [first_digest]

    (demos / "copy.jsonl").write_bytes(path.read_bytes())  # same content under another name
    os.utime(demos / "copy.jsonl", (time.time() - 60,) * 2)
    copied, _ = tick(new_demos_sensor, instance, cursor=cursor)
    assert requests_of(copied) == []

    edited_digest = write_demos(path, n=5)
    edited, _ = tick(new_demos_sensor, instance, cursor=copied.cursor)
    assert [r.run_key for r in requests_of(edited)] == [edited_digest] != [first_digest]
    after, _ = tick(new_demos_sensor, instance, cursor=edited.cursor)
    assert requests_of(after) == []


def test_invalid_demos_are_skipped_until_the_file_is_fixed(instance, demos):
    path = demos / "broken.jsonl"
    path.write_text('{"prompt": "x", "completion": "dance wildly"}\n')
    os.utime(path, (time.time() - 60,) * 2)
    result, _ = tick(new_demos_sensor, instance)
    assert requests_of(result) == []
    write_demos(path)
    fixed, _ = tick(new_demos_sensor, instance, cursor=result.cursor)
    assert len(requests_of(fixed)) == 1


def test_a_file_still_being_written_waits_for_the_next_tick(instance, demos):
    write_demos(demos / "fresh.jsonl", settled=False)
    result, _ = tick(new_demos_sensor, instance)
    assert requests_of(result) == [] and "still being written" in result.skip_reason.skip_message


def test_missing_demos_folder_is_a_skip_naming_the_folder(instance, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DEMOS_DIR", str(tmp_path / "absent"))
    result, _ = tick(new_demos_sensor, instance)
    assert isinstance(result, dg.SkipReason) and str(tmp_path / "absent") in result.skip_message


# ---- regression_sensor ------------------------------------------------------------------------

@pytest.fixture
def fresh_instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def mlflow_tracker(make_tracker, monkeypatch):
    monkeypatch.delenv("DPO_PRESET", raising=False)
    monkeypatch.delenv("DPO_REGRESSION_MAX_RETRIES", raising=False)
    tracker = make_tracker()
    return tracker, {"tracker": MLflowTracker(tracking_uri=tracker.tracking_uri, experiment=tracker.experiment)}


def evaluation_run(tracker) -> str:
    with tracker.stage_run("evaluation", {}) as run:
        pass
    return run.run_id


def report_evaluation(instance, decision: str, mlflow_run_id: str = "") -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(
        "evaluation_report", metadata={"decision": decision, "mlflow_run_id": mlflow_run_id}))


def test_keep_previous_requests_one_rerun_with_doubled_samples_and_records_why(fresh_instance, mlflow_tracker):
    tracker, resources = mlflow_tracker
    eval_run = evaluation_run(tracker)
    report_evaluation(fresh_instance, "keep previous", eval_run)
    result, _ = tick(regression_sensor, fresh_instance, resources=resources)
    (request,) = requests_of(result)
    k = preset("default")["ops"]["rollout_trajectories"]["config"]["samples_per_seed"]
    assert request.run_config["ops"]["rollout_trajectories"]["config"]["samples_per_seed"] == 2 * k  # K doubled
    assert "sft_adapter" not in request.run_config["ops"]
    assert dg.validate_run_config(definitions.defs.resolve_job_def("improvement_round"), request.run_config)
    assert request.tags[ATTEMPT_TAG] == "1" and request.run_key.endswith(":retry-1")
    tags = MlflowClient(tracking_uri=tracker.tracking_uri).get_run(eval_run).data.tags
    assert tags["regression.reason"] == "evaluation decided 'keep previous'"
    assert tags["regression.action"] == f"rerun {request.run_key} with samples_per_seed={2 * k}"
    (observation,) = result.asset_events
    assert observation.asset_key == dg.AssetKey("evaluation_report")
    assert observation.metadata["regression_reason"].value == "evaluation decided 'keep previous'"

    again, _ = tick(regression_sensor, fresh_instance, cursor=result.cursor, resources=resources)
    assert requests_of(again) == []  # same state evaluated twice: one run
    replay, _ = tick(regression_sensor, fresh_instance, resources=resources)
    assert [r.run_key for r in requests_of(replay)] == [request.run_key]  # lost cursor: same key, deduplicated


def test_promote_and_later_evaluations_are_handled_once_each(fresh_instance, mlflow_tracker):
    _, resources = mlflow_tracker
    report_evaluation(fresh_instance, "promote")
    first, _ = tick(regression_sensor, fresh_instance, resources=resources)
    assert requests_of(first) == [] and first.asset_events == []
    report_evaluation(fresh_instance, "needs review")
    report_evaluation(fresh_instance, "promote")
    second, _ = tick(regression_sensor, fresh_instance, cursor=first.cursor, resources=resources)
    assert len(requests_of(second)) == 1
    assert "mlflow_run_id" in second.asset_events[0].metadata and not second.asset_events[0].metadata["mlflow_tagged"].value


class StubRollouts(dg.Config):
    samples_per_seed: int = 4


def stub_run(instance, samples: int, tags: dict, decision: str = "keep previous", gate_passes: bool = True):
    """A real Dagster run that materializes stand-ins for the pipeline's assets (no training)."""

    @dg.asset(name="rollout_trajectories")
    def rollouts(config: StubRollouts) -> int:
        return config.samples_per_seed

    @dg.asset(name="preference_pairs")
    def pairs(rollout_trajectories: int) -> int:
        return rollout_trajectories

    @dg.asset_check(asset="preference_pairs", name="preference_pairs_count")
    def count_gate() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=gate_passes, metadata={"failed_expectations": ["pairs: observed 0 < 1000"]})

    @dg.asset(name="evaluation_report", deps=[pairs])
    def report() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"decision": decision})

    result = dg.materialize([rollouts, pairs, report, count_gate], instance=instance, tags=tags,
                            run_config={"ops": {"rollout_trajectories": {"config": {"samples_per_seed": samples}}}})
    assert result.success
    return result.run_id


def test_reruns_of_reruns_double_again_and_stop_at_the_retry_bound(fresh_instance, mlflow_tracker, monkeypatch):
    _, resources = mlflow_tracker
    monkeypatch.setenv("DPO_REGRESSION_MAX_RETRIES", "2")
    original = stub_run(fresh_instance, samples=4, tags={})
    first, _ = tick(regression_sensor, fresh_instance, resources=resources)
    (retry1,) = requests_of(first)
    assert (retry1.run_key, retry1.tags[ROOT_TAG]) == (f"{original}:retry-1", original)
    assert retry1.run_config["ops"]["rollout_trajectories"]["config"]["samples_per_seed"] == 8

    stub_run(fresh_instance, samples=8, tags=retry1.tags)  # the rerun also kept the previous policy
    second, _ = tick(regression_sensor, fresh_instance, cursor=first.cursor, resources=resources)
    (retry2,) = requests_of(second)
    assert retry2.run_key == f"{original}:retry-2"
    assert retry2.run_config["ops"]["rollout_trajectories"]["config"]["samples_per_seed"] == 16

    stub_run(fresh_instance, samples=16, tags=retry2.tags)
    third, _ = tick(regression_sensor, fresh_instance, cursor=second.cursor, resources=resources)
    assert requests_of(third) == []
    assert third.asset_events[0].metadata["regression_action"].value == "no rerun: 2 retries used"


def test_failed_pair_gate_and_keep_previous_in_one_run_give_one_rerun(fresh_instance, mlflow_tracker):
    _, resources = mlflow_tracker
    run_id = stub_run(fresh_instance, samples=4, tags={}, gate_passes=False)
    result, _ = tick(regression_sensor, fresh_instance, resources=resources)
    (request,) = requests_of(result)
    assert request.run_key == f"{run_id}:retry-1"
    reason = request.tags["dpo/retry_reason"]
    assert "evaluation decided 'keep previous'" in reason and "quality gate preference_pairs_count failed" in reason
    assert {e.asset_key.to_user_string() for e in result.asset_events} == {"evaluation_report", "preference_pairs"}
    again, _ = tick(regression_sensor, fresh_instance, cursor=result.cursor, resources=resources)
    assert requests_of(again) == []


def test_reruns_off_still_records_the_regression(fresh_instance, mlflow_tracker, monkeypatch):
    tracker, resources = mlflow_tracker
    monkeypatch.setenv("DPO_REGRESSION_MAX_RETRIES", "0")
    eval_run = evaluation_run(tracker)
    report_evaluation(fresh_instance, "keep previous", eval_run)
    result, _ = tick(regression_sensor, fresh_instance, resources=resources)
    assert requests_of(result) == []
    tags = MlflowClient(tracking_uri=tracker.tracking_uri).get_run(eval_run).data.tags
    assert tags["regression.action"] == "no rerun: reruns are off"


def test_reruns_and_regressions_without_rerun_are_audited(fresh_instance, mlflow_tracker, monkeypatch, audit_log):
    from dpo_driver import audit

    tracker, resources = mlflow_tracker
    eval_run = evaluation_run(tracker)
    report_evaluation(fresh_instance, "keep previous", eval_run)
    result, _ = tick(regression_sensor, fresh_instance, resources=resources)
    (request,) = requests_of(result)
    monkeypatch.setenv("DPO_REGRESSION_MAX_RETRIES", "0")
    report_evaluation(fresh_instance, "needs review")  # no MLflow run in its metadata
    tick(regression_sensor, fresh_instance, cursor=result.cursor, resources=resources)
    rerun, regression = audit.read(audit_log)
    assert rerun["event"] == "rerun" and rerun["mlflow_run_id"] == eval_run
    assert rerun["details"] == {"run_key": request.run_key, "attempt": 1, "root": request.run_key.removesuffix(":retry-1")}
    assert rerun["reason"].startswith("evaluation decided 'keep previous'; rerun ")
    assert regression["event"] == "regression" and regression["mlflow_run_id"] is None
    assert regression["reason"] == "evaluation decided 'needs review'; no rerun: reruns are off"
