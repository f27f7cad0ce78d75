"""The `io_manager` of each deployment: a value one run stores is loaded by a later run that shares
nothing with it but the store (own process, working directory, DAGSTER_HOME and DPO_HOME), as
production run containers share only DPO_IO_ROOT (`improvement_round` loads an earlier `sft_adapter`).

Run as a script, this module materializes its stand-in assets (no training):
    python tests/test_io_store.py local|prod upstream|downstream OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@dg.asset(name="sft_adapter")
def sft_stand_in() -> dict:
    return {"adapter_dir": "/nowhere/adapter", "num_examples": 6, "pid": os.getpid()}


@dg.asset(name="preference_pairs")
def pairs_stand_in() -> pd.DataFrame:
    return pd.DataFrame({"prompt": ["p1", "p2"], "chosen": ["a", "b"], "rejected": ["c", "d"], "margin": [0.5, 1.5]})


@dg.asset(name="round_stand_in")
def round_stand_in(sft_adapter: dict, preference_pairs: pd.DataFrame) -> dict:
    return {"sft": sft_adapter, "pairs": preference_pairs.to_dict(orient="list"), "pid": os.getpid()}


STAND_INS = [sft_stand_in, pairs_stand_in, round_stand_in]


def materialize(deployment: str, step: str) -> dict:
    """One run on the instance in $DAGSTER_HOME with the deployment's real io_manager."""
    from dpo_assets.definitions import RESOURCES_BY_DEPLOYMENT

    resources = {"io_manager": RESOURCES_BY_DEPLOYMENT[deployment]["io_manager"]}
    selection = ["sft_adapter", "preference_pairs"] if step == "upstream" else ["round_stand_in"]
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(STAND_INS, selection=selection, resources=resources, instance=instance)
        out = {"materialized": sorted(e.asset_key.to_user_string() for e in result.get_asset_materialization_events()),
               "instance": str(instance.root_directory), "cwd": os.getcwd(), "pid": os.getpid()}
        if step == "downstream":
            out["value"] = result.output_for_node("round_stand_in")
    return out


def run_in_fresh_process(tmp_path: Path, name: str, deployment: str, step: str, env: dict[str, str]) -> dict:
    work = tmp_path / name
    (work / "dagster").mkdir(parents=True)
    out = work / "out.json"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "DPO_DEPLOYMENT": deployment, "DAGSTER_HOME": str(work / "dagster"),
                "DPO_HOME": str(work / "home"), **env}
    proc = subprocess.run([sys.executable, str(Path(__file__)), deployment, step, str(out)], cwd=work, env=full_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("deployment", ["prod", "local"])
def test_a_later_run_loads_an_earlier_runs_value_through_the_shared_store(tmp_path, deployment):
    store = tmp_path / "shared-store"
    if deployment == "prod":  # only DPO_IO_ROOT is shared, each container has its own DPO_HOME
        shared = {"DPO_IO_ROOT": str(store)}
    else:  # local runs share $DPO_HOME (its io/ folder), not their Dagster instance
        shared = {"DPO_HOME": str(store)}
    first = run_in_fresh_process(tmp_path, "first", deployment, "upstream", shared)
    second = run_in_fresh_process(tmp_path, "second", deployment, "downstream", shared)

    assert first["materialized"] == ["preference_pairs", "sft_adapter"]
    assert second["materialized"] == ["round_stand_in"]  # the upstream assets were loaded, not recomputed
    assert first["instance"] != second["instance"] and first["cwd"] != second["cwd"] and first["pid"] != second["pid"]
    value = second["value"]
    assert value["sft"]["pid"] == first["pid"]  # the dict the first process stored
    assert value["pairs"]["margin"] == [0.5, 1.5] and value["pairs"]["prompt"] == ["p1", "p2"]
    store_root = store if deployment == "prod" else store / "io"
    assert {p.name for p in store_root.iterdir()} >= {"sft_adapter.pkl", "preference_pairs.pkl", "round_stand_in.pkl"}
    for name in ("first", "second"):  # nothing went to the per-instance default storage
        assert not (tmp_path / name / "dagster" / "storage" / "sft_adapter").exists()


def test_same_value_pickles_to_the_same_bytes_and_a_missing_value_names_the_asset(tmp_path, monkeypatch):
    from resources import PickleIOManager

    monkeypatch.setenv("DPO_HOME", str(tmp_path / "home"))

    @dg.asset(name="sft_adapter")
    def fixed() -> dict:
        return {"adapter_dir": "/nowhere", "metrics": {"loss": 0.25}, "frame": pd.DataFrame({"a": [1, 2]})}

    path = tmp_path / "home" / "io" / "sft_adapter.pkl"
    blobs = []
    for _ in range(2):
        dg.materialize([fixed], resources={"io_manager": PickleIOManager()})
        blobs.append(path.read_bytes())
    assert blobs[0] == blobs[1]
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no scratch file

    result = dg.materialize([sft_stand_in, pairs_stand_in, round_stand_in], selection=["round_stand_in"], raise_on_error=False,
                            resources={"io_manager": PickleIOManager(root=str(tmp_path / "empty"))})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "no stored value for asset preference_pairs" in str(failure.step_failure_data.error) or \
        "no stored value for asset sft_adapter" in str(failure.step_failure_data.error)


if __name__ == "__main__":
    deployment, step, out_path = sys.argv[1:4]
    Path(out_path).write_text(json.dumps(materialize(deployment, step)))
