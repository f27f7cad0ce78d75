from pathlib import Path

import dagster as dg
import pandas as pd

from dpo_assets._common import episode_logger, numeric, stage
from dpo_assets.configs import EvaluationConfig
from dpo_driver.episode_traces import log_episode_traces
from dpo_driver.modelcard import build_model_card, pair_counts, publish_model_card
from dpo_driver.policy import LMPolicy, Sampling
from dpo_driver.registry import champion, record_evaluation
from dpo_driver.report import EvalReport, promotion_decision, write_evaluation
from dpo_driver.rollouts import evaluate_arms
from dpo_driver.stages import DPOOutput, EvaluationOutput, SFTOutput, evaluation_arms
from dpo_driver.ui import embed_png_markdown
from resources import ArtifactStore, EnvironmentResource, MLflowTracker, PolicyModel, TaskSuite


@dg.asset(group_name="dpo_loop", kinds={"pytorch", "mlflow"})
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    sft_adapter: SFTOutput,
    dpo_adapter: DPOOutput,
    policy_model: PolicyModel,
    task_suite: TaskSuite,
    environment: EnvironmentResource,
    artifact_store: ArtifactStore,
    tracker: MLflowTracker,
) -> dg.MaterializeResult[EvaluationOutput]:
    """SFT vs DPO success per task on held-out seeds (greedy), with intervals, a plot and a decision.

    The decision compares DPO with the policy it started from: the SFT adapter in the first
    round, the champion in later ones (then evaluated as a third arm). Every DPO adapter is
    registered in MLflow; the `champion` alias moves only on "promote".
    """
    env = environment.get()
    tasks, plan = task_suite.task_list(env), task_suite.plan()  # plan: asserts eval seeds are disjoint from demo and rollout seeds
    greedy = Sampling(temperature=0.0, max_new_tokens=config.max_new_tokens or env.max_new_tokens, batch_size=config.batch_size,
                      constrained=config.constrained)
    arms = evaluation_arms(sft_adapter, dpo_adapter)
    # Capability retention: the compared arms also play tasks the round never trained on.
    episodes, kept_eps = evaluate_arms(lambda adapter: LMPolicy(*policy_model.load(adapter), env), arms.adapters, env, tasks, list(plan.eval),
                                       greedy, config.max_steps, task_suite.retention_list(env), (arms.baseline, "dpo"),
                                       on_progress=lambda stage: episode_logger(context, stage), num_envs=config.num_envs or None)
    outcome = promotion_decision(pd.DataFrame(episodes), pd.DataFrame(kept_eps) if kept_eps else None, arms.baseline, env.name,
                                 config.confidence, config.n_boot, config.min_retention)
    if outcome.dropped_items:
        context.log.warning(f"{outcome.dropped_items} (task, seed) dropped from evaluation after browser errors")
    report, frame = outcome.report, outcome.episodes
    with stage(context, "evaluation", "evaluation_report",
               {**config.model_dump(), "tasks": tasks, "eval_seeds": len(plan.eval), "sft_run_id": sft_adapter.mlflow_run_id,
                "dpo_run_id": dpo_adapter.mlflow_run_id}, tracker, artifact_store, env.name, tags={"decision": report.decision}) as st:
        with st.files() as tmp:
            write_evaluation(tmp, outcome, kept_eps)
        st.run.log_metrics(numeric(report.summary))
        st.run.log_artifacts(st.out, "report")
        traces = log_episode_traces(st.run, st.run.run_id, frame.to_dict("records"), stage="evaluation")  # browsable per step in MLflow
    version, card_path = register_and_publish(context, tracker, sft_adapter, dpo_adapter, report, arms.baseline, st.run.run_id, st.out, env.name)
    context.log.info(f"evaluation report: {st.out / 'report.md'}\n{report.markdown}")
    value = EvaluationOutput(report_dir=str(st.out), decision=report.decision, environment=env.name, summary=report.summary,
                             eval_seeds=sorted({int(s) for s in frame["seed"]}))
    return st.result(value, baseline=arms.baseline, model_version=str(version.version), mlflow_traces=traces,
                     **report_metadata(report, st.out, card_path))


def report_metadata(report: EvalReport, out: Path, card_path: Path) -> dict:
    """What the asset page shows: the report and its plot inline, the decision, links to the files."""
    return dict(report=dg.MetadataValue.md(report.markdown), decision=report.decision, champion=report.decision == "promote",
                report_dir=dg.MetadataValue.path(str(out)),
                plot=dg.MetadataValue.md(embed_png_markdown(out / "success_by_task.png", "success by task")),
                plot_path=dg.MetadataValue.path(str(out / "success_by_task.png")), model_card=dg.MetadataValue.path(str(card_path)))


def register_and_publish(context: dg.AssetExecutionContext, tracker: MLflowTracker, sft_adapter: SFTOutput, dpo_adapter: DPOOutput,
                         report: EvalReport, baseline: str, evaluation_run_id: str, out: Path, environment: str):
    """Register the DPO adapter with the decision (the `champion` alias moves only on "promote")
    and publish its model card, naming the gates this run passed; (model version, card path)."""
    diff_key = f"dpo_minus_{baseline}_points"
    reason = (f"evaluation {evaluation_run_id}: dpo - {baseline} = {report.summary[diff_key]:+.1f} points "
              f"[{report.summary['diff_ci_low_points']:+.1f}, {report.summary['diff_ci_high_points']:+.1f}]")
    version = record_evaluation(tracker.tracker(), dpo_adapter.mlflow_run_id, report.decision, reason=reason, base_model=dpo_adapter.model,
                                tags={"evaluation_run_id": evaluation_run_id, "dagster_run_id": context.run_id})
    # The blocking checks this run evaluated (pairs, rollouts, SFT): all passed, or this asset would not run.
    checks = context.instance.get_records_for_run(context.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    gates = {c.check_name: c.passed for c in (r.event_log_entry.dagster_event.event_specific_data for r in checks)}
    best = champion(tracker.tracker(), version.name)
    card = build_model_card(
        Path(dpo_adapter.adapter_dir), base_model=dpo_adapter.model, model_name=version.name, version=version.version,
        decision=report.decision, reason=reason, report_markdown=report.markdown,
        pairs_by_task=pair_counts(Path(dpo_adapter.adapter_dir).parent / "pairs.jsonl"), start_policy=dpo_adapter.start_adapter_dir,
        sft_examples=sft_adapter.num_examples, gates=gates,
        runs={"dagster run": context.run_id, "MLflow DPO run": dpo_adapter.mlflow_run_id, "MLflow evaluation run": evaluation_run_id,
              "MLflow SFT run": sft_adapter.mlflow_run_id,
              "champion after this evaluation": "none" if best is None else f"v{best.version}"},
        environment=environment)
    return version, publish_model_card(tracker.tracker(), version, card, out / "model_card")
