"""Shared fixtures. MLflow's Alembic migrations take seconds per new SQLite store, so one
migrated database is made per session and copied into each test's own store."""

import shutil
from pathlib import Path

import pytest

from dpo_driver.tracking import Tracker


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("mlflow-template")
    Tracker.local(home).client.search_experiments()  # creates and migrates the database
    return home / "mlflow.db"


@pytest.fixture
def make_tracker(migrated_db, tmp_path):
    """make_tracker("name") -> a Tracker on a fresh SQLite store in tmp_path/name."""

    def make(name: str = "home") -> Tracker:
        home = tmp_path / name
        home.mkdir()
        shutil.copy(migrated_db, home / "mlflow.db")
        return Tracker.local(home, experiment="test")

    return make


@pytest.fixture(autouse=True)
def audit_log(tmp_path, monkeypatch) -> Path:
    """Every test's audit records go to its own file, never to the checkout's .dpo_home."""
    path = tmp_path / "audit" / "audit.jsonl"
    monkeypatch.setenv("DPO_AUDIT_LOG", str(path))
    return path


@pytest.fixture(scope="session")
def miniwob():
    """The MiniWoB++ family (real Chromium); sessions it opens start their own browsers."""
    from dpo_driver.families.miniwob import MiniWoB

    return MiniWoB()


@pytest.fixture(scope="module")
def policy(tmp_path_factory, miniwob):
    """The tiny random model as a MiniWoB policy, built once per test module in its own model cache."""
    from dpo_driver.policy import LMPolicy
    from dpo_driver.training import load_policy

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_DRIVER_CACHE", str(tmp_path_factory.mktemp("cache")))
        model, tok = load_policy("tiny-random")
        yield LMPolicy(model, tok, miniwob)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """A module-wide DPO_DRIVER_CACHE: the tiny model is built once per test module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_DRIVER_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def module_home(tmp_path_factory):
    """A module-wide DPO_HOME with its model cache inside, for tests that materialize several runs."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_HOME", str(home))
        mp.setenv("DPO_DRIVER_CACHE", str(home / "models"))
        yield home
