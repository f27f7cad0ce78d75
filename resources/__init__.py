"""One ConfigurableResource per external system; deployments pick variants in dpo_assets.definitions."""

from resources.artifact_store import ArtifactStore
from resources.policy_model import PolicyModel
from resources.task_suite import TaskSuite
from resources.tracker import MLflowTracker
from resources.trainer import TrainingLauncher
from resources.web_env import WebEnvironment

__all__ = ["ArtifactStore", "MLflowTracker", "PolicyModel", "TaskSuite", "TrainingLauncher", "WebEnvironment"]
