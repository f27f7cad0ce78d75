"""Bad input stops the asset with a message naming the input and the fix, and writes no output."""

import json

import dagster as dg
import pytest

from dpo_assets import definitions
from dpo_assets.sft import sft_adapter
from resources import ArtifactStore, EnvironmentResource, PolicyModel, TaskSuite


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_HOME", str(tmp_path))
    monkeypatch.setenv("DPO_DRIVER_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown hub id fails at once instead of retrying for ~30 s
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def materialize_sft(home, demos_path="", **overrides):
    resources = {
        **definitions.RESOURCES_BY_DEPLOYMENT["local"],
        "policy_model": PolicyModel(model="tiny-random"),
        "task_suite": TaskSuite(tasks=["click-button"], demo_seeds=2),
        "artifact_store": ArtifactStore(root=str(home / "artifacts")),
        **overrides,
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize([sft_adapter], resources=resources, instance=instance, raise_on_error=False,
                                run_config={"ops": {"sft_adapter": {"config": {"demos_path": str(demos_path)}}}})
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert not (home / "artifacts" / "sft_adapter").exists(), "a failed asset must leave no output behind"
    return failure.event_specific_data.error.to_string()


def test_malformed_demo_file(home):
    bad = home / "demos.jsonl"
    bad.write_text(json.dumps({"prompt": "Task: x", "completion": 'click button "a"'}) + "\n{oops\n")
    msg = materialize_sft(home, bad)
    assert f"demo file {bad} line 2: not valid JSON" in msg


def test_empty_demo_file(home):
    empty = home / "empty.jsonl"
    empty.write_text("\n")
    assert "holds no demonstrations" in materialize_sft(home, empty)


def test_unknown_task(home):
    msg = materialize_sft(home, task_suite=TaskSuite(tasks=["click-buton"]))
    assert "unknown task 'click-buton'" in msg and "click-button" in msg


def test_unknown_model_that_is_not_a_path(home):
    msg = materialize_sft(home, policy_model=PolicyModel(model="no-such-org/no-such-model"))
    assert "no-such-org/no-such-model" in msg and "tiny-random" in msg  # names the input and the presets


def test_missing_chromium(home):
    msg = materialize_sft(home, environment=EnvironmentResource(options={"chrome_binary": str(home / "no-chromium")}))
    assert "Chromium not found" in msg and "apt-get install -y chromium chromium-driver" in msg
