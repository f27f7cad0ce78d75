"""Where local state lives: $DPO_HOME, else ./.dpo_home (MLflow db, artifacts, model cache)."""

import os
from pathlib import Path


def dpo_home() -> Path:
    return Path(os.environ.get("DPO_HOME") or Path.cwd() / ".dpo_home").resolve()
