"""Named run configs: `tiny` (plumbing, CI) and `default` (the README run on the embedded model).

They live in `dpo_driver/runconfig.py` (Dagster-free, so `sensors/` can use them without importing
`dpo_assets`); this module keeps the import path and the command that prints one:

    python -m dpo_assets.presets tiny      # run config for `dagster asset materialize --config-json`
"""

from __future__ import annotations

from dpo_driver.runconfig import DEFAULT, PRESETS, TINY, op_configs, preset

__all__ = ["DEFAULT", "PRESETS", "TINY", "op_configs", "preset"]

if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(preset(sys.argv[1] if len(sys.argv) > 1 else "default")))
