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


def test_each_arm_is_loaded_once_and_only_the_compared_arms_play_the_retention_set():
    from dpo_driver.families.tooluse import ToolUse
    from dpo_driver.policy import RandomPolicy, Sampling
    from dpo_driver.rollouts import evaluate_arms

    env, loaded = ToolUse(), []

    def load(adapter):
        loaded.append(adapter)
        return RandomPolicy(env)

    suite, kept = evaluate_arms(load, {"sft": "/s", "dpo": "/d", "champion": "/c"}, env, ["calculator"], [2_000_000, 2_000_001],
                                Sampling(temperature=0.0), retention_tasks=["lookup"], retention_policies=("champion", "dpo"))
    assert loaded == ["/s", "/d", "/c"]
    assert sorted((e["policy"], e["seed"]) for e in suite) == sorted((p, s) for p in ("sft", "dpo", "champion") for s in (2_000_000, 2_000_001))
    assert {e["task"] for e in suite} == {"calculator"} and {e["task"] for e in kept} == {"lookup"}
    assert sorted({e["policy"] for e in kept}) == ["champion", "dpo"] and len(kept) == 4


def test_evaluation_plays_as_many_sessions_at_once_as_asked():
    """`num_envs` reaches the loop: one session at a time asks for one prompt per generate,
    the family's default (ToolUse: 32 sessions) for all of a task's seeds at once."""
    from dpo_driver.families.tooluse import ToolUse
    from dpo_driver.policy import RandomPolicy, Sampling
    from dpo_driver.rollouts import evaluate_arms

    env, batches = ToolUse(), []

    class Counting(RandomPolicy):
        def propose(self, prompts, *args, **kwargs):
            batches.append(len(prompts))
            return super().propose(prompts, *args, **kwargs)

    seeds = [2_000_000 + i for i in range(6)]
    for num_envs in (1, None):
        batches.clear()
        suite, _ = evaluate_arms(lambda _: Counting(env), {"sft": "/s"}, env, ["calculator"], seeds, Sampling(temperature=0.0),
                                 num_envs=num_envs)
        assert len(suite) == 6
        assert max(batches) == (1 if num_envs == 1 else 6)
