from pathlib import Path

import dagster as dg
import pandas as pd

from dpo_assets._common import episode_logger, stage
from dpo_assets.configs import RolloutConfig
from dpo_driver.episode_traces import log_episode_traces
from dpo_driver.io import atomic_write_jsonl
from dpo_driver.pii import counts_metadata, scrub_records
from dpo_driver.policy import LMPolicy, Sampling
from dpo_driver.registry import acting_adapter
from dpo_driver.rollouts import run_episodes
from dpo_driver.stages import SFTOutput
from dpo_driver.traces import load_trace_jsonl
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
    tasks = task_suite.task_list(env)
    acting = acting_adapter(tracker.tracker(), sft_adapter.adapter_dir, policy_model.model,
                            dst=artifact_store.path_for("champion_adapter", context.run_id))
    context.log.info(f"rollouts act with {acting.label}: {acting.adapter_dir}")
    policy = LMPolicy(*policy_model.load(str(acting.adapter_dir)), env)
    sampling = Sampling(config.temperature, config.top_k, config.top_p, config.max_new_tokens or env.max_new_tokens, config.batch_size,
                        config.strategy)
    seeds = list(task_suite.plan().rollout)
    context.log.info(f"rollouts: {len(tasks)} tasks x {len(seeds)} seeds x K={config.samples_per_seed}")
    with stage(context, "rollouts", "rollout_trajectories", {**config.model_dump(), "tasks": tasks, "num_seeds": len(seeds),
                                                             "sft_run_id": sft_adapter.mlflow_run_id, "acting_policy": acting.label},
               tracker, artifact_store, env.name) as st:
        if config.traces_path:  # a team's logged episodes, checked line by line before anything is used
            episodes = load_trace_jsonl(Path(config.traces_path), parse=env.parse)
            context.log.info(f"{len(episodes)} episodes imported from {config.traces_path} instead of sampled rollouts")
        else:
            episodes = run_episodes(policy, env, tasks, seeds, config.samples_per_seed, sampling, config.max_steps,
                                    policy_name=acting.role, on_progress=episode_logger(context, "rollouts"))
        pii = {}
        if config.scrub_pii:  # before the episodes are stored as training data
            episodes, found = scrub_records(episodes)
            pii = counts_metadata(found)
        for ep in episodes:
            ep["adapter_dir"] = str(acting.adapter_dir)  # provenance: DPO continues from (and refers to) the policy that acted
        with st.files() as tmp:
            atomic_write_jsonl(tmp / "episodes.jsonl", episodes)
        frame = pd.DataFrame(episodes)
        gen = policy.stats
        metrics = {
            "episodes": len(frame), "env_errors": int(frame["env_error"].sum()),
            "success_rate": float(frame.loc[~frame["env_error"], "success"].mean()),
            "gen_seconds": gen.seconds, "gen_new_tokens": gen.new_tokens, "gen_tokens_per_second": gen.tokens_per_second,
        }
        st.run.log_metrics({**metrics, **pii})
        st.run.log_artifact(st.out / "episodes.jsonl")
        metrics["mlflow_traces"] = log_episode_traces(st.run, st.run.run_id, episodes, stage="rollouts")
    context.log.info(f"rollouts done: {metrics}")
    return st.result(frame, path=dg.MetadataValue.path(str(st.out / "episodes.jsonl")),
                     per_task=dg.MetadataValue.md(episode_summary(frame).to_markdown()), acting_policy=acting.label,
                     source=config.traces_path or "rollouts", **metrics, **pii)
