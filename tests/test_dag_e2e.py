"""The whole DAG, for real: tiny-random model, real MiniWoB++ in headless Chromium, real TRL, MLflow, Dagster."""

from pathlib import Path

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
from dpo_assets.schedules import improvement_run_config
from dpo_driver.actions import parse_action
from dpo_driver.tasks import BAND, VALIDATION_OFFSET, split_of
from dpo_driver.registry import MODEL_NAME, promote
from resources import ArtifactStore, MLflowTracker, PolicyModel, TaskSuite, TrainingLauncher, EnvironmentResource
from resources.home import init_home

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("dpo_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("DPO_HOME", str(home))
    resources = {
        "policy_model": PolicyModel(cache_dir=str(home / "models")),
        "task_suite": TaskSuite(),
        "environment": EnvironmentResource(),
        "artifact_store": ArtifactStore(root=str(home / "artifacts")),
        "tracker": MLflowTracker(),  # the embedded default: SQLite + artifacts under $DPO_HOME
        "trainer": TrainingLauncher(),  # the embedded default: a Pipes subprocess
    }
    init_home(home, home / "dagster")  # as scripts/run_pipeline.sh does on a new home
    with dg.instance_for_test(temp_dir=str(home / "dagster")) as instance:
        result = dg.materialize(ASSETS + CHECKS, resources=resources, run_config=preset("tiny"), instance=instance)
        # Round 2: promote round 1's adapter by hand, then refresh everything after SFT.
        tracker = MLflowTracker().tracker()
        promote(tracker, MODEL_NAME, 1, reason="e2e test: force a champion")
        # Round 2 also trains with the demo anchor, through the same Pipes job as production.
        config2 = improvement_run_config(preset("tiny"))
        config2["ops"]["dpo_adapter"]["config"]["anchor_weight"] = 1.0
        config2["ops"]["preference_pairs"]["config"]["expert_fallback"] = True  # and with the expert's pairs where nothing succeeded
        config2["ops"]["rollout_trajectories"]["config"]["expert_starts"] = True  # and the policy's episodes from the expert's states there
        round2 = dg.materialize(ASSETS + CHECKS, resources=resources, run_config=config2, instance=instance,
                                selection=dg.AssetSelection.assets(*ASSETS[1:]))
        yield result, home, round2
    mp.undo()


def test_whole_dag_materializes(run):
    result, *_ = run
    assert result.success
    mats = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert mats == {"sft_adapter", "rollout_trajectories", "preference_pairs", "dpo_adapter", "evaluation_report"}


def test_trajectories_record_every_step(run):
    result, *_ = run
    eps = result.output_for_node("rollout_trajectories")
    cfg = preset("tiny")
    suite = cfg["resources"]["task_suite"]["config"]
    k = cfg["ops"]["rollout_trajectories"]["config"]["samples_per_seed"]
    # The training seeds, then the pair-validation seeds (their pairs held out of DPO), K samples each.
    assert eps["split"].value_counts().to_dict() == {"train": len(suite["tasks"]) * suite["rollout_seeds"] * k,
                                                     "validation": len(suite["tasks"]) * suite["pair_validation_seeds"] * k}
    assert (eps[eps["split"] == "validation"]["seed"] >= BAND + VALIDATION_OFFSET).all()
    assert set(eps["task"]) == set(suite["tasks"])
    assert {split_of(s) for s in eps["seed"]} == {"rollout"}
    for ep in eps.to_dict("records"):
        assert ep["num_steps"] == len(ep["steps"]) >= 1
        for st in ep["steps"]:
            assert st["prompt"].startswith("Task: ") and isinstance(st["output"], str)
            assert {"action", "valid", "reward", "done", "seconds"} <= set(st)
        assert ep["steps"][-1]["done"] or ep["truncated"]


def test_pairs_are_well_formed_and_load_with_datasets(run):
    result, home, _ = run
    pairs = result.output_for_node("preference_pairs")
    assert len(pairs) > 0
    assert (pairs["chosen"] != pairs["rejected"]).all()
    assert (pairs["margin"] >= preset("tiny")["ops"]["preference_pairs"]["config"]["min_margin"]).all()
    assert all(parse_action(c) for c in pairs["chosen"])
    assert not pairs.duplicated(["prompt", "chosen", "rejected"]).any()
    path = home / "artifacts" / "preference_pairs" / result.run_id / "pairs.jsonl"
    ds = load_dataset("json", data_files=str(path), split="train")
    train, held = pairs[pairs["split"] == "train"], pairs[pairs["split"] == "validation"]
    assert len(ds) == len(train) and {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    # Held-out pairs: from the pair-validation seeds only, on prompts DPO never trains on.
    assert (held["seed"] >= BAND + VALIDATION_OFFSET).all() and (train["seed"] < BAND + VALIDATION_OFFSET).all()
    assert set(held["prompt"]).isdisjoint(train["prompt"])


def test_adapters_load_with_peft(run):
    result, *_ = run
    sft, dpo = result.output_for_node("sft_adapter"), result.output_for_node("dpo_adapter")
    assert dpo.sft_adapter_dir == sft.adapter_dir != dpo.adapter_dir
    assert dpo.start_adapter_dir == sft.adapter_dir  # round 1: no champion yet, DPO continues SFT
    for a in (sft, dpo):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(a.base_model), a.adapter_dir)
        assert any("lora_" in n for n, _ in model.named_parameters())


def test_report_has_a_row_per_task_and_a_decision(run):
    result, home, _ = run
    value = result.output_for_node("evaluation_report")
    assert value.decision in {"promote", "keep previous", "needs review"}
    tasks = preset("tiny")["resources"]["task_suite"]["config"]["tasks"]
    assert set(tasks) <= set(value.summary["per_task"])
    report_dir = home / "artifacts" / "evaluation_report" / result.run_id
    text = (report_dir / "report.md").read_text()
    for t in tasks:
        assert t in text
    episodes = pd.read_json(report_dir / "episodes.jsonl", lines=True)
    assert {split_of(s) for s in episodes["seed"]} == {"eval"}
    assert set(episodes["policy"]) == {"sft", "dpo"}


def test_mlflow_has_a_run_per_stage(run):
    _, home, _ = run
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("dpo-driver")
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags.get("stage") for r in runs}
    assert stages == {"sft", "rollouts", "pairs", "dpo", "evaluation"}
    for r in runs:
        assert r.info.status == "FINISHED"
        assert "git_commit" in r.data.tags and "dagster_run_id" in r.data.tags
    # Every evaluated DPO adapter is registered; `champion` moves only on a "promote" decision.
    round1 = min(client.search_model_versions("name='dpo-driver-policy'"), key=lambda v: int(v.version))
    decision = min((r for r in runs if r.data.tags["stage"] == "evaluation"), key=lambda r: r.info.start_time).data.tags["decision"]
    assert round1.tags["decision"] == decision


def test_second_round_acts_with_the_champion(run):
    """After a promotion, rollouts act with the champion, DPO continues it, evaluation compares against it."""
    result, home, round2 = run
    assert round2.success
    round1_dpo = result.output_for_node("dpo_adapter")
    eps = round2.output_for_node("rollout_trajectories")
    [acted] = set(eps["adapter_dir"])  # the champion as registered in MLflow: round 1's DPO adapter
    weights = "adapter_model.safetensors"
    assert (Path(acted) / weights).read_bytes() == (Path(round1_dpo.adapter_dir) / weights).read_bytes()
    assert set(eps["policy"]) == {"champion"}
    dpo2 = round2.output_for_node("dpo_adapter")
    assert dpo2.start_adapter_dir == acted and dpo2.sft_adapter_dir == round1_dpo.sft_adapter_dir
    # The anchored job trained on a copy of the very demos SFT trained on, and logged its SFT loss.
    job = Path(dpo2.adapter_dir).parent
    demos = result.output_for_node("sft_adapter").demos_path
    assert (job / "anchor.jsonl").read_text() == Path(demos).read_text()
    [mat] = [e for e in round2.get_asset_materialization_events() if e.asset_key.to_user_string() == "dpo_adapter"]
    assert mat.materialization.metadata["anchor_nll"].value > 0
    assert not (Path(round1_dpo.adapter_dir).parent / "anchor.jsonl").exists()  # round 1: anchor off, no copy
    report = round2.output_for_node("evaluation_report")
    assert set(report.summary["mean"]) == {"sft", "champion", "dpo"}
    assert "dpo_minus_champion_points" in report.summary
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    versions = client.search_model_versions("name='dpo-driver-policy'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    champion = client.get_registered_model("dpo-driver-policy").aliases["champion"]
    assert str(champion) == ("2" if report.decision == "promote" else "1")


def test_expert_fallback_pairs_only_at_seeds_no_rollout_solved(run):
    result, _, round2 = run
    eps = round2.output_for_node("rollout_trajectories")
    pairs = round2.output_for_node("preference_pairs")
    expert = pairs[pairs["chosen_episode"] == "expert"]
    assert len(expert) > 0 and set(expert["split"]) == {"train"}
    assert (result.output_for_node("preference_pairs")["chosen_episode"] != "expert").all()  # round 1: off (the preset)
    training = eps[eps["split"] != "validation"]
    solved = set(map(tuple, training[training["success"].astype(bool)][["task", "seed"]].values.tolist()))
    assert not {(t, int(s)) for t, s in zip(expert["task"], expert["seed"])} & solved
    assert all(parse_action(c) and parse_action(r) and c != r for c, r in zip(expert["chosen"], expert["rejected"]))
    [mat] = [e for e in round2.get_asset_materialization_events() if e.asset_key.to_user_string() == "preference_pairs"]
    assert mat.materialization.metadata["expert_pairs"].value == len(expert)


def test_expert_starts_play_from_the_experts_states_at_unsolved_seeds_only(run):
    result, _, round2 = run
    assert "expert_prefix" not in result.output_for_node("rollout_trajectories")  # round 1: off (the preset)
    eps = round2.output_for_node("rollout_trajectories")
    starts = eps[eps["expert_prefix"].notna()]
    assert len(starts) > 0 and set(starts["split"]) == {"train"}
    training = eps[(eps["split"] == "train") & eps["expert_prefix"].isna()]
    solved = set(map(tuple, training[training["success"].astype(bool)][["task", "seed"]].values.tolist()))
    assert not set(zip(starts["task"], starts["seed"].astype(int))) & solved
    [mat] = [e for e in round2.get_asset_materialization_events() if e.asset_key.to_user_string() == "rollout_trajectories"]
    assert mat.materialization.metadata["expert_start_episodes"].value == len(starts)
    prefix = dict(zip(starts["episode_id"], starts["expert_prefix"].astype(int)))
    pairs = round2.output_for_node("preference_pairs")
    for _, p in pairs[pairs["chosen_episode"].isin(prefix) | pairs["rejected_episode"].isin(prefix)].iterrows():
        # paired only with an episode of the same prefix, after it: the policy's own actions on both sides
        assert prefix.get(p["chosen_episode"]) == prefix.get(p["rejected_episode"]) and p["step"] >= prefix[p["chosen_episode"]]
