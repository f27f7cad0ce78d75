"""One definition per option: where a Dagster Config field and a plain dataclass field share a
name, they share a default (the Config reads it from the dataclass, dpo_driver.options.default)."""

import dataclasses

import pytest

from dpo_assets.checks import PairGateConfig
from dpo_assets.configs import DPOAdapterConfig, EvaluationConfig, PairsConfig, RolloutConfig, SFTAdapterConfig
from dpo_driver.options import default
from dpo_driver.pairs import PairParams, ScoreWeights
from dpo_driver.policy import Sampling
from dpo_driver.quality import PairGateThresholds
from dpo_driver.training import DPOParams, SFTParams

# Config fields whose meaning differs on purpose from the dataclass field of the same name.
DIFFERENT_ON_PURPOSE = {
    ("RolloutConfig", "max_new_tokens"): "0 = the environment family's own answer length",
    ("EvaluationConfig", "max_new_tokens"): "0 = the environment family's own answer length",
    ("EvaluationConfig", "batch_size"): None,  # same value, checked below
}

LAYERS = [(SFTAdapterConfig, SFTParams), (DPOAdapterConfig, DPOParams), (RolloutConfig, Sampling), (EvaluationConfig, Sampling),
          (PairsConfig, PairParams), (PairsConfig, ScoreWeights), (PairGateConfig, PairGateThresholds)]


@pytest.mark.parametrize("config, params", LAYERS, ids=[f"{c.__name__}-{p.__name__}" for c, p in LAYERS])
def test_shared_options_have_one_default(config, params):
    shared = {f.name for f in dataclasses.fields(params)} & set(config.model_fields)
    assert shared, "no shared options: the pairing is wrong"
    for name in sorted(shared):
        if DIFFERENT_ON_PURPOSE.get((config.__name__, name)):
            continue
        assert config.model_fields[name].default == default(params, name), f"{config.__name__}.{name} != {params.__name__}.{name}"


def test_every_config_field_is_documented():
    for config in (SFTAdapterConfig, DPOAdapterConfig, RolloutConfig, EvaluationConfig, PairsConfig, PairGateConfig):
        for name, field in config.model_fields.items():
            assert field.description, f"{config.__name__}.{name} has no description"


def test_renamed_score_weight_reads_its_dataclass():
    assert PairsConfig.model_fields["success_weight"].default == default(ScoreWeights, "success")
    assert PairsConfig().score_weights(type("Env", (), {"reward_weight": 0.0})()) == ScoreWeights()


def test_default_names_a_missing_option():
    with pytest.raises(AttributeError, match="SFTParams has no option 'lora_rank'"):
        default(SFTParams, "lora_rank")
