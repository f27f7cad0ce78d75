"""The training entry point and the `trainer` resource: real tiny trainings through Dagster Pipes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from dpo_driver.io import atomic_write_jsonl
from dpo_driver.model import resolve_model
from dpo_driver.train import JobSpec
from resources import TrainingLauncher
from resources.trainer import gpu_request, same_path_mounts

NAMES = ["okay", "Cancel", "Submit", "Next"]
SFT_RECORDS = [
    {"prompt": [{"role": "user", "content": f'Task: Click on the "{n}" button.\n{i}. button "{n}"'}],
     "completion": [{"role": "assistant", "content": f'click button "{n}"'}]}
    for i in (1, 2) for n in NAMES
]
PARAMS = {"learning_rate": 1e-2, "num_train_epochs": 1, "max_steps": 0, "min_steps": 0, "per_device_train_batch_size": 4, "logging_steps": 1}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    return resolve_model("tiny-random", tmp_path_factory.mktemp("models"))


def write_job(folder: Path, base_model: str, records=SFT_RECORDS, **spec) -> Path:
    """An SFT job as the asset writes one: records + spec in one folder, paths relative to it."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(folder / "records.jsonl", records)
    spec = {"kind": "sft", "base_model": base_model, "records": "records.jsonl", "output_dir": "adapter",
            "params": PARAMS, **spec}
    return JobSpec(**spec).write(folder / "job.json")


def materialize_training(trainer: TrainingLauncher, spec_path: Path, tmp_path: Path):
    """Run `trainer.train` inside a real asset; (result, run log lines) or the raised error."""

    @dg.asset
    def adapter(context: dg.AssetExecutionContext, trainer: TrainingLauncher) -> dg.MaterializeResult:
        return dg.MaterializeResult(value=trainer.train(context, spec_path))

    (tmp_path / "dagster").mkdir(exist_ok=True)
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        result = dg.materialize([adapter], resources={"trainer": trainer}, instance=instance)
        logs = [e.user_message for e in instance.all_logs(result.run_id)]
        return result.output_for_node("adapter"), logs


@pytest.fixture(scope="module")
def sft_via_pipes(base_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipes")
    spec_path = write_job(tmp / "job", base_model)
    return spec_path, *materialize_training(TrainingLauncher(), spec_path, tmp)


def test_subprocess_trainer_trains_and_reports_through_pipes(sft_via_pipes):
    spec_path, result, logs = sft_via_pipes
    assert result["kind"] == "sft" and result["num_examples"] == len(SFT_RECORDS)
    assert result["metrics"]["global_step"] == 2 and "train_loss" in result["metrics"]
    adapter = Path(result["adapter_dir"])
    assert adapter == spec_path.parent / "adapter" and (adapter / "adapter_config.json").is_file()
    # Progress reached the Dagster run log as Pipes log messages, not only the process's stderr.
    assert any("sft step 2/2" in m for m in logs), logs
    assert "sft done" in (spec_path.parent / "sft-train.log").read_text()


def test_cli_without_pipes_prints_the_result_as_json(sft_via_pipes, base_model, tmp_path):
    """DPO from the Pipes-trained SFT adapter, run by hand: the last stdout line is the result."""
    spec_path, sft, _ = sft_via_pipes
    records = [{"prompt": r["prompt"], "chosen": r["completion"],
                "rejected": [{"role": "assistant", "content": 'type textbox "Myron"'}]} for r in SFT_RECORDS]
    job = write_job(tmp_path, base_model, records, kind="dpo", sft_adapter_dir=sft["adapter_dir"],
                    params={"learning_rate": 1e-3, "max_steps": 0, "min_steps": 0, "per_device_train_batch_size": 4, "logging_steps": 1})
    out = subprocess.run([sys.executable, "-m", "dpo_driver.train", "dpo", "--config", str(job)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kind"] == "dpo" and result["num_examples"] == len(records)
    assert {"rewards/margins", "train_loss"} <= result["metrics"].keys()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "dpo step" in out.stderr


def test_a_failing_job_fails_the_asset_with_its_log_tail(base_model, tmp_path):
    spec_path = write_job(tmp_path / "job", base_model, records=[{"prompt": "p"}])
    with pytest.raises(dg.Failure) as err:
        materialize_training(TrainingLauncher(), spec_path, tmp_path)
    text = err.value.description
    assert "training process failed" in text and "last lines of its log" in text
    assert "record 0 lacks ['completion']" in text  # the child's own exception, from its log
    assert not (tmp_path / "job" / "adapter").exists()


def test_a_bad_spec_fails_before_anything_launches(base_model, tmp_path):
    spec_path = write_job(tmp_path, base_model)
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**spec, "params": {"lora_rank": 8}}))
    with pytest.raises(ValueError, match=r"\['lora_rank'\] are not SFTParams fields"):
        TrainingLauncher().train(dg.build_asset_context(), spec_path)
    spec_path.write_text(json.dumps({**spec, "kind": "dpo"}))
    with pytest.raises(ValueError, match="needs sft_adapter_dir"):
        TrainingLauncher().train(dg.build_asset_context(), spec_path)


def test_docker_mode_without_an_engine_is_a_clear_error_not_a_hang(base_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    spec_path = write_job(tmp_path / "job", base_model)
    t0 = time.perf_counter()
    with pytest.raises(dg.Failure, match="needs a Docker engine, and none answered") as err:
        materialize_training(TrainingLauncher(mode="docker"), spec_path, tmp_path)
    assert time.perf_counter() - t0 < 30
    assert "no-engine.sock" in err.value.description and "mode 'subprocess'" in err.value.description


def test_mounts_show_the_job_folders_at_their_own_paths(tmp_path):
    model, sft = tmp_path / "cache" / "tiny", tmp_path / "art" / "sft" / "r1" / "adapter"
    for p in (model, sft):
        p.mkdir(parents=True)
    job = tmp_path / "art" / "dpo" / ".r2.tmp"
    spec = JobSpec("dpo", str(model), str(job / "pairs.jsonl"), str(job / "adapter"), sft_adapter_dir=str(sft))
    mounts = same_path_mounts(spec, job / "job.json")
    assert mounts == {
        str(job): {"bind": str(job), "mode": "rw"},  # spec, records and the adapter's parent: one mount
        str(sft): {"bind": str(sft), "mode": "ro"},
        str(model): {"bind": str(model), "mode": "ro"},
    }
    # A hub id is no folder: nothing to mount for it.
    assert str(model) not in same_path_mounts(JobSpec("sft", "org/model", str(job / "r.jsonl"), str(job / "a")),
                                              job / "job.json")


def test_gpu_requests():
    assert gpu_request("all") == {"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    assert gpu_request("0, 1")["DeviceIDs"] == ["0", "1"]
