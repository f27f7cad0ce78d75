"""The GE gates as blocking Dagster checks: bad pairs stop DPO in the same run; good pairs let it train.

Real Great Expectations, real Dagster materialize, real Chromium (for the eval prompts), real
TRL on the tiny model. Upstream assets are stand-ins that return the pairs under test.
"""


import dagster as dg
import pandas as pd
import pytest

from dpo_assets import definitions
from dpo_assets.checks import preference_pairs_gates
from dpo_assets.dpo import dpo_adapter
from dpo_driver.model import resolve_model
from dpo_driver.pairs import PAIR_COLUMNS, pair_id
from dpo_driver.rollouts import first_prompts
from dpo_driver.stages import SFTOutput
from dpo_driver.families.miniwob import MiniWoB
from dpo_driver.tasks import seeds_for
from dpo_driver.training import SFTParams, train_sft
from resources import ArtifactStore, MLflowTracker, TaskSuite

pytestmark = pytest.mark.slow

SUITE = TaskSuite(tasks=["click-button"], demo_seeds=2, rollout_seeds=20, eval_seeds=3)
NAMES = ["okay", "Cancel", "Submit", "Next", "yes", "no"]


def good_pairs() -> pd.DataFrame:
    rows = []
    for i, seed in enumerate(seeds_for("rollout", 6)):
        name, other = NAMES[i], NAMES[(i + 1) % len(NAMES)]
        prompt = f'Task: Click on the "{name}" button.\nElements:\n1. button "{other}"\n2. button "{name}"\nNext action:'
        chosen, rejected = f'click button "{name}"', f'click button "{other}"'
        rows.append({"pair_id": pair_id(prompt, chosen, rejected), "task": "click-button", "seed": seed, "step": 0,
                     "prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_score": 1.0,
                     "rejected_score": -0.1, "margin": 1.1, "chosen_episode": f"e{i}a", "rejected_episode": f"e{i}b"})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


@pytest.fixture(scope="module")
def home(module_home):
    return module_home


@pytest.fixture(scope="module")
def sft_value(home):
    base = resolve_model("tiny-random")
    records = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
               for p, c in zip(good_pairs()["prompt"], good_pairs()["chosen"])]
    result = train_sft(base, records, home / "sft", SFTParams(max_steps=0, min_steps=0, num_train_epochs=1, per_device_train_batch_size=3, max_length=128))
    return SFTOutput(adapter_dir=str(result.adapter_dir), base_model=base, model="tiny-random", num_examples=6,
                     mlflow_run_id="none", demos_path="", validation_path="")


@pytest.fixture(scope="module")
def eval_prompt():
    return first_prompts(MiniWoB(), ["click-button"], list(SUITE.plan().eval))[("click-button", SUITE.plan().eval[0])]


def run_with(pairs: pd.DataFrame, sft_value: SFTOutput, home, **gate_config):
    @dg.asset(name="sft_adapter")
    def sft_stand_in() -> SFTOutput:
        return sft_value

    @dg.asset(name="preference_pairs")
    def pairs_stand_in(context: dg.AssetExecutionContext, tracker: MLflowTracker) -> pd.DataFrame:
        with tracker.tracker().stage_run("pairs", {"stand_in": True}) as run:
            pass  # a real MLflow run, so the gates have somewhere to log their verdicts
        context.add_output_metadata({"mlflow_run_id": run.run_id})
        return pairs

    resources = {**definitions.RESOURCES_BY_DEPLOYMENT["local"], "task_suite": SUITE,
                 "artifact_store": ArtifactStore(root=str(home / "artifacts"))}
    config = {"ops": {"preference_pairs_gates": {"config": {"min_pairs": 3, **gate_config}},
                      "dpo_adapter": {"config": {"max_steps": 0, "num_train_epochs": 1.0, "per_device_train_batch_size": 2, "max_length": 128}}}}
    with dg.instance_for_test() as instance:
        result = dg.materialize([sft_stand_in, pairs_stand_in, preference_pairs_gates, dpo_adapter], resources=resources,
                                run_config=config, instance=instance, raise_on_error=False)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    trained = "dpo_adapter" in {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    return result, checks, trained


def test_good_pairs_pass_every_gate_and_dpo_trains(sft_value, home):
    result, checks, trained = run_with(good_pairs(), sft_value, home)
    assert result.success and trained
    assert {n: c.passed for n, c in checks.items()} == {f"preference_pairs_{g}": True for g in
                                                       ("count", "margin", "decontamination", "format", "duplicates")}


def _bad(kind: str, eval_prompt: str) -> tuple[pd.DataFrame, str, dict]:
    df = good_pairs()
    if kind == "zero":
        return df.iloc[0:0], "count", {}
    if kind == "too_few":
        return df.iloc[:2], "count", {}
    if kind == "margin":
        df.loc[1, "margin"] = 0.1
        return df, "margin", {}
    if kind == "eval_seed":
        df.loc[2, "seed"] = SUITE.plan().eval[0]
        return df, "decontamination", {}
    if kind == "near_copy":
        df.loc[3, "prompt"] = eval_prompt.replace("Next action:", "Next action: ")
        return df, "decontamination", {}
    if kind == "empty_completion":
        df.loc[0, "rejected"] = ""
        return df, "format", {}
    if kind == "chosen_is_rejected":
        df.loc[4, "rejected"] = df.loc[4, "chosen"]
        return df, "format", {}
    if kind == "duplicates":
        return pd.concat([df, df.iloc[[5]]], ignore_index=True), "duplicates", {}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["zero", "too_few", "margin", "eval_seed", "near_copy", "empty_completion",
                                  "chosen_is_rejected", "duplicates"])
def test_each_bad_input_fails_its_gate_and_skips_dpo(kind, sft_value, home, eval_prompt):
    pairs, gate, extra = _bad(kind, eval_prompt)
    result, checks, trained = run_with(pairs, sft_value, home, **extra)
    assert not result.success and not trained
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert "preference_pairs_gates" in started and "dpo_adapter" not in started  # blocked, never ran
    check = checks[f"preference_pairs_{gate}"]
    assert not check.passed
    md = check.metadata
    assert md["failed_expectations"].value, "the check names what failed"
    client = MLflowTracker().tracker().client
    run_id = next(m for m in result.get_asset_materialization_events() if m.asset_key.to_user_string() == "preference_pairs")
    tags = client.get_run(run_id.materialization.metadata["mlflow_run_id"].value).data.tags
    assert tags[f"gate.{gate}"] == "FAIL"  # the verdict is logged to MLflow with the pairs
    if kind not in ("zero", "too_few"):
        offending = md["offending_rows"].value
        assert offending, "offending rows are listed"
        assert any(r.get("pair_id") in set(pairs["pair_id"]) for r in offending)
