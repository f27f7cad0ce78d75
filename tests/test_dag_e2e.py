"""The whole DAG, for real: tiny-random model, real MiniWoB++ in headless Chromium, real TRL, MLflow, Dagster."""

import json

import dagster as dg
import pandas as pd
import pytest
from datasets import load_dataset
from mlflow.tracking import MlflowClient
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dpo_assets.checks import CHECKS
from dpo_assets.definitions import ASSETS
from dpo_assets.presets import preset
from dpo_driver.actions import parse_action
from dpo_driver.tasks import split_of
from resources import ArtifactStore, MLflowTracker, PolicyModel, TaskSuite, TrainingLauncher, WebEnvironment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("dpo_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("DPO_HOME", str(home))
    resources = {
        "policy_model": PolicyModel(cache_dir=str(home / "models")),
        "task_suite": TaskSuite(),
        "web_env": WebEnvironment(),
        "artifact_store": ArtifactStore(root=str(home / "artifacts")),
        "tracker": MLflowTracker(),  # the embedded default: SQLite + artifacts under $DPO_HOME
        "trainer": TrainingLauncher(),  # the embedded default: a Pipes subprocess
    }
    (home / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(home / "dagster")) as instance:
        result = dg.materialize(ASSETS + CHECKS, resources=resources, run_config=preset("tiny"), instance=instance)
        yield result, home
    mp.undo()


def test_whole_dag_materializes(run):
    result, _ = run
    assert result.success
    mats = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert mats == {"sft_adapter", "rollout_trajectories", "preference_pairs", "dpo_adapter", "evaluation_report"}


def test_trajectories_record_every_step(run):
    result, _ = run
    eps = result.output_for_node("rollout_trajectories")
    cfg = preset("tiny")
    suite = cfg["resources"]["task_suite"]["config"]
    k = cfg["ops"]["rollout_trajectories"]["config"]["samples_per_seed"]
    assert len(eps) == len(suite["tasks"]) * suite["rollout_seeds"] * k
    assert set(eps["task"]) == set(suite["tasks"])
    assert {split_of(s) for s in eps["seed"]} == {"rollout"}
    for ep in eps.to_dict("records"):
        assert ep["num_steps"] == len(ep["steps"]) >= 1
        for st in ep["steps"]:
            assert st["prompt"].startswith("Task: ") and isinstance(st["output"], str)
            assert {"action", "valid", "reward", "done", "seconds"} <= set(st)
        assert ep["steps"][-1]["done"] or ep["truncated"]


def test_pairs_are_well_formed_and_load_with_datasets(run):
    result, home = run
    pairs = result.output_for_node("preference_pairs")
    assert len(pairs) > 0
    assert (pairs["chosen"] != pairs["rejected"]).all()
    assert (pairs["margin"] >= preset("tiny")["ops"]["preference_pairs"]["config"]["min_margin"]).all()
    assert all(parse_action(c) for c in pairs["chosen"])
    assert not pairs.duplicated(["prompt", "chosen", "rejected"]).any()
    [path] = list((home / "artifacts" / "preference_pairs").glob("*/pairs.jsonl"))
    ds = load_dataset("json", data_files=str(path), split="train")
    assert len(ds) == len(pairs) and {"prompt", "chosen", "rejected"} <= set(ds.column_names)


def test_adapters_load_with_peft(run):
    result, _ = run
    sft, dpo = result.output_for_node("sft_adapter"), result.output_for_node("dpo_adapter")
    assert dpo["sft_adapter_dir"] == sft["adapter_dir"] != dpo["adapter_dir"]
    for a in (sft, dpo):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(a["base_model"]), a["adapter_dir"])
        assert any("lora_" in n for n, _ in model.named_parameters())


def test_report_has_a_row_per_task_and_a_decision(run):
    result, home = run
    value = result.output_for_node("evaluation_report")
    assert value["decision"] in {"promote", "keep previous", "needs review"}
    tasks = preset("tiny")["resources"]["task_suite"]["config"]["tasks"]
    assert set(tasks) <= set(value["summary"]["per_task"])
    md = (home / "artifacts" / "evaluation_report").glob("*/report.md")
    text = next(md).read_text()
    for t in tasks:
        assert t in text
    episodes = pd.read_json(next((home / "artifacts" / "evaluation_report").glob("*/episodes.jsonl")), lines=True)
    assert {split_of(s) for s in episodes["seed"]} == {"eval"}
    assert set(episodes["policy"]) == {"sft", "dpo"}


def test_mlflow_has_a_run_per_stage(run):
    _, home = run
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("dpo-driver")
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags.get("stage") for r in runs}
    assert stages == {"sft", "rollouts", "pairs", "dpo", "evaluation"}
    for r in runs:
        assert r.info.status == "FINISHED"
        assert "git_commit" in r.data.tags and "dagster_run_id" in r.data.tags
    # Every evaluated DPO adapter is registered; `champion` moves only on a "promote" decision.
    [version] = client.search_model_versions("name='dpo-driver-policy'")
    decision = next(r for r in runs if r.data.tags["stage"] == "evaluation").data.tags["decision"]
    champion = client.get_registered_model("dpo-driver-policy").aliases.get("champion")
    assert (str(champion) == str(version.version)) == (decision == "promote")
