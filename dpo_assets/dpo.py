from dataclasses import asdict
from pathlib import Path

import dagster as dg
import pandas as pd

from dpo_assets.configs import DPOAdapterConfig
from dpo_assets._common import checkpoint_dir, numeric, stage
from dpo_driver.io import atomic_write_jsonl, read_jsonl
from dpo_driver.pairs import to_dpo_records
from dpo_driver.stages import DPOOutput, SFTOutput
from dpo_driver.train import JobSpec
from dpo_driver.training import DPOParams
from resources import ArtifactStore, MLflowTracker, PolicyModel, TrainingLauncher


@dg.asset(group_name="dpo_loop", kinds={"pytorch", "mlflow"}, pool="gpu")
def dpo_adapter(
    context: dg.AssetExecutionContext,
    config: DPOAdapterConfig,
    sft_adapter: SFTOutput,
    preference_pairs: pd.DataFrame,
    policy_model: PolicyModel,
    artifact_store: ArtifactStore,
    tracker: MLflowTracker,
    trainer: TrainingLauncher,
) -> dg.MaterializeResult[DPOOutput]:
    """TRL DPO continuing the policy that acted in the rollouts (the SFT adapter in the first round,
    the champion after that); that policy, frozen, is the reference."""
    if preference_pairs.empty:
        raise ValueError("preference_pairs is empty: no prompt had both a success and a failure; "
                         "raise rollout samples_per_seed or temperature, or add rollout seeds")
    train = preference_pairs[preference_pairs["split"] != "validation"] if "split" in preference_pairs else preference_pairs
    held_out = to_dpo_records(preference_pairs[preference_pairs["split"] == "validation"]) if "split" in preference_pairs else []
    records = to_dpo_records(train)
    params = DPOParams(**config.model_dump(), load_in_4bit=policy_model.load_in_4bit, bf16=policy_model.train_bf16())
    acted = preference_pairs.get("policy_adapter", pd.Series(dtype=object)).dropna().unique()
    start = str(acted[0]) if len(acted) else sft_adapter.adapter_dir
    context.log.info(f"DPO on {len(records)} pairs, starting from and referring to {start}")
    with stage(context, "dpo", "dpo_adapter", {**config.model_dump(), "pairs": len(records), "start_adapter": start,
                                               "sft_run_id": sft_adapter.mlflow_run_id}, tracker, artifact_store) as st:
        with st.files() as tmp:
            atomic_write_jsonl(tmp / "pairs.jsonl", records)
            atomic_write_jsonl(tmp / "validation_pairs.jsonl", held_out)  # never trained on: the preference-accuracy gate's pairs
            anchor = ""
            if params.anchor_weight > 0:  # beside the spec, so a container job carries its own copy
                if not sft_adapter.demos_path:
                    raise ValueError("dpo_adapter.anchor_weight > 0 needs sft_adapter's demos, and this sft_adapter recorded none")
                atomic_write_jsonl(tmp / "anchor.jsonl", read_jsonl(Path(sft_adapter.demos_path)))
                anchor = "anchor.jsonl"
            spec = JobSpec("dpo", sft_adapter.base_model, "pairs.jsonl", "adapter", params=asdict(params), sft_adapter_dir=start,
                           anchor_records=anchor, scratch_dir=checkpoint_dir(context, artifact_store, "dpo_adapter"))
            result = trainer.train(context, spec.write(tmp / "dpo_job.json"))
        st.run.log_metrics(result["metrics"])
        st.run.log_artifacts(st.out / "adapter", "adapter")
    value = DPOOutput(adapter_dir=str(st.out / "adapter"), base_model=sft_adapter.base_model, model=sft_adapter.model,
                      sft_adapter_dir=sft_adapter.adapter_dir, start_adapter_dir=start, num_examples=result["num_examples"],
                      mlflow_run_id=st.run.run_id, validation_path=sft_adapter.validation_path,
                      validation_pairs_path=str(st.out / "validation_pairs.jsonl"))
    return st.result(value, adapter_dir=dg.MetadataValue.path(value.adapter_dir), reference_policy=f"frozen copy of {start}",
                     pairs=len(records), validation_pairs=len(held_out), **numeric(result["metrics"]))
