"""Typed stage outputs and the evaluation's choice of arms (dpo_driver.stages)."""

import dataclasses

import pytest

from dpo_driver.stages import DPOOutput, SFTOutput, evaluation_arms

SFT = SFTOutput(adapter_dir="/a/sft/adapter", base_model="/m", model="tiny-random", num_examples=3, mlflow_run_id="r1",
                demos_path="/a/sft/demos.jsonl", validation_path="/a/sft/validation.jsonl")


def dpo(start: str) -> DPOOutput:
    return DPOOutput(adapter_dir="/a/dpo/adapter", base_model="/m", model="tiny-random", sft_adapter_dir=SFT.adapter_dir,
                     start_adapter_dir=start, num_examples=5, mlflow_run_id="r2", validation_path=SFT.validation_path,
                     validation_pairs_path="/a/dpo/validation_pairs.jsonl")


def test_round_one_compares_dpo_with_sft():
    arms = evaluation_arms(SFT, dpo(SFT.adapter_dir + "/"))  # the same folder, spelled with a trailing slash
    assert arms.adapters == {"sft": SFT.adapter_dir, "dpo": "/a/dpo/adapter"} and arms.baseline == "sft"


def test_a_later_round_also_plays_the_champion_and_is_judged_against_it():
    arms = evaluation_arms(SFT, dpo("/a/champion/adapter"))
    assert arms.adapters == {"sft": SFT.adapter_dir, "dpo": "/a/dpo/adapter", "champion": "/a/champion/adapter"}
    assert arms.baseline == "champion"


def test_outputs_are_frozen_and_name_every_field():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SFT.adapter_dir = "elsewhere"
    with pytest.raises(TypeError, match="validation_pairs_path"):
        DPOOutput(**{f.name: "" for f in dataclasses.fields(DPOOutput) if f.name != "validation_pairs_path"})
