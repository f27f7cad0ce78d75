"""The production path for real: build the CPU training image, train in a container through Pipes.

Needs a Docker engine and the local base image (`bash scripts/docker_engine.sh`, which CI runs
first); skips with the reason where there is none. The first build takes minutes; after that the
content-hash tag makes it one `docker image inspect`.
"""

import os
import subprocess
from pathlib import Path

import dagster as dg
import docker
import pytest

from resources import TrainingLauncher
from test_trainer import SFT_RECORDS, materialize_training, write_job

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("DPO_BASE_IMAGE", "dpo-driver-base:bookworm")


@pytest.fixture(scope="module")
def engine():
    try:
        client = docker.from_env(timeout=5)
        client.ping()
    except Exception as e:  # any failure to reach an engine is a reason to skip, reported as such
        pytest.skip(f"no Docker engine reachable ({type(e).__name__}: {e}); run scripts/docker_engine.sh")
    try:
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"base image {BASE_IMAGE} missing; scripts/docker_engine.sh builds it")
    return client


@pytest.fixture(scope="module")
def image(engine) -> str:
    out = subprocess.run(["bash", "docker/build_image.sh", "train", BASE_IMAGE], cwd=ROOT, capture_output=True,
                         text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    from dpo_driver.model import resolve_model

    return resolve_model("tiny-random", tmp_path_factory.mktemp("models"))


def test_image_has_the_entry_point_and_no_dagster(engine, image):
    out = engine.containers.run(image, ["python", "-c", "import importlib.metadata as m, importlib.util as u, torch; "
                                        "print(m.version('dagster-pipes'), torch.__version__, u.find_spec('dagster'))"],
                                remove=True)
    pipes, torch, dagster = out.decode().split()
    assert pipes == "1.13.27" and torch.startswith("2.13.0") and dagster == "None"


def test_tiny_sft_runs_in_a_container_through_pipes(engine, image, base_model, tmp_path):
    spec_path = write_job(tmp_path / "job", base_model)
    before = {c.id for c in engine.containers.list(all=True)}
    result, logs = materialize_training(TrainingLauncher(mode="docker", image=image), spec_path, tmp_path)
    assert result["kind"] == "sft" and result["num_examples"] == len(SFT_RECORDS)
    assert result["metrics"]["global_step"] == 2 and result["metrics"]["train_loss"] > 0
    adapter = Path(result["adapter_dir"])
    assert adapter == spec_path.parent / "adapter" and (adapter / "adapter_model.safetensors").is_file()
    assert adapter.stat().st_uid == os.getuid()  # written as the launching user, not root
    assert any("sft step 2/2" in m for m in logs), logs  # progress streamed from the container via Pipes
    assert {c.id for c in engine.containers.list(all=True)} <= before  # the container was removed


def test_a_failing_container_fails_the_asset_with_its_log_tail(engine, image, base_model, tmp_path):
    spec_path = write_job(tmp_path / "job", base_model, records=[{"prompt": "p"}])
    with pytest.raises(dg.Failure) as err:
        materialize_training(TrainingLauncher(mode="docker", image=image), spec_path, tmp_path)
    text = err.value.description
    assert f"training container {image} failed" in text and "non-zero status code" in text
    assert "record 0 lacks ['completion']" in text
    assert not (tmp_path / "job" / "adapter").exists()
