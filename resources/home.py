"""Where local state lives ($DPO_HOME, else ./.dpo_home) and its one-time, race-free initialisation.

    python -m resources.home init    # before the first runs on a new home (scripts/run_pipeline.sh does it)

Two runs started at once on a brand-new home both created Dagster's SQLite schema and one failed
("table secondary_indexes already exists"); MLflow's Alembic migrations race the same way.
`init_home` creates both stores once, under a file lock, and is a cheap no-op afterwards.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dpo_driver.io import dpo_home, file_lock

__all__ = ["dagster_home", "dpo_home", "init_home"]


def dagster_home() -> Path:
    """$DAGSTER_HOME, else $DPO_HOME/dagster (what scripts/run_pipeline.sh exports)."""
    return Path(os.environ.get("DAGSTER_HOME") or dpo_home() / "dagster").resolve()


def init_home(home: Path | None = None, dagster: Path | None = None, mlflow: bool = True) -> None:
    """Create the Dagster instance storage in `dagster` and (if `mlflow`) the MLflow SQLite store in
    `home`, both migrated; idempotent, and serialised across processes by `home/.init.lock`."""
    from dagster import DagsterInstance

    from dpo_driver.tracking import Tracker

    home = Path(home or dpo_home()).resolve()
    dagster = Path(dagster or dagster_home()).resolve()
    with file_lock(home / ".init.lock"):
        dagster.mkdir(parents=True, exist_ok=True)
        (dagster / "dagster.yaml").touch()  # an empty config = SQLite storage under `dagster`
        instance = DagsterInstance.from_config(str(dagster))
        try:
            # Storages are built lazily: touch each so its schema is created here, under the lock.
            instance.get_runs(limit=1)
            instance.event_log_storage.get_asset_records()
            instance.all_instigator_state()
        finally:
            instance.dispose()
        if mlflow:
            Tracker.local(home).client.search_experiments()  # creates and migrates home/mlflow.db


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["init"]:
        print("usage: python -m resources.home init   (creates $DAGSTER_HOME and $DPO_HOME/mlflow.db once)", file=sys.stderr)
        return 2
    init_home()
    print(f"initialised {dpo_home()} (Dagster instance {dagster_home()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
