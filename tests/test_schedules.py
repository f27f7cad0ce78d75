"""The improvement-round schedule: ticks with build_schedule_context on a temporary instance."""

from datetime import datetime, timezone

import dagster as dg
import pytest

from dpo_assets import definitions
from dpo_assets.presets import preset
from dpo_assets.schedules import (DEFAULT_CRON, build_improvement_schedule, improvement_round_schedule,
                                  improvement_run_config)

IMPROVEMENT = {"rollout_trajectories", "preference_pairs", "dpo_adapter", "evaluation_report"}
TICK = datetime(2026, 11, 24, 3, 0, tzinfo=timezone.utc)


@pytest.fixture
def instance(monkeypatch):
    monkeypatch.delenv("DPO_PRESET", raising=False)
    with dg.instance_for_test() as inst:
        yield inst


def test_schedule_is_off_by_default_on_a_job_without_sft():
    schedule = definitions.defs.resolve_schedule_def("improvement_round_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.cron_schedule == DEFAULT_CRON and schedule.job_name == "improvement_round"
    graph = definitions.defs.resolve_job_def("improvement_round").asset_layer.asset_graph
    assert {k.to_user_string() for k in graph.executable_asset_keys} == IMPROVEMENT


def test_cron_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DPO_IMPROVEMENT_CRON", "*/15 * * * *")
    assert build_improvement_schedule().cron_schedule == "*/15 * * * *"
    with pytest.raises(Exception, match="cron"):
        build_improvement_schedule(cron="every night")


def test_tick_before_any_sft_adapter_skips_and_says_what_to_run(instance):
    result = improvement_round_schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK))
    assert isinstance(result, dg.SkipReason) and "dpo_loop" in result.skip_message


DEFAULT_K = preset("default")["ops"]["rollout_trajectories"]["config"]["samples_per_seed"]


def test_tick_requests_one_improvement_round_with_the_preset_config(instance):
    instance.report_runless_asset_event(dg.AssetMaterialization("sft_adapter"))
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK)
    request = improvement_round_schedule(context)
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == "improvement-2026-11-24T03:00+0000"
    assert set(request.run_config["ops"]) == {op for op in preset("default")["ops"] if not op.startswith("sft_adapter")}
    assert IMPROVEMENT <= set(request.run_config["ops"])
    assert request.run_config["ops"]["preference_pairs_gates"] == preset("default")["ops"]["preference_pairs_gates"]
    assert request.run_config["ops"]["rollout_trajectories"]["config"]["samples_per_seed"] == DEFAULT_K
    assert request.run_config["resources"] == preset("default")["resources"]
    assert request.tags == {"dpo/trigger": "schedule"}
    assert dg.validate_run_config(definitions.defs.resolve_job_def("improvement_round"), request.run_config)
    again = improvement_round_schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK))
    assert again.run_key == request.run_key  # re-evaluating a tick cannot launch a second run


def test_preset_is_chosen_by_environment(instance, monkeypatch):
    monkeypatch.setenv("DPO_PRESET", "tiny")
    instance.report_runless_asset_event(dg.AssetMaterialization("sft_adapter"))
    request = improvement_round_schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK))
    assert request.run_config["resources"]["policy_model"]["config"]["model"] == "tiny-random"


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_improvement_run_config_scales_samples_and_drops_sft(factor):
    base = preset("default")
    config = improvement_run_config(base, samples_factor=factor)
    assert config["ops"]["rollout_trajectories"]["config"]["samples_per_seed"] == DEFAULT_K * factor
    assert "sft_adapter" not in config["ops"] and "sft_adapter" in base["ops"]  # base left untouched
    no_k = improvement_run_config({"ops": {}}, samples_factor=factor)  # K unset: the RolloutConfig default (4)
    assert no_k["ops"]["rollout_trajectories"]["config"]["samples_per_seed"] == 4 * factor
