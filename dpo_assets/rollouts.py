import dagster as dg
import pandas as pd

from dpo_assets._common import episode_logger, stage
from dpo_assets.configs import RolloutConfig
from dpo_driver.episode_traces import log_episode_traces
from dpo_driver.io import atomic_write_jsonl
from dpo_driver.policy import LMPolicy, Sampling
from dpo_driver.registry import acting_adapter
from dpo_driver.rollouts import collect_rollouts
from dpo_driver.stages import SFTOutput
from resources import ArtifactStore, EnvironmentResource, MLflowTracker, PolicyModel, TaskSuite


def episode_summary(episodes: pd.DataFrame) -> pd.DataFrame:
    ok = episodes[~episodes["env_error"]]
    return ok.groupby("task").agg(episodes=("success", "size"), success=("success", "mean"), mean_steps=("num_steps", "mean"))


@dg.asset(group_name="dpo_loop", kinds={"pytorch", "mlflow"})
def rollout_trajectories(
    context: dg.AssetExecutionContext,
    config: RolloutConfig,
    sft_adapter: SFTOutput,
    policy_model: PolicyModel,
    task_suite: TaskSuite,
    environment: EnvironmentResource,
    artifact_store: ArtifactStore,
    tracker: MLflowTracker,
) -> dg.MaterializeResult[pd.DataFrame]:
    """K sampled episodes per training seed of the current champion (else the SFT policy) in the environment."""
    env = environment.get()
    tasks, plan = task_suite.task_list(env), task_suite.plan()
    seeds = list(plan.rollout)
    acting = acting_adapter(tracker.tracker(), sft_adapter.adapter_dir, policy_model.model,
                            dst=artifact_store.path_for("champion_adapter", context.run_id))
    source = f"logged traces {config.traces_path}" if config.traces_path else f"{len(tasks)} tasks x {len(seeds)} seeds x K={config.samples_per_seed}"
    context.log.info(f"rollouts act with {acting.label} ({acting.adapter_dir}): {source}")
    sampling = Sampling(config.temperature, config.top_k, config.top_p, config.max_new_tokens or env.max_new_tokens, config.batch_size,
                        config.strategy, config.constrained)
    with stage(context, "rollouts", "rollout_trajectories", {**config.model_dump(), "tasks": tasks, "num_seeds": len(seeds), "pair_validation_seeds": len(plan.pair_validation),
                                                             "sft_run_id": sft_adapter.mlflow_run_id, "acting_policy": acting.label},
               tracker, artifact_store, env.name) as st:
        episodes, metrics = collect_rollouts(lambda: LMPolicy(*policy_model.load(str(acting.adapter_dir)), env), env, tasks, seeds,
                                             config.samples_per_seed, sampling, config.max_steps, acting.role, str(acting.adapter_dir),
                                             config.traces_path, config.scrub_pii, episode_logger(context, "rollouts"),
                                             validation_seeds=list(plan.pair_validation), expert_starts=config.expert_starts)
        with st.files() as tmp:
            atomic_write_jsonl(tmp / "episodes.jsonl", episodes)
        st.run.log_metrics(metrics)
        st.run.log_artifact(st.out / "episodes.jsonl")
        metrics["mlflow_traces"] = log_episode_traces(st.run, st.run.run_id, episodes, stage="rollouts")
    context.log.info(f"rollouts done: {metrics}")
    frame = pd.DataFrame(episodes)
    return st.result(frame, path=dg.MetadataValue.path(str(st.out / "episodes.jsonl")),
                     per_task=dg.MetadataValue.md(episode_summary(frame).to_markdown()), acting_policy=acting.label,
                     source=config.traces_path or "rollouts", **metrics)
