import hashlib
import importlib.metadata
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from dpo_driver import tracking
from dpo_driver.tracking import KEY_PACKAGES, MAX_PARAM_VALUE, Tracker, git_state, package_versions, system_fingerprint


def test_local_store_is_a_sqlite_database_under_home(tmp_path):
    tracker = Tracker.local(tmp_path)
    assert tracker.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def run_by_id(tracker: Tracker, run_id: str):
    return MlflowClient(tracking_uri=tracker.tracking_uri).get_run(run_id)  # a separate client: read back from the store


def downloaded(tracker: Tracker, run_id: str, artifact: str, dst: Path) -> Path:
    return Path(MlflowClient(tracking_uri=tracker.tracking_uri).download_artifacts(run_id, artifact, str(dst)))


def test_runs_land_in_the_sqlite_database(make_tracker, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    tracker = make_tracker()
    with tracker.stage_run("sft", {"lr": 1e-4}) as run:
        pass
    home = Path(tracker.tracking_uri.removeprefix("sqlite:///")).parent
    with sqlite3.connect(home / "mlflow.db") as db:
        rows = db.execute("SELECT status FROM runs WHERE run_uuid = ?", (run.run_id,)).fetchall()
    assert rows == [("FINISHED",)]
    assert (home / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()  # no fallback store in cwd


def test_stage_run_records_tags_and_flattened_params(make_tracker):
    tracker = make_tracker()
    params = {"lr": 5e-5, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "model": "tiny"}
    with tracker.stage_run("dpo", params, tags={"dagster_run_id": "abc123"}) as run:
        run.set_tags({"note": "smoke"})
    found = MlflowClient(tracking_uri=tracker.tracking_uri).search_runs(
        [tracker.experiment_id()], "tags.stage = 'dpo'")
    assert [r.info.run_id for r in found] == [run.run_id]
    got = found[0]
    assert got.info.status == "FINISHED" and got.info.run_name == "dpo"
    assert got.data.params == {"lr": "5e-05", "lora.r": "8", "lora.target_modules": "['q_proj', 'v_proj']",
                               "model": "tiny"}
    git = git_state(Path(tracking.__file__).parent)
    assert {k: got.data.tags[k] for k in ("stage", "dagster_run_id", "note", "git_commit", "git_dirty", "git_branch")} == {
        "stage": "dpo", "dagster_run_id": "abc123", "note": "smoke",
        "git_commit": git["commit"], "git_dirty": str(git["dirty"]), "git_branch": str(git["branch"])}


def test_environment_and_params_artifacts(make_tracker, tmp_path):
    tracker = make_tracker()
    with tracker.stage_run("sft", {"out": Path("/x/y"), "epochs": 1}) as run:
        pass
    env = json.loads(downloaded(tracker, run.run_id, "environment.json", tmp_path).read_text())
    assert env["packages"]["mlflow"] == mlflow.__version__
    assert env["system"]["cpu_count"] == os.cpu_count()
    assert set(env["git"]) == {"commit", "branch", "dirty"}
    assert json.loads(downloaded(tracker, run.run_id, "params.json", tmp_path).read_text()) == {"out": "/x/y", "epochs": 1}


def test_failed_block_marks_run_failed_and_propagates(make_tracker):
    tracker = make_tracker()
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.stage_run("rollouts", {}) as run:
            raise RuntimeError("boom")
    assert run_by_id(tracker, run.run_id).info.status == "FAILED"


@pytest.mark.parametrize("mlflow_truncates", ["true", "false"])
def test_long_and_many_params_are_logged_not_rejected(make_tracker, tmp_path, monkeypatch, mlflow_truncates):
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", mlflow_truncates)  # "false": MLflow raises on long values
    tracker = make_tracker()
    params = {"prompt": "x" * 10_000, **{f"p{i}": i for i in range(250)}}
    with tracker.stage_run("sft", params) as run:
        pass
    logged = run_by_id(tracker, run.run_id).data.params
    assert len(logged) == 251
    assert len(logged["prompt"]) == MAX_PARAM_VALUE and logged["prompt"].endswith("params.json]")
    full = json.loads(downloaded(tracker, run.run_id, "params.json", tmp_path).read_text())
    assert full["prompt"] == "x" * 10_000


def test_metrics_and_megabyte_artifacts(make_tracker, tmp_path):
    tracker = make_tracker()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    payload = os.urandom(4 * 1024 * 1024)
    (adapter / "adapter_model.safetensors").write_bytes(payload)
    (adapter / "adapter_config.json").write_text("{}")
    with tracker.stage_run("sft", {}) as run:
        for step, loss in enumerate([2.0, 1.5, 1.1]):
            run.log_metrics({"loss": loss}, step=step)
        run.log_artifacts(adapter, "adapter")
        run.log_artifact(adapter / "adapter_config.json")
        run.log_dict({"rate": 0.5}, "summary.json")
    history = MlflowClient(tracking_uri=tracker.tracking_uri).get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 2.0), (1, 1.5), (2, 1.1)]
    copy = downloaded(tracker, run.run_id, "adapter/adapter_model.safetensors", tmp_path / "dl")
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(payload).digest()
    names = {f.path for f in MlflowClient(tracking_uri=tracker.tracking_uri).list_artifacts(run.run_id)}
    assert {"adapter", "adapter_config.json", "summary.json", "environment.json", "params.json"} <= names


def test_parent_run_and_find_runs_by_stage(make_tracker):
    tracker = make_tracker()
    with tracker.stage_run("pipeline", {}) as parent:
        with tracker.stage_run("sft", {}, parent_run_id=parent.run_id) as child:
            pass
    assert [r.info.run_id for r in tracker.find_runs("sft")] == [child.run_id]
    assert {r.info.run_id for r in tracker.find_runs()} == {parent.run_id, child.run_id}
    assert tracker.find_runs("dpo") == []
    assert run_by_id(tracker, child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_two_trackers_in_one_process_do_not_leak(make_tracker):
    uri_before = mlflow.get_tracking_uri()
    a, b = make_tracker("a"), make_tracker("b")
    with a.stage_run("sft", {"which": "a"}) as run_a:
        with b.stage_run("sft", {"which": "b"}) as run_b:
            run_a.log_metrics({"m": 1.0})
    assert [r.info.run_id for r in a.find_runs()] == [run_a.run_id]
    assert [r.info.run_id for r in b.find_runs()] == [run_b.run_id]
    assert mlflow.get_tracking_uri() == uri_before
    assert mlflow.active_run() is None


def test_existing_experiment_with_other_artifact_root_is_rejected(make_tracker, tmp_path):
    tracker = make_tracker()
    tracker.experiment_id()
    other = Tracker(tracker.tracking_uri, tracker.experiment, str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="stores artifacts in"):
        other.experiment_id()


def test_git_state_outside_a_repo_is_visibly_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_state(tmp_path) == {"commit": "unknown", "branch": None, "dirty": None}


def test_git_state_reads_commit_and_dirty(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (tmp_path / "f.txt").write_text("1")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_state(tmp_path) == {"commit": sha, "branch": "main", "dirty": False}
    (tmp_path / "f.txt").write_text("2")
    assert git_state(tmp_path)["dirty"] is True


def test_package_versions_and_fingerprint():
    versions = package_versions()
    assert {"mlflow", "numpy", "pandas"} <= set(versions) <= set(KEY_PACKAGES)
    assert all(versions[name] == importlib.metadata.version(name) for name in versions)
    fp = system_fingerprint()
    assert fp["cpu_count"] == os.cpu_count()
    assert fp["memory_total_bytes"] > 0
    assert fp["torch_device"] is None or fp["torch_device"] in ("cpu", "mps") or fp["torch_device"].startswith("cuda:")
    from dpo_driver.model import _torch_dtype

    # The run records the precision "auto" resolved to on this machine.
    assert fp["bf16_native"] == (_torch_dtype("auto") == torch.bfloat16)
