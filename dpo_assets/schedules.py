"""Improvement rounds: rollouts -> pairs -> DPO -> evaluation on a cron, reusing the last SFT adapter.

Off until switched on (UI toggle, or `dagster schedule start improvement_round_schedule`).
DPO_IMPROVEMENT_CRON (default nightly 03:00) and DPO_IMPROVEMENT_TZ (default UTC) set when;
DPO_PRESET (default "default") picks the preset whose config the runs use.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

import dagster as dg

from dpo_assets.dpo import dpo_adapter
from dpo_assets.evaluation import evaluation_report
from dpo_assets.pairs import preference_pairs
from dpo_assets.rollouts import rollout_trajectories
from dpo_assets.sft import sft_adapter
# The run-config helpers live in dpo_driver.runconfig, where sensors/ use them too; re-exported here.
from dpo_driver.runconfig import TRIGGER_TAG, improvement_run_config, preset, preset_name

__all__ = ["DEFAULT_CRON", "IMPROVEMENT_ASSETS", "TRIGGER_TAG", "build_improvement_schedule", "improvement_round",
           "improvement_round_schedule", "improvement_run_config", "preset_name"]

IMPROVEMENT_ASSETS = (rollout_trajectories, preference_pairs, dpo_adapter, evaluation_report)
DEFAULT_CRON = "0 3 * * *"

improvement_round = dg.define_asset_job(
    "improvement_round", selection=dg.AssetSelection.assets(*IMPROVEMENT_ASSETS),
    description="One improvement round from the last SFT adapter (and the champion): rollouts, pairs, DPO, evaluation.")


def build_improvement_schedule(cron: str | None = None, tz: str | None = None) -> dg.ScheduleDefinition:
    @dg.schedule(name="improvement_round_schedule", job=improvement_round,
                 cron_schedule=cron or os.environ.get("DPO_IMPROVEMENT_CRON", DEFAULT_CRON),
                 execution_timezone=tz or os.environ.get("DPO_IMPROVEMENT_TZ", "UTC"),
                 default_status=dg.DefaultScheduleStatus.STOPPED)
    def improvement_round_schedule(context: dg.ScheduleEvaluationContext):
        """Refresh rollouts -> pairs -> DPO -> evaluation; skips until sft_adapter exists."""
        if context.instance.get_latest_materialization_event(sft_adapter.key) is None:
            return dg.SkipReason("sft_adapter was never materialized: run the whole loop once (job dpo_loop) first")
        when = context.scheduled_execution_time or datetime.now(timezone.utc)
        return dg.RunRequest(run_key=f"improvement-{when:%Y-%m-%dT%H:%M%z}",  # one run per tick, even on re-evaluation
                             run_config=improvement_run_config(preset(preset_name())),
                             tags={TRIGGER_TAG: "schedule"})

    return improvement_round_schedule


improvement_round_schedule = build_improvement_schedule()
