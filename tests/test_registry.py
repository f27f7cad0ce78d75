"""Promote / rollback / history against a real MLflow SQLite registry in tmp_path."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dpo_driver import registry
from dpo_driver.registry import (acting_adapter, alias_history, champion, champion_adapter_dir, promote, record_evaluation,
                                 register_adapter, rollback)

NAME = "test-policy"


@pytest.fixture
def tracker(make_tracker):
    return make_tracker()


def logged_adapter(tracker, tmp_path: Path, label: str) -> str:
    """An MLflow run with an adapter/ artifact folder, as the dpo_adapter asset logs it."""
    folder = tmp_path / f"adapter-{label}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"label": label}))
    with tracker.stage_run("dpo", {"label": label}) as run:
        run.log_artifacts(folder, "adapter")
    return run.run_id


def versions(tracker, tmp_path, n: int) -> list[str]:
    return [str(register_adapter(tracker, logged_adapter(tracker, tmp_path, str(i)), name=NAME).version) for i in range(n)]


def alias_of(tracker) -> str | None:
    aliases = MlflowClient(tracking_uri=tracker.tracking_uri).get_registered_model(NAME).aliases  # read back from the store
    return None if "champion" not in aliases else str(aliases["champion"])


def test_champion_is_none_when_nothing_is_registered_or_promoted(tracker, tmp_path):
    assert champion(tracker, NAME) is None
    assert alias_history(tracker, NAME) == []
    versions(tracker, tmp_path, 1)
    assert champion(tracker, NAME) is None
    assert champion_adapter_dir(tracker, NAME) is None


def test_register_adapter_creates_versions_with_the_run_artifact_as_source(tracker, tmp_path):
    run_id = logged_adapter(tracker, tmp_path, "a")
    v1 = register_adapter(tracker, run_id, name=NAME, tags={"decision": "promote"})
    v2 = register_adapter(tracker, logged_adapter(tracker, tmp_path, "b"), name=NAME)
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    assert v1.run_id == run_id and v1.source.endswith(f"{run_id}/artifacts/adapter")
    assert v1.tags == {"artifact_path": "adapter", "decision": "promote"}


def test_register_adapter_without_the_artifact_is_rejected(tracker):
    with tracker.stage_run("dpo", {}) as run:
        pass
    with pytest.raises(ValueError, match="no artifacts under 'adapter'"):
        register_adapter(tracker, run.run_id, name=NAME)


def test_promote_moves_the_alias_and_a_second_promote_moves_it_again(tracker, tmp_path):
    v1, v2 = versions(tracker, tmp_path, 2)
    promote(tracker, NAME, v1, "first DPO round beat SFT")
    assert alias_of(tracker) == v1 == str(champion(tracker, NAME).version)
    promote(tracker, NAME, v2, "second round beat the champion")
    assert alias_of(tracker) == v2
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    assert client.get_model_version(NAME, v2).tags["champion_reason"] == "second round beat the champion"
    assert "champion_until" in client.get_model_version(NAME, v1).tags


def test_champion_adapter_dir_is_the_local_adapter_folder(tracker, tmp_path):
    (v1,) = versions(tracker, tmp_path, 1)
    promote(tracker, NAME, v1, "ok")
    folder = champion_adapter_dir(tracker, NAME)
    assert json.loads((folder / "adapter_config.json").read_text()) == {"label": "0"}


def test_rollback_points_the_alias_back_to_the_previous_champion(tracker, tmp_path):
    v1, v2, v3 = versions(tracker, tmp_path, 3)
    for v in (v1, v2, v3):
        promote(tracker, NAME, v, f"round {v}")
    assert str(rollback(tracker, NAME, reason="v3 regressed in production").version) == v2
    assert alias_of(tracker) == v2
    assert str(rollback(tracker, NAME).version) == v1  # walks further back, no flip-flop to v3
    with pytest.raises(ValueError, match="first recorded champion"):
        rollback(tracker, NAME)
    assert str(rollback(tracker, NAME, to_version=v3).version) == v3
    assert alias_of(tracker) == v3


def test_alias_history_is_recorded_in_order(tracker, tmp_path):
    v1, v2 = versions(tracker, tmp_path, 2)
    promote(tracker, NAME, v1, "beat SFT")
    promote(tracker, NAME, v1, "same version again: no move, no entry")
    promote(tracker, NAME, v2, "beat v1")
    rollback(tracker, NAME, reason="v2 broke click-tab")
    history = alias_history(tracker, NAME)
    assert [(h["action"], h["version"], h["previous"], h["reason"]) for h in history] == [
        ("promote", v1, None, "beat SFT"),
        ("promote", v2, v1, "beat v1"),
        ("rollback", v1, v2, "v2 broke click-tab"),
    ]
    assert [h["time"] for h in history] == sorted(h["time"] for h in history)


def test_unknown_version_and_missing_champion_are_clear_errors(tracker, tmp_path):
    versions(tracker, tmp_path, 1)
    with pytest.raises(ValueError, match="nothing to roll back"):
        rollback(tracker, NAME)
    with pytest.raises(Exception, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        promote(tracker, NAME, "7", "no such version")
    assert alias_history(tracker, NAME) == []


def test_history_tag_stays_within_mlflows_limit(tracker, tmp_path):
    v1, v2 = versions(tracker, tmp_path, 2)
    for i in range(16):  # ~380 chars per entry: 16 entries overflow 5000
        promote(tracker, NAME, (v1, v2)[i % 2], "x" * 250)
    history = alias_history(tracker, NAME)
    assert len(json.dumps(history)) <= registry.MAX_HISTORY_CHARS
    assert history[-1]["version"] == v2 and 1 < len(history) < 16


def test_cli_rollback_and_history(tracker, tmp_path, monkeypatch, capsys):
    v1, v2 = versions(tracker, tmp_path, 2)
    promote(tracker, NAME, v1, "a")
    promote(tracker, NAME, v2, "b")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DPO_HOME", str(Path(tracker.tracking_uri.removeprefix("sqlite:///")).parent))
    assert registry.main(["--name", NAME, "rollback", "--reason", "from the shell"]) == 0
    assert f"v{v2} -> v{v1}" in capsys.readouterr().out
    assert alias_of(tracker) == v1
    assert registry.main(["--name", NAME, "history"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["reason"] == "from the shell"
    assert registry.main(["--name", NAME, "rollback"]) == 1  # v1 was the first champion
    assert "first recorded champion" in capsys.readouterr().err


def test_cli_without_a_store_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DPO_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="no MLflow store at"):
        registry.main(["history"])


def test_record_evaluation_registers_every_candidate_and_promotes_only_on_promote(tracker, tmp_path):
    kept = record_evaluation(tracker, logged_adapter(tracker, tmp_path, "a"), "keep previous", "no gain", "tiny-random", name=NAME)
    assert champion(tracker, NAME) is None and kept.tags["decision"] == "keep previous"
    won = record_evaluation(tracker, logged_adapter(tracker, tmp_path, "b"), "promote", "+10 points", "tiny-random",
                            tags={"evaluation_run_id": "e1"}, name=NAME)
    assert alias_of(tracker) == str(won.version) == "2"
    assert won.tags["evaluation_run_id"] == "e1" and alias_history(tracker, NAME)[-1]["reason"] == "+10 points"


def test_rollouts_act_with_the_champion_of_their_base_model_else_the_sft_adapter(tracker, tmp_path):
    sft = tmp_path / "sft-adapter"
    first = acting_adapter(tracker, sft, "tiny-random", name=NAME)
    assert (first.adapter_dir, first.role, first.label) == (sft, "sft", "sft (no champion yet)")
    record_evaluation(tracker, logged_adapter(tracker, tmp_path, "a"), "promote", "won", "tiny-random", name=NAME)
    acting = acting_adapter(tracker, sft, "tiny-random", name=NAME)
    assert (acting.role, acting.label) == ("champion", "champion (v1)")
    assert json.loads((acting.adapter_dir / "adapter_config.json").read_text()) == {"label": "a"}
    other = acting_adapter(tracker, sft, "smollm2-135m", name=NAME)  # champion is for another base model
    assert other.adapter_dir == sft and other.role == "sft" and "trained on base model 'tiny-random'" in other.label
