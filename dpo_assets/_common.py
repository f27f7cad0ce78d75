"""Helpers shared by the asset bodies: the stage scaffold and progress lines for the run log.

(Training progress arrives through Dagster Pipes from `python -m dpo_driver.train`.)"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import dagster as dg

from dpo_driver.io import atomic_dir
from dpo_driver.tracking import StageRun
from dpo_driver.training import scratch_dir_for
from resources import ArtifactStore, MLflowTracker


@dataclass
class Stage:
    """One stage's MLflow run and its output folder, written atomically."""

    run: StageRun
    out: Path
    environment: str | None

    @contextmanager
    def files(self) -> Iterator[Path]:
        """A scratch folder that becomes `out` only if the block succeeds: no half-written output."""
        with atomic_dir(self.out) as tmp:
            yield tmp

    def result(self, value, **metadata) -> dg.MaterializeResult:
        """The asset's value, with the environment and the MLflow run in its metadata."""
        env = {"environment": self.environment} if self.environment else {}
        return dg.MaterializeResult(value=value, metadata={**env, **metadata, "mlflow_run_id": self.run.run_id})


@contextmanager
def stage(context: dg.AssetExecutionContext, name: str, asset: str, params: dict, tracker: MLflowTracker,
          artifact_store: ArtifactStore, environment: str | None = None, tags: dict | None = None) -> Iterator[Stage]:
    """The scaffold every stage shares: an MLflow stage run tagged with the Dagster run (and the
    environment family), ended FAILED if the body raises, and the asset's output folder."""
    env = {"environment": environment} if environment else {}
    with tracker.tracker().stage_run(name, {**params, **env}, tags={"dagster_run_id": context.run_id, **env, **(tags or {})}) as run:
        yield Stage(run, artifact_store.path_for(asset, context.run_id), environment)


def checkpoint_dir(context: dg.OpExecutionContext, artifact_store: ArtifactStore, asset: str) -> str:
    """Where a training stage keeps its resumable checkpoints: keyed by the *root* run, so a
    step retry, a run retry and a re-execution (all share the root) resume from the last complete
    checkpoint. `training._train_in_scratch` resumes only when the job's fingerprint (data and
    params) is the same, and drops the folder on success."""
    root = context.dagster_run.root_run_id or context.run_id
    return str(scratch_dir_for(artifact_store.path_for(asset, root)))


def numeric(metrics: dict) -> dict[str, float]:
    """The numbers of a metrics dict, as floats (Dagster metadata and MLflow take no strings there)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def episode_logger(context: dg.AssetExecutionContext, stage: str, every: int = 10):
    def on_progress(p: dict):
        if p["done"] % every == 0 or p["done"] == p["total"]:
            context.log.info(
                f"{stage}: {p['done']}/{p['total']} episodes ({p['episodes_per_second']:.2f}/s), "
                f"task {p['task']}, success so far {p['success_so_far']:.0%}"
            )

    return on_progress
