"""One ConfigurableResource per external system; deployments pick variants in dpo_assets.definitions."""

from resources.artifact_store import ArtifactStore
from resources.environment import EnvironmentResource
from resources.io_manager import PickleIOManager
from resources.policy_model import PolicyModel
from resources.task_suite import TaskSuite
from resources.tracker import MLflowTracker
from resources.trainer import TrainingLauncher

__all__ = ["ArtifactStore", "EnvironmentResource", "MLflowTracker", "PickleIOManager", "PolicyModel", "TaskSuite", "TrainingLauncher"]
