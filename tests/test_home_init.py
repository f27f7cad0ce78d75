"""First run on a brand-new home: two initialisers at once both succeed and leave working stores."""

import os
import subprocess
import sys
from pathlib import Path

from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRun
from mlflow import MlflowClient

INIT = "from resources.home import init_home; init_home()"


def _twice_at_once(code: str, home: Path, timeout: int) -> None:
    """Run `code` in two processes started together on the empty `home`; both must succeed."""
    env = {**os.environ, "DPO_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]


def test_two_concurrent_inits_on_an_empty_home_both_succeed_and_the_stores_work(tmp_path):
    home, dagster = tmp_path / "home", tmp_path / "home" / "dagster"
    _twice_at_once(INIT, home, timeout=120)

    instance = DagsterInstance.from_config(str(dagster))
    try:
        instance.add_run(DagsterRun(job_name="smoke", run_id="0" * 8 + "-0000-0000-0000-" + "0" * 12))
        assert [r.job_name for r in instance.get_runs()] == ["smoke"]
    finally:
        instance.dispose()
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    client.create_experiment("smoke", artifact_location=(home / "mlartifacts").as_uri())
    assert client.get_experiment_by_name("smoke") is not None


def test_init_is_idempotent(tmp_path, monkeypatch):
    from resources.home import init_home

    monkeypatch.setenv("DPO_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    init_home()
    before = (tmp_path / "mlflow.db").stat().st_size
    init_home()
    assert (tmp_path / "mlflow.db").stat().st_size == before
    assert (tmp_path / "dagster" / "dagster.yaml").is_file()


# What `dpo-driver run` / scripts/run_pipeline.sh do: initialise the home, then run a job (here a
# one-asset job that also opens an MLflow run, standing in for the DAG's stores) on that instance.
RUN = """
import dagster as dg
from resources.home import init_home
from dpo_driver.tracking import Tracker
from dpo_driver.io import dpo_home
init_home()

@dg.asset
def smoke() -> int:
    with Tracker.local(dpo_home()).stage_run("smoke", {"x": 1}):
        return 1

assert dg.materialize([smoke], instance=dg.DagsterInstance.get()).success
"""


def test_two_runs_started_at_once_on_an_empty_home_both_succeed(tmp_path):
    home, dagster = tmp_path / "home", tmp_path / "home" / "dagster"
    _twice_at_once(RUN, home, timeout=300)
    instance = DagsterInstance.from_config(str(dagster))
    try:
        assert sorted(r.status.value for r in instance.get_runs()) == ["SUCCESS", "SUCCESS"]
    finally:
        instance.dispose()
    assert len(MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").search_experiments()])) == 2
