"""The `io_manager` resource: where values passed between assets (dicts, DataFrames) are stored.

Dagster's default IO manager pickles them under $DAGSTER_HOME/storage, a folder private to one
instance: production run containers do not share it, so a run that loads an upstream asset
materialized by an earlier run (`improvement_round` loads `sft_adapter`) would find nothing.
`PickleIOManager` stores one pickle per asset key under `root`, which every deployment sets:

* local: empty = $DPO_HOME/io (resolved when a run starts, so each run's DPO_HOME counts);
* prod: `DPO_IO_ROOT`, a folder on the volume every container mounts at the same path
  (/srv/dpo-driver/io in docker/), or an fsspec URL (`s3://bucket/dpo-io`; needs that fsspec
  backend, e.g. s3fs, installed in the Dagster image).

Values are written with a fixed pickle protocol, atomically on local and mounted filesystems
(temp file + rename: a run loading the value sees the old one or the new one, never half).
A newer materialization of an asset replaces the stored value, as with Dagster's default.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import dagster as dg
from dagster import UPathIOManager

from dpo_driver.io import atomic_write_bytes, dpo_home

PICKLE_PROTOCOL = 4  # fixed (Dagster's own choice too): the same value pickles to the same bytes on 3.11


def default_io_root() -> Path:
    return dpo_home() / "io"


class PickleStore(UPathIOManager):
    """One `<root>/<asset key path>.pkl` per asset; local paths or any fsspec URL."""

    extension = ".pkl"

    def __init__(self, root: str):
        from upath import UPath

        self.root = root
        super().__init__(base_path=UPath(root))

    @staticmethod
    def _is_local(path) -> bool:
        return getattr(path, "protocol", "") in ("", "file", "local")

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path) -> None:
        data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
        if self._is_local(path):
            atomic_write_bytes(Path(path.path), data)
        else:  # object stores replace a key whole on put
            path.write_bytes(data)

    def load_from_path(self, context: dg.InputContext, path) -> Any:
        if not self.path_exists(path):
            raise FileNotFoundError(
                f"no stored value for asset {context.asset_key.to_user_string() if context.has_asset_key else '?'} "
                f"at {path}: materialize it first (in this deployment, with io_manager root {self.root!r})")
        return pickle.loads(path.read_bytes())


class PickleIOManager(dg.ConfigurableIOManagerFactory):
    """Values between assets as pickles under `root` (empty = $DPO_HOME/io), shared by every run that sees `root`."""

    root: str = ""  # a folder or an fsspec URL; empty = $DPO_HOME/io

    def create_io_manager(self, context: dg.InitResourceContext) -> PickleStore:
        return PickleStore(self.root or str(default_io_root()))
