import json
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import pandas as pd

from dpo_assets._common import episode_logger
from dpo_assets.configs import EvaluationConfig
from dpo_driver.episode_traces import log_episode_traces
from dpo_driver.io import atomic_dir, atomic_write_jsonl, atomic_write_text
from dpo_driver.modelcard import build_model_card, pair_counts, publish_model_card
from dpo_driver.policy import LMPolicy, Sampling
from dpo_driver.registry import champion, record_evaluation
from dpo_driver.report import build_report, drop_crashed_items, plot_report, retention, with_retention
from dpo_driver.rollouts import run_episodes
from dpo_driver.ui import embed_png_markdown
from resources import ArtifactStore, EnvironmentResource, MLflowTracker, PolicyModel, TaskSuite


@dg.asset(group_name="dpo_loop", kinds={"pytorch", "mlflow"})
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    sft_adapter: dict,
    dpo_adapter: dict,
    policy_model: PolicyModel,
    task_suite: TaskSuite,
    environment: EnvironmentResource,
    artifact_store: ArtifactStore,
    tracker: MLflowTracker,
) -> dg.MaterializeResult:
    """SFT vs DPO success per task on held-out seeds (greedy), with intervals, a plot and a decision.

    The decision compares DPO with the policy it started from: the SFT adapter in the first
    round, the champion in later ones (then evaluated as a third arm). Every DPO adapter is
    registered in MLflow; the `champion` alias moves only on "promote".
    """
    env = environment.get()
    tasks = task_suite.task_list(env)
    plan = task_suite.plan()  # asserts eval seeds are disjoint from demo and rollout seeds
    greedy = Sampling(temperature=0.0, max_new_tokens=config.max_new_tokens or env.max_new_tokens, batch_size=config.batch_size)
    start = dpo_adapter.get("start_adapter_dir", sft_adapter["adapter_dir"])
    arms = {"sft": sft_adapter["adapter_dir"], "dpo": dpo_adapter["adapter_dir"]}
    if start != sft_adapter["adapter_dir"]:
        arms["champion"] = start
    baseline = "champion" if "champion" in arms else "sft"
    held_out_tasks = task_suite.retention_list(env)  # capability retention: tasks the round never trained on
    episodes, kept_eps = [], []
    for name, adapter_dir in arms.items():
        model, tokenizer = policy_model.load(adapter_dir)
        policy = LMPolicy(model, tokenizer, env)
        episodes += run_episodes(policy, env, tasks, list(plan.eval), 1, greedy, config.max_steps,
                                 policy_name=name, on_progress=episode_logger(context, f"eval {name}"))
        if held_out_tasks and name in (baseline, "dpo"):  # the loaded model plays the retention set too
            kept_eps += run_episodes(policy, env, held_out_tasks, list(plan.eval), 1, greedy, config.max_steps,
                                     policy_name=name, on_progress=episode_logger(context, f"retention {name}"))
        del model, policy
    frame, dropped = drop_crashed_items(pd.DataFrame(episodes))
    if dropped:
        context.log.warning(f"{dropped} (task, seed) dropped from evaluation after browser errors")
    report = build_report(frame, baseline=baseline, candidate="dpo", confidence=config.confidence, n_boot=config.n_boot)
    report.summary["environment"] = env.name
    kept = None
    if held_out_tasks:
        kept = retention(drop_crashed_items(pd.DataFrame(kept_eps))[0], baseline, "dpo", config.min_retention, config.confidence,
                         config.n_boot)
        decision = with_retention(report.decision, kept)
        report.summary.update(decision=decision, retention=asdict(kept) | {"ratio": kept.ratio, "passed": kept.passed})
        report.markdown += f"\n\nCapability {kept.line()}: {'kept' if kept.passed else '**not kept**'}."
        if decision != report.decision:
            report.markdown += f" Decision: **{decision}** (was {report.decision})."
        report.decision = decision
    out = artifact_store.path_for("evaluation_report", context.run_id)
    with tracker.tracker().stage_run("evaluation", {**config.model_dump(), "tasks": tasks, "eval_seeds": len(plan.eval), "environment": env.name,
                                                    "sft_run_id": sft_adapter["mlflow_run_id"],
                                                    "dpo_run_id": dpo_adapter["mlflow_run_id"]},
                                     tags={"dagster_run_id": context.run_id, "decision": report.decision,
                                           "environment": env.name}) as run:
        with atomic_dir(out) as tmp:
            atomic_write_jsonl(tmp / "episodes.jsonl", frame.to_dict("records"))
            if kept_eps:
                atomic_write_jsonl(tmp / "retention_episodes.jsonl", kept_eps)
            atomic_write_text(tmp / "report.md", report.markdown + "\n")
            atomic_write_text(tmp / "report.json", json.dumps(report.summary, indent=2) + "\n")
            plot_report(report, tmp / "success_by_task.png")
        run.log_metrics({k: v for k, v in report.summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.log_artifacts(out, "report")
        traces = log_episode_traces(run, run.run_id, frame.to_dict("records"), stage="evaluation")  # browsable per step in MLflow
    diff_key = f"dpo_minus_{baseline}_points"
    reason = (f"evaluation {run.run_id}: dpo - {baseline} = {report.summary[diff_key]:+.1f} points "
              f"[{report.summary['diff_ci_low_points']:+.1f}, {report.summary['diff_ci_high_points']:+.1f}]")
    version = record_evaluation(tracker.tracker(), dpo_adapter["mlflow_run_id"], report.decision, reason=reason,
                                base_model=dpo_adapter["model"], tags={"evaluation_run_id": run.run_id, "dagster_run_id": context.run_id})
    # The blocking checks this run evaluated (pairs, rollouts, SFT): all passed, or this asset would not run.
    checks = context.instance.get_records_for_run(context.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    gates = {c.check_name: c.passed for c in (r.event_log_entry.dagster_event.event_specific_data for r in checks)}
    best = champion(tracker.tracker(), version.name)
    card = build_model_card(
        Path(dpo_adapter["adapter_dir"]), base_model=dpo_adapter["model"], model_name=version.name, version=version.version,
        decision=report.decision, reason=reason, report_markdown=report.markdown,
        pairs_by_task=pair_counts(Path(dpo_adapter["adapter_dir"]).parent / "pairs.jsonl"), start_policy=start,
        sft_examples=sft_adapter.get("num_examples"), gates=gates,
        runs={"dagster run": context.run_id, "MLflow DPO run": dpo_adapter["mlflow_run_id"], "MLflow evaluation run": run.run_id,
              "MLflow SFT run": sft_adapter["mlflow_run_id"],
              "champion after this evaluation": "none" if best is None else f"v{best.version}"},
        environment=env.name)
    card_path = publish_model_card(tracker.tracker(), version, card, out / "model_card")
    context.log.info(f"evaluation report: {out / 'report.md'}\n{report.markdown}")
    return dg.MaterializeResult(
        value={"report_dir": str(out), "decision": report.decision, "summary": report.summary, "environment": env.name,
               "eval_seeds": sorted({int(s) for s in frame["seed"]})},
        metadata={
            "environment": env.name,
            "report": dg.MetadataValue.md(report.markdown),
            "decision": report.decision,
            "baseline": baseline,
            "model_version": str(version.version),
            "champion": report.decision == "promote",
            "report_dir": dg.MetadataValue.path(str(out)),
            "plot": dg.MetadataValue.md(embed_png_markdown(out / "success_by_task.png", "success by task")),
            "plot_path": dg.MetadataValue.path(str(out / "success_by_task.png")),
            "mlflow_traces": traces,
            "model_card": dg.MetadataValue.path(str(card_path)),
            "mlflow_run_id": run.run_id,
        },
    )
