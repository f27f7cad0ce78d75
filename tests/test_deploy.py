"""The production deployment files load as what they claim to be (no Postgres or Docker engine needed)."""

import re
import tomllib
from pathlib import Path

import docker
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from dagster._core.launcher import RunLauncher
from dagster._serdes.config_class import ConfigurableClassData

from dpo_assets.definitions import ASSETS, RESOURCES_BY_DEPLOYMENT
from resources import TrainingLauncher

DOCKER = Path(__file__).resolve().parents[1] / "docker"
ENV = {"DAGSTER_POSTGRES_HOST": "postgres", "DAGSTER_POSTGRES_USER": "dagster",
       "DAGSTER_POSTGRES_PASSWORD": "secret", "DAGSTER_POSTGRES_DB": "dagster"}


@pytest.fixture
def instance_config(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    config, custom_class = dagster_instance_config(str(DOCKER))  # the instance schema, as `dagster` loads it
    assert custom_class is None
    return config


def test_production_instance_config_is_valid(instance_config):
    pg = instance_config["storage"]["postgres"]["postgres_db"]
    assert {pg[k]["env"] for k in ("hostname", "username", "password", "db_name")} == set(ENV)
    assert pg["scheme"] == "postgresql+psycopg2"  # the driver dagster-postgres installs (SQLAlchemy 2.1 defaults to psycopg 3)
    assert instance_config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert instance_config["run_monitoring"]["enabled"] is True
    assert instance_config["run_retries"]["enabled"] is True and instance_config["run_retries"]["max_retries"] >= 1
    assert instance_config["concurrency"]["pools"] == {"default_limit": 1, "granularity": "op"}


def test_run_launcher_is_docker_with_gpu_device_requests(instance_config):
    launcher_cfg = instance_config["run_launcher"]
    # Rehydrating validates the config against DockerRunLauncher's own schema and constructs it.
    launcher = ConfigurableClassData(launcher_cfg["module"], launcher_cfg["class"],
                                     yaml.safe_dump(launcher_cfg["config"])).rehydrate(as_type=RunLauncher)
    assert type(launcher).__name__ == "DockerRunLauncher"
    [request] = launcher.container_kwargs["device_requests"]
    gpu = docker.types.DeviceRequest(**request)  # what docker-py sends for `--gpus all`
    assert gpu["Driver"] == "nvidia" and gpu["Count"] == -1 and gpu["Capabilities"] == [["gpu"]]
    assert "/var/run/docker.sock:/var/run/docker.sock" in launcher.container_kwargs["volumes"]
    assert {"DPO_TRAIN_IMAGE", "DPO_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI", *ENV} <= set(launcher.env_vars)
    assert launcher.networks == ["dpo-driver"]


def test_compose_runs_the_stack_the_instance_config_expects():
    compose = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "code", "webserver", "daemon"} <= set(services)
    assert compose["networks"]["dpo-driver"]["name"] == "dpo-driver"  # the run launcher's network
    env = services["daemon"]["environment"]
    assert env["DPO_DEPLOYMENT"] == "prod" and set(ENV) <= set(env)
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["daemon"]["volumes"]
    workspace = yaml.safe_load((DOCKER / "workspace.yaml").read_text())
    [server] = [e["grpc_server"] for e in workspace["load_from"]]
    assert server["host"] == "code" and f"-p {server['port']}" in services["code"]["command"]
    for name in ("webserver", "daemon", "code"):
        assert "./dagster.yaml:/opt/dagster/home/dagster.yaml:ro" in services[name]["volumes"]


def test_training_image_pins_match_the_project():
    project = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.match(r"([\w-]+)==([^\s;]+)", d).groups() for d in project)
    image = [line for line in (DOCKER / "requirements-train.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    for line in image:
        name, version = line.split("==")
        assert pins[name] == version, f"docker/requirements-train.txt pins {line}, pyproject {pins[name]}"
    assert not any(line.startswith("dagster==") for line in image)  # the image stays free of Dagster itself
    assert "ARG BASE_IMAGE" in (DOCKER / "Dockerfile").read_text()


def test_training_assets_share_the_gpu_pool_and_every_deployment_has_a_trainer():
    pools = {a.key.to_user_string(): a.op.pool for a in ASSETS}
    assert pools["sft_adapter"] == pools["dpo_adapter"] == "gpu"
    assert {k for k, v in pools.items() if v} == {"sft_adapter", "dpo_adapter"}
    local, prod = RESOURCES_BY_DEPLOYMENT["local"]["trainer"], RESOURCES_BY_DEPLOYMENT["prod"]["trainer"]
    assert isinstance(local, TrainingLauncher) and local.mode == "subprocess"
    assert isinstance(prod, TrainingLauncher) and prod.mode == "docker" and prod.gpus == "all"
