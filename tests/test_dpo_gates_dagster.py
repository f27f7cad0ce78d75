"""The DPO gates as blocking Dagster checks: KL(policy || reference) and held-out preference accuracy.

Real TRL DPO on the tiny model through a real materialize; upstream assets are stand-ins. A failed
gate stops the evaluation (here a stand-in downstream asset) in the same run.
"""

import json

import dagster as dg
import pandas as pd
import pytest

from dpo_assets import definitions
from dpo_assets.checks import dpo_adapter_gates
from dpo_assets.dpo import dpo_adapter
from dpo_driver.io import atomic_write_jsonl
from dpo_driver.stages import SFTOutput
from dpo_driver.training import train_sft
from resources import ArtifactStore, EnvironmentResource, MLflowTracker
from test_dpo_gates import SFT, SFT_RECORDS, _pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(module_home):
    return module_home


@pytest.fixture(scope="module")
def sft_value(home):
    sft = train_sft("tiny-random", SFT_RECORDS, home / "sft", SFT)
    atomic_write_jsonl(home / "validation.jsonl", SFT_RECORDS)  # held-out states: the KL's prompts
    return SFTOutput(adapter_dir=str(sft.adapter_dir), base_model="tiny-random", model="tiny-random", num_examples=len(SFT_RECORDS),
                     mlflow_run_id="", demos_path="", validation_path=str(home / "validation.jsonl"))


def pairs_with(held_out: pd.DataFrame) -> pd.DataFrame:
    train = _pairs(range(1, 5)).assign(split="train")
    return pd.concat([train, held_out.assign(split="validation")], ignore_index=True)


def run_with(pairs: pd.DataFrame, sft_value: SFTOutput, home, learning_rate: float = 1e-3, **gates):
    @dg.asset(name="sft_adapter")
    def sft_stand_in() -> SFTOutput:
        return sft_value

    @dg.asset(name="preference_pairs")
    def pairs_stand_in() -> pd.DataFrame:
        return pairs

    @dg.asset(name="evaluation_report", deps=["dpo_adapter"])
    def evaluation_stand_in() -> None:
        pass

    resources = {**definitions.RESOURCES_BY_DEPLOYMENT["local"], "environment": EnvironmentResource(family="tooluse"),
                 "artifact_store": ArtifactStore(root=str(home / "artifacts")), "tracker": MLflowTracker()}
    config = {"ops": {"dpo_adapter": {"config": {"learning_rate": learning_rate, "num_train_epochs": 1.0, "max_steps": 0, "min_steps": 0,
                                                 "per_device_train_batch_size": 4, "max_length": 128}},
                      "dpo_adapter_gates": {"config": {"max_new_tokens": 8, **gates}}}}
    with dg.instance_for_test() as instance:
        result = dg.materialize([sft_stand_in, pairs_stand_in, dpo_adapter, dpo_adapter_gates, evaluation_stand_in], resources=resources,
                                run_config=config, instance=instance, raise_on_error=False)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    evaluated = "evaluation_report" in {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    return result, checks, evaluated


def test_good_pairs_pass_both_gates(sft_value, home):
    result, checks, evaluated = run_with(pairs_with(_pairs(range(5, 8))), sft_value, home)
    assert result.success and evaluated
    assert checks["dpo_adapter_kl"].passed and checks["dpo_adapter_preference_accuracy"].passed
    meta = checks["dpo_adapter_preference_accuracy"].metadata
    assert meta["pairs"].value == 12 and meta["preference_accuracy"].value >= 0.7
    # DPO trained on the train split only: the held-out pairs are beside the adapter, never in pairs.jsonl.
    adapter_dir = next(m for m in result.get_asset_materialization_events()
                       if m.asset_key.to_user_string() == "dpo_adapter").materialization.metadata["adapter_dir"].value
    trained_on = [json.loads(line)["pair_id"] for line in open(f"{adapter_dir}/../pairs.jsonl")]
    assert len(trained_on) == 16 and not set(trained_on) & set(_pairs(range(5, 8))["pair_id"])


def test_held_out_pairs_the_policy_disprefers_fail_the_accuracy_gate(sft_value, home):
    swapped = _pairs(range(5, 8))
    swapped[["chosen", "rejected"]] = swapped[["rejected", "chosen"]].to_numpy()
    result, checks, evaluated = run_with(pairs_with(swapped), sft_value, home)
    assert not result.success and not evaluated  # the evaluation never ran
    gate = checks["dpo_adapter_preference_accuracy"]
    assert not gate.passed and "< 70% (by" in gate.description


def test_a_policy_pushed_far_from_its_reference_fails_the_kl_gate(sft_value, home):
    # A learning rate 300x the good run's moves the policy ~20x further (KL ~0.05 vs ~0.003 per token);
    # a few steps of a tiny LoRA cannot reach the production 0.1, so the bound is tightened to 0.01.
    result, checks, evaluated = run_with(pairs_with(_pairs(range(5, 8))), sft_value, home, learning_rate=0.3, max_kl=0.01)
    assert not result.success and not evaluated
    gate = checks["dpo_adapter_kl"]
    assert not gate.passed and gate.metadata["kl_per_token"].value > 0.01
    assert "> 0.010 (by" in gate.description and "lower the DPO learning rate or raise beta" in gate.description
    good, _, _ = run_with(pairs_with(_pairs(range(5, 8))), sft_value, home, max_kl=0.01)
    assert good.success  # the same bound passes the policy trained at the normal rate
