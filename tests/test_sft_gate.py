"""The SFT gate through a real Dagster materialize: an untrained adapter is stopped before rollouts,
a trained one passes. Real MiniWoB demos (expert on the demo band's validation slice), real TRL."""

import copy
import json
from pathlib import Path

import dagster as dg
import pytest
from mlflow import MlflowClient

from dpo_assets.checks import sft_adapter_validation
from dpo_assets.presets import preset
from dpo_assets.rollouts import rollout_trajectories
from dpo_assets.sft import sft_adapter
from dpo_driver.io import read_jsonl
from dpo_driver.tasks import split_of
from dpo_driver.validation import VALIDATION_OFFSET, validation_seeds
from resources import ArtifactStore, MLflowTracker, PolicyModel, TaskSuite, TrainingLauncher, EnvironmentResource

pytestmark = pytest.mark.slow


@pytest.fixture
def resources(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_HOME", str(tmp_path))
    return {"policy_model": PolicyModel(model="tiny-random", cache_dir=str(tmp_path / "models")),
            "task_suite": TaskSuite(tasks=["click-tab"], demo_seeds=6, rollout_seeds=2, eval_seeds=2, validation_seeds=4),
            "environment": EnvironmentResource(), "artifact_store": ArtifactStore(root=str(tmp_path / "artifacts")),
            "tracker": MLflowTracker(), "trainer": TrainingLauncher()}


def run(resources, sft_config: dict, tmp_path):
    config = copy.deepcopy(preset("tiny"))
    config["ops"] = {k: v for k, v in config["ops"].items() if k in ("sft_adapter", "sft_adapter_validation", "rollout_trajectories")}
    config["ops"]["sft_adapter"]["config"].update(sft_config)
    config["ops"]["sft_adapter_validation"]["config"].update({"min_valid_fraction": 0.9})
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        return dg.materialize([sft_adapter, rollout_trajectories, sft_adapter_validation], resources=resources,
                              run_config=config, instance=instance, raise_on_error=False)


def checks(result) -> dict:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_untrained_adapter_fails_the_gate_and_rollouts_never_start(resources, tmp_path):
    result = run(resources, {"learning_rate": 0.0, "max_steps": 0, "min_steps": 1, "num_train_epochs": 0.1}, tmp_path)
    evaluation = checks(result)["validation"]
    assert not evaluation.passed
    assert evaluation.metadata["valid_fraction"].value < 0.9
    assert "Train longer" in evaluation.description and "valid actions" in evaluation.description
    mats = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert mats == {"sft_adapter"}  # blocking: rollout_trajectories did not run


def test_trained_adapter_passes_on_held_out_demo_states(resources, tmp_path):
    result = run(resources, {}, tmp_path)
    evaluation = checks(result)["validation"]
    assert evaluation.passed, evaluation.description
    sft = result.output_for_node("sft_adapter")
    records = read_jsonl(sft.validation_path)
    assert evaluation.metadata["states"].value == len(records) >= 4  # every step of every validation episode
    seeds = {r["seed"] for r in records}
    assert seeds and seeds <= set(validation_seeds(4)) and all(split_of(s) == "demo" and s >= VALIDATION_OFFSET for s in seeds)
    assert not seeds & {r["seed"] for r in read_jsonl(sft.validation_path.replace("validation", "demos"))}


def test_validation_seeds_refuse_to_overlap_training_demos():
    with pytest.raises(ValueError, match="overlap"):
        validation_seeds(3, demo_seeds=[VALIDATION_OFFSET + 1])


def test_sft_trains_more_rounds_until_the_held_out_expert_match_is_reached(resources, tmp_path):
    # A criterion the tiny model cannot meet: every round runs, each continuing the previous adapter.
    result = run(resources, {"max_steps": 2, "until_expert_match": 1.0, "max_rounds": 3}, tmp_path)
    [mat] = [m for m in result.get_asset_materialization_events() if m.asset_key.to_user_string() == "sft_adapter"]
    metadata = mat.materialization.metadata
    assert metadata["sft_rounds"].value == 3 and metadata["global_step"].value == 2
    sft = result.output_for_node("sft_adapter")
    out = Path(sft.adapter_dir).parent
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["0", "1"]  # the earlier rounds' adapters, kept
    assert json.loads((out / "sft_job_r2.json").read_text())["init_adapter_dir"] == "rounds/1"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    history = client.get_metric_history(sft.mlflow_run_id, "round_expert_match")
    assert sorted(m.step for m in history) == [0, 1]  # measured after each round that could be followed by another
    assert checks(result)["validation"].metadata["measured_by"].value == "this check"  # the last round is never measured by the asset


def test_gate_reuses_the_last_rounds_measure_instead_of_answering_the_states_twice(resources, tmp_path):
    # A criterion met after the first round: the asset measured that round, the gate reads the same numbers.
    result = run(resources, {"until_expert_match": 0.05, "max_rounds": 2}, tmp_path)
    evaluation = checks(result)["validation"]
    sft = result.output_for_node("sft_adapter")
    assert evaluation.metadata["measured_by"].value == "sft_adapter's last round"
    [logged] = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(sft.mlflow_run_id, "round_expert_match")
    assert evaluation.metadata["expert_match"].value == pytest.approx(logged.value) and logged.value >= 0.05
    assert evaluation.metadata["states"].value == len(read_jsonl(sft.validation_path))
