"""The one place that wires assets, checks, jobs, sensors and resources together."""

import os

import dagster as dg

from dpo_assets.checks import CHECKS
from dpo_assets.dpo import dpo_adapter
from dpo_assets.evaluation import evaluation_report
from dpo_assets.pairs import preference_pairs
from dpo_assets.presets import preset
from dpo_assets.rollouts import rollout_trajectories
from dpo_assets.schedules import improvement_round, improvement_round_schedule
from dpo_assets.sft import sft_adapter
from resources import ArtifactStore, EnvironmentResource, MLflowTracker, PickleIOManager, PolicyModel, TaskSuite, TrainingLauncher
from sensors import new_demos_sensor, regression_sensor

ASSETS = [sft_adapter, rollout_trajectories, preference_pairs, dpo_adapter, evaluation_report]

# Same keys in every deployment (a test asserts it); values differ only in where things live.
RESOURCES_BY_DEPLOYMENT = {
    "local": {
        "policy_model": PolicyModel(),
        "task_suite": TaskSuite(),
        "environment": EnvironmentResource(),
        "artifact_store": ArtifactStore(),
        "tracker": MLflowTracker(),
        "trainer": TrainingLauncher(),  # `python -m dpo_driver.train` as a Pipes subprocess, on this machine
        "io_manager": PickleIOManager(),  # values between assets: $DPO_HOME/io, shared by every local run
    },
    "prod": {
        "policy_model": PolicyModel(model=dg.EnvVar("DPO_BASE_MODEL"), cache_dir=dg.EnvVar("DPO_MODEL_CACHE")),
        "task_suite": TaskSuite(),
        "environment": EnvironmentResource(),
        "artifact_store": ArtifactStore(root=dg.EnvVar("DPO_ARTIFACT_ROOT")),
        "tracker": MLflowTracker(tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI")),
        # The training image in a container that gets the GPUs; one at a time via the "gpu" pool (docker/dagster.yaml).
        "trainer": TrainingLauncher(mode="docker", image=dg.EnvVar("DPO_TRAIN_IMAGE"), gpus="all"),
        # Run containers share no DAGSTER_HOME: values between assets go to one store every run sees.
        "io_manager": PickleIOManager(root=dg.EnvVar("DPO_IO_ROOT")),
    },
}

deployment = os.environ.get("DPO_DEPLOYMENT", "local")
if deployment not in RESOURCES_BY_DEPLOYMENT:
    raise ValueError(f"DPO_DEPLOYMENT={deployment!r}; expected one of {sorted(RESOURCES_BY_DEPLOYMENT)}")

dpo_loop = dg.define_asset_job("dpo_loop", selection=dg.AssetSelection.assets(*ASSETS), config=preset("default"),
                               description="The whole loop on the embedded default model (README run).")
dpo_loop_tiny = dg.define_asset_job("dpo_loop_tiny", selection=dg.AssetSelection.assets(*ASSETS), config=preset("tiny"),
                                    description="The whole loop on the tiny-random model: plumbing check in about a minute.")

# Each step runs in its own process (a crashed step cannot take the run down), forked from a server
# that imported this module once: a spawned step paid ~12 s importing Dagster, Great Expectations,
# MLflow and torch before it started (~2 min of the README run's 20).
EXECUTOR = dg.multiprocess_executor.configured({"start_method": {"forkserver": {"preload_modules": ["dpo_assets.definitions"]}}})

defs = dg.Definitions(
    assets=ASSETS,
    executor=EXECUTOR,
    asset_checks=CHECKS,
    jobs=[dpo_loop, dpo_loop_tiny, improvement_round],
    schedules=[improvement_round_schedule],
    sensors=[new_demos_sensor, regression_sensor],
    resources=RESOURCES_BY_DEPLOYMENT[deployment],
)
