import dagster as dg

from dpo_driver.tracking import Tracker
from resources.home import dpo_home


class MLflowTracker(dg.ConfigurableResource):
    """MLflow tracking: a local SQLite store by default, any tracking URI in production."""

    tracking_uri: str = ""  # empty = sqlite:///$DPO_HOME/mlflow.db with artifacts in $DPO_HOME/mlartifacts
    experiment: str = "dpo-driver"
    artifact_location: str = ""  # for a new experiment; empty = the tracking server's default

    def tracker(self) -> Tracker:
        if self.tracking_uri:
            return Tracker(self.tracking_uri, self.experiment, self.artifact_location or None)
        return Tracker.local(dpo_home(), experiment=self.experiment)
