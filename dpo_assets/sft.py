from dataclasses import asdict

import dagster as dg

from dpo_assets._common import checkpoint_dir, numeric, stage
from dpo_assets.configs import SFTAdapterConfig
from dpo_driver.demos import training_demos
from dpo_driver.io import atomic_write_jsonl
from dpo_driver.stages import SFTOutput
from dpo_driver.train import JobSpec
from dpo_driver.policy import LMPolicy
from dpo_driver.validation import log_rounds, round_message, sft_rounds_in, validate_policy, validation_seeds
from resources import ArtifactStore, EnvironmentResource, MLflowTracker, PolicyModel, TaskSuite, TrainingLauncher


# pool "gpu" (also dpo_adapter): two trainings never share a GPU; limit in docker/dagster.yaml.
@dg.asset(group_name="dpo_loop", kinds={"pytorch", "mlflow"}, pool="gpu")
def sft_adapter(
    context: dg.AssetExecutionContext,
    config: SFTAdapterConfig,
    policy_model: PolicyModel,
    task_suite: TaskSuite,
    environment: EnvironmentResource,
    artifact_store: ArtifactStore,
    tracker: MLflowTracker,
    trainer: TrainingLauncher,
) -> dg.MaterializeResult[SFTOutput]:
    """LoRA SFT (TRL SFTTrainer) of the base model on golden demonstrations."""
    env = environment.get()  # fails fast (unknown family, no browser), before any output exists
    tasks, base, plan = task_suite.task_list(env), policy_model.resolve(), task_suite.plan()  # resolve: fails fast on an unknown model
    data = training_demos(env, tasks, list(plan.demo), validation_seeds(task_suite.validation_seeds, plan.demo), config.demos_path or None,
                          config.scrub_pii, on_episode=lambda t, s, ok: context.log.debug(f"demo {t} seed {s}: {'ok' if ok else 'expert failed'}"))
    context.log.info(f"{len(data.demos)} demo steps from {data.source}; training LoRA SFT on {base}")
    params = config.sft_params(load_in_4bit=policy_model.load_in_4bit, bf16=policy_model.train_bf16())
    max_new_tokens = config.validation_max_new_tokens or env.max_new_tokens
    # Each round's measure is the SFT gate's (same states, greedy, same token budget): the gate reuses the last one.
    check = lambda adapter: validate_policy(LMPolicy(*policy_model.load(str(adapter)), env), data.validation, env.parse,  # noqa: E731
                                            max_new_tokens)
    with stage(context, "sft", "sft_adapter", {**config.model_dump(), "base_model": policy_model.model, "tasks": tasks},
               tracker, artifact_store, env.name) as st:
        with st.files() as tmp:
            atomic_write_jsonl(tmp / "demos.jsonl", data.demos)
            atomic_write_jsonl(tmp / "validation.jsonl", data.validation)
            spec = JobSpec("sft", base, "demos.jsonl", "adapter", params=asdict(params),
                           scratch_dir=checkpoint_dir(context, artifact_store, "sft_adapter"))
            rounds = sft_rounds_in(tmp, spec, lambda path: trainer.train(context, path), check, params.until_expert_match,
                                   params.max_rounds, on_round=lambda rd: context.log.info(round_message(rd, params.until_expert_match)))
        log_rounds(st.run, rounds)
        metrics = {**rounds[-1].result["metrics"], **data.pii, "sft_rounds": len(rounds)}
        st.run.log_metrics(metrics)
        st.run.log_artifact(st.out / "demos.jsonl")
        st.run.log_artifacts(st.out / "adapter", "adapter")
    value = SFTOutput(adapter_dir=str(st.out / "adapter"), base_model=base, model=policy_model.model, num_examples=rounds[-1].result["num_examples"],
                      mlflow_run_id=st.run.run_id, demos_path=str(st.out / "demos.jsonl"), validation_path=str(st.out / "validation.jsonl"),
                      validation=rounds[-1].validation, validation_max_new_tokens=max_new_tokens)
    return st.result(value, adapter_dir=dg.MetadataValue.path(value.adapter_dir), base_model=base, demo_steps=len(data.demos),
                     demo_source=data.source, validation_states=len(data.validation), **numeric(metrics))
