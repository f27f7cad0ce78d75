import dagster as dg
import pandas as pd

from dpo_assets._common import numeric, stage
from dpo_assets.configs import PairsConfig
from dpo_driver.dpo_gates import train_and_validation_pairs
from dpo_driver.eto import with_expert_fallback
from dpo_driver.io import atomic_write_jsonl
from dpo_driver.pairs import build_preference_pairs, pair_yield, to_dpo_records
from resources import ArtifactStore, EnvironmentResource, MLflowTracker


@dg.asset(group_name="dpo_loop", kinds={"pandas", "mlflow"})
def preference_pairs(
    context: dg.AssetExecutionContext,
    config: PairsConfig,
    rollout_trajectories: pd.DataFrame,
    environment: EnvironmentResource,
    artifact_store: ArtifactStore,
    tracker: MLflowTracker,
) -> dg.MaterializeResult[pd.DataFrame]:
    """Success vs failure from the same state: scored, margin-filtered, deduplicated (TRL preference JSONL)."""
    env = environment.get()
    episodes = rollout_trajectories.to_dict("records")
    train, held_out = train_and_validation_pairs(
        episodes, lambda eps: build_preference_pairs(eps, config.pair_params(), config.score_weights(env), parse=env.parse),
        config.validation_fraction)
    training = [e for e in episodes if e.get("split") != "validation"]
    stats = pair_yield(training, train)
    if config.expert_fallback:  # training seeds only: the held-out pairs stay the policy's own
        train, counts = with_expert_fallback(train, training, env, config.max_pairs_per_prompt)
        stats.update(counts)
    pairs = pd.concat([train.assign(split="train"), held_out.assign(split="validation")], ignore_index=True)
    # The policy the pairs were sampled from: DPO starts from it and uses it as the reference.
    acted = sorted(set(rollout_trajectories.get("adapter_dir", pd.Series(dtype=str)).dropna()))
    if len(acted) > 1:
        raise ValueError(f"rollout_trajectories mixes episodes of several policies: {acted}")
    pairs["policy_adapter"] = acted[0] if acted else None
    with stage(context, "pairs", "preference_pairs", config.model_dump(), tracker, artifact_store, env.name) as st:
        with st.files() as tmp:
            atomic_write_jsonl(tmp / "pairs.jsonl", to_dpo_records(train))
            atomic_write_jsonl(tmp / "validation_pairs.jsonl", to_dpo_records(held_out))
        st.run.log_metrics({**stats, "validation_pairs": len(held_out), "mean_margin": float(pairs["margin"].mean()) if len(pairs) else 0.0})
        st.run.log_artifact(st.out / "pairs.jsonl")
    context.log.info(f"{len(train)} training pairs (+{len(held_out)} held out) from {stats['prompts_with_both']}/{stats['prompts']} "
                     "training prompts with both outcomes")
    per_task = pairs.groupby("task").size().rename("pairs").to_frame() if len(pairs) else pd.DataFrame({"pairs": []})
    return st.result(pairs, path=dg.MetadataValue.path(str(st.out / "pairs.jsonl")), per_task=dg.MetadataValue.md(per_task.to_markdown()),
                     **numeric(stats), validation_pairs=len(held_out))
