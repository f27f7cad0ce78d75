"""MLflow tracking for pipeline stages: one run per stage with code, config and environment.

Everything goes through an ``MlflowClient`` bound to this tracker's URI, never the fluent
``mlflow.*`` API: that API keeps a process-global tracking URI and active-run stack, so two
trackers in one process (two test stores, or two Dagster resources) would write into each other.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

KEY_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "dagster", "mlflow", "great_expectations",
                "miniwob", "selenium", "gymnasium", "numpy", "pandas")
# MLflow's param value limit (mlflow/utils/validation.py). MLflow 3.x truncates longer values
# with only a log warning, or raises if MLFLOW_TRUNCATE_LONG_VALUES=false; truncating here
# works either way and says where the full value went.
MAX_PARAM_VALUE = 6000
TRUNCATED = "...[truncated; full value in params.json]"
_PACKAGE_DIR = Path(__file__).resolve().parent


def _git(path: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:  # no git binary: same as "not a repo" for provenance purposes
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(path: str | Path = ".") -> dict:
    """Commit, branch and dirty flag of the repo containing ``path``.

    Outside a repo (or without git) the commit is the literal "unknown" and dirty is None,
    so an untracked run is visibly untracked rather than carrying a made-up sha.
    """
    path = Path(path)
    if _git(path, "rev-parse", "--is-inside-work-tree") != "true":
        return {"commit": "unknown", "branch": None, "dirty": None}
    status = _git(path, "status", "--porcelain")
    return {
        "commit": _git(path, "rev-parse", "HEAD") or "unknown",  # None before the first commit
        "branch": _git(path, "rev-parse", "--abbrev-ref", "HEAD"),  # "HEAD" when detached
        # Untracked files count: a new, uncommitted module changes what the run executed.
        "dirty": None if status is None else bool(status),
    }


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide results; absent packages are omitted."""
    versions = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


@functools.cache
def _torch_device() -> str | None:
    # Imports torch (seconds, once per process) only if installed. Note: naming a CUDA device
    # initialises CUDA in this process, which is fine in the stage process that trains.
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _bf16_native() -> bool | None:
    if importlib.util.find_spec("torch") is None:
        return None
    from dpo_driver.model import bf16_is_native

    return bf16_is_native()


def _memory_total_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: report unknown, not a guess
        return None


def system_fingerprint() -> dict:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": _memory_total_bytes(),
        "torch_device": _torch_device(),
        "bf16_native": _bf16_native(),  # "auto" precision trains and generates in bf16 exactly when this is true
        "hostname": socket.gethostname(),
    }


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    """{"lora": {"r": 8}} -> {"lora.r": "8"}; values stringified, over-long ones truncated."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten_params(value, prefix=f"{name}.")
            continue
        text = str(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
        flat[name] = text
    return flat


@dataclass
class StageRun:
    """Handle on one live MLflow run; every call goes to this run's store."""

    client: MlflowClient
    run_id: str

    def log_params(self, params: dict) -> None:
        # MlflowClient.log_batch splits into the store's per-call limits itself.
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flatten_params(params).items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_dict(self, obj: Any, filename: str) -> None:
        self.client.log_dict(self.run_id, obj, filename)


@dataclass
class Tracker:
    tracking_uri: str  # e.g. "sqlite:////abs/path/mlflow.db" or "http://mlflow:5000"
    experiment: str = "dpo-driver"
    artifact_location: str | None = None  # path or URI; used only when the experiment is created

    @classmethod
    def local(cls, home: Path, experiment: str = "dpo-driver") -> Tracker:
        """Embedded store: SQLite database home/mlflow.db, artifacts under home/mlartifacts."""
        home = Path(home).resolve()
        home.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{home / 'mlflow.db'}", experiment, str(home / "mlartifacts"))

    @functools.cached_property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def _artifact_uri(self) -> str | None:
        loc = self.artifact_location
        if loc is None or "://" in loc:
            return loc
        return Path(loc).resolve().as_uri()

    def experiment_id(self) -> str:
        """Id of ``self.experiment``, created with ``artifact_location`` if missing."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return self.client.create_experiment(self.experiment, artifact_location=self._artifact_uri())
            except MlflowException as e:
                # Another process created it between our lookup and create: use theirs.
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(self.experiment)
        if exp.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {self.experiment!r} in {self.tracking_uri} is deleted; "
                             "restore it (MlflowClient.restore_experiment) or configure another experiment name")
        wanted = self._artifact_uri()
        if wanted is not None and exp.artifact_location.rstrip("/") != wanted.rstrip("/"):
            raise ValueError(f"experiment {self.experiment!r} stores artifacts in {exp.artifact_location}, "
                             f"not the configured {wanted}; fix artifact_location or use another experiment name")
        return exp.experiment_id

    @contextmanager
    def stage_run(self, stage: str, params: dict, tags: dict | None = None,
                  parent_run_id: str | None = None) -> Iterator[StageRun]:
        """One MLflow run for a pipeline stage, ended FINISHED, or FAILED if the block raises.

        Tags: stage, git_commit/git_branch/git_dirty (of this package's checkout) and ``tags``.
        Logs ``params`` (flattened; full copy in params.json) and environment.json.
        """
        git = git_state(_PACKAGE_DIR)
        run_tags = {"stage": stage, "git_commit": git["commit"], "git_branch": git["branch"], "git_dirty": git["dirty"],
                    "mlflow.source.git.commit": git["commit"]}  # MLflow's own tag, so the UI shows it too
        if parent_run_id is not None:
            run_tags["mlflow.parentRunId"] = parent_run_id  # MLflow's nesting tag
        run_tags |= tags or {}
        run = self.client.create_run(self.experiment_id(), tags={k: str(v) for k, v in run_tags.items()}, run_name=stage)
        handle = StageRun(self.client, run.info.run_id)
        try:
            handle.log_params(params)
            handle.log_dict(json.loads(json.dumps(params, default=str)), "params.json")  # Paths etc. as text
            handle.log_dict({"git": git, "packages": package_versions(), "system": system_fingerprint()},
                            "environment.json")
            yield handle
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self.client.set_terminated(handle.run_id, status)
            raise
        self.client.set_terminated(handle.run_id, "FINISHED")

    def find_runs(self, stage: str | None = None) -> list[Run]:
        """Runs of this experiment (newest first), optionally only those tagged with ``stage``."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        if stage is not None and "'" in stage:
            raise ValueError(f"stage {stage!r} contains a quote, which MLflow's filter syntax cannot take")
        query = "" if stage is None else f"tags.stage = '{stage}'"
        runs, token = [], None
        while True:
            page = self.client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"],
                                           page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs
