"""The audit log: atomic concurrent appends, registry moves and evaluations on record, in the file and in MLflow."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dpo_driver import audit, registry
from dpo_driver.registry import promote, record_evaluation, register_adapter, rollback

NAME = "test-policy"


def logged_adapter(tracker, tmp_path: Path, label: str) -> str:
    folder = tmp_path / f"adapter-{label}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with tracker.stage_run("dpo", {"label": label}) as run:
        run.log_artifacts(folder, "adapter")
    return run.run_id


APPENDER = """
import sys
from pathlib import Path
from dpo_driver.audit import record
for i in range(int(sys.argv[2])):
    record("rerun", f"writer {sys.argv[3]} record {i} " + "x" * 3000, path=Path(sys.argv[1]))
"""


def test_concurrent_appends_from_processes_never_interleave(tmp_path):
    path = tmp_path / "audit.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), "40", str(w)], cwd=Path(__file__).parents[1])
             for w in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    entries = audit.read(path)  # raises on any torn or interleaved line
    assert len(entries) == 160
    for w in range(4):  # each writer's records complete and in its own order
        mine = [e["reason"].split()[3] for e in entries if e["reason"].startswith(f"writer {w} ")]
        assert mine == [str(i) for i in range(40)]


def test_a_torn_last_line_stays_alone_and_reading_names_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit.record("rerun", "first", path=path)
    with open(path, "a") as f:
        f.write('{"time": "2026-')  # power loss mid-write
    audit.record("rerun", "after the tear", path=path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["reason"] == "after the tear"
    with pytest.raises(ValueError, match=r"audit.jsonl:2 is not a JSON audit record"):
        audit.read(path)


def test_unknown_event_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        audit.record("promoted", "typo", path=tmp_path / "a.jsonl")
    assert not (tmp_path / "a.jsonl").exists()


def test_promote_rollback_and_keep_are_audited_in_the_file_and_in_mlflow(make_tracker, tmp_path, audit_log, capsys):
    tracker = make_tracker()
    run1, run2 = logged_adapter(tracker, tmp_path, "1"), logged_adapter(tracker, tmp_path, "2")
    v1 = str(register_adapter(tracker, run1, name=NAME).version)
    v2 = str(record_evaluation(tracker, run2, "promote", "dpo - sft = +12.0 points", "tiny-random", name=NAME,
                               tags={"dagster_run_id": "dag-run-2"}).version)
    promote(tracker, NAME, v2, "promoting the champion again: no move, no record")
    rollback(tracker, NAME, to_version=v1, reason="v2 broke click-tab")
    kept = record_evaluation(tracker, logged_adapter(tracker, tmp_path, "3"), "keep previous", "dpo - champion = -1.0 points",
                             "tiny-random", name=NAME, tags={"dagster_run_id": "dag-run-3"})

    entries = audit.read(audit_log)
    assert [(e["event"], e["version"], e["details"].get("previous")) for e in entries] == [
        ("promote", v2, None), ("rollback", v1, v2), ("keep", str(kept.version), None)]
    assert entries[0]["dagster_run_id"] == "dag-run-2" and entries[0]["mlflow_run_id"] == run2
    assert entries[1]["mlflow_run_id"] == run1 and entries[1]["reason"] == "v2 broke click-tab"
    assert entries[2]["details"] == {"decision": "keep previous", "champion": v1}
    assert [e["time"] for e in entries] == sorted(e["time"] for e in entries) and entries[0]["time"].endswith("+00:00")

    client = MlflowClient(tracking_uri=tracker.tracking_uri)  # read back from the store
    exp = client.get_experiment_by_name(audit.AUDIT_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.`audit.event` = 'rollback'")
    assert len(runs) == 1 and runs[0].data.tags["audit.version"] == v1 and runs[0].data.tags["audit.details.previous"] == v2
    assert client.get_run(run1).data.tags["audit.last_event"].endswith("rollback: v2 broke click-tab")

    assert registry.main(["audit", "--last", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and f"rollback     {NAME} v{v1} (was v{v2})" in out[0] and "keep" in out[1]
    assert registry.main(["audit", "--json"]) == 0
    assert [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()] == ["promote", "rollback", "keep"]
