from pathlib import Path

import dagster as dg

from resources.home import dpo_home


class ArtifactStore(dg.ConfigurableResource):
    """Filesystem root for asset outputs (adapters, trajectories, pairs, reports).

    Assets never build paths themselves, so a containerised run only has to mount this root.
    """

    root: str = ""  # empty = $DPO_HOME/artifacts

    def path_for(self, asset: str, run_id: str) -> Path:
        base = Path(self.root) if self.root else dpo_home() / "artifacts"
        return base / asset / run_id
