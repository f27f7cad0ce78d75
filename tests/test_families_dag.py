"""The whole DAG on every non-browser family and on the README's user environment (tiny model):
the same assets, gates, registry and report, with the family named in MLflow and the report."""

import json
import re
import sys
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from dpo_assets.checks import CHECKS
from dpo_assets.definitions import ASSETS
from dpo_assets.presets import preset
from dpo_driver.environment import load_environment
from resources import ArtifactStore, EnvironmentResource, MLflowTracker, PolicyModel, TaskSuite, TrainingLauncher
from resources.home import init_home

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_environment(folder: Path) -> str:
    """The README's example environment, written out as `my_env.py` in `folder` (on sys.path)."""
    block = re.search(r"```python\n(# my_env\.py.*?)```", README.read_text(), re.S).group(1)
    (folder / "my_env.py").write_text(block)
    return block


def family_config(family: str, tasks: list[str]) -> dict:
    """The tiny preset on `family`: the family's own step limits and answer lengths, every offered
    candidate explored (a random model writes no working JSON or SQL), and an SFT gate that only
    asks for the plumbing (the tiny model learns no format here)."""
    cfg = preset("tiny")
    cfg["resources"]["task_suite"]["config"].update(tasks=tasks, rollout_seeds=3, eval_seeds=3)
    ops = cfg["ops"]
    ops["rollout_trajectories"]["config"].update(max_new_tokens=0, max_steps=0, samples_per_seed=2, strategy="candidates")
    ops["evaluation_report"]["config"].update(max_new_tokens=0, max_steps=0)
    ops["sft_adapter_validation"]["config"].update(min_valid_fraction=0.0)
    ops["sft_adapter"]["config"].update(validation_max_new_tokens=0)
    return cfg


def logged_traces(path: Path, env, tasks: list[str], items: list[int]) -> Path:
    """A team's log: per item, the expert's episode (solved) and one that answered wrong at the end."""
    rows = []
    for task in tasks:
        for item in items:
            with env.open(task) as session:
                _, prompt = session.reset(item)
                steps = []
                while True:
                    answer = session.expert()
                    t = session.step(answer)
                    steps.append({"prompt": prompt, "output": answer})
                    if t.done:
                        break
                    prompt = t.prompt
            wrong = steps[:-1] + [{"prompt": steps[-1]["prompt"],
                                   "output": 'Thought: I know it.\nAction: {"tool":"final_answer","args":{"answer":"0"}}'}]
            rows += [{"trace_id": f"{task}-{item}-ok", "task": task, "item": item, "success": True, "steps": steps},
                     {"trace_id": f"{task}-{item}-bad", "task": task, "item": item, "success": False, "steps": wrong}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("family, tasks", [("tooluse", ["calculator", "lookup-calc"]), ("sql", ["sql-filter", "sql-join"]),
                                           ("my_env:Reverse", ["reverse"])])
def test_whole_dag_runs_on_the_family(family, tasks, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_HOME", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    if family.startswith("my_env"):
        assert len(readme_environment(tmp_path).splitlines()) < 100
        sys.modules.pop("my_env", None)
    resources = {
        "policy_model": PolicyModel(cache_dir=str(tmp_path / "models")),
        "task_suite": TaskSuite(),
        "environment": EnvironmentResource(family=family),
        "artifact_store": ArtifactStore(root=str(tmp_path / "artifacts")),
        "tracker": MLflowTracker(),
        "trainer": TrainingLauncher(),
    }
    env = load_environment(family)
    config = family_config(family, tasks)
    if family == "sql":  # capability retention on a level this round does not train
        config["resources"]["task_suite"]["config"]["retention_tasks"] = ["sql-group"]
    if family == "tooluse":
        # A random model never completes a multi-step tool episode, so this family's episodes come
        # from logged traces (rollout_trajectories.traces_path): the import path, through every gate.
        traces = logged_traces(tmp_path / "traces.jsonl", env, tasks, [11, 12, 13])
        config["ops"]["rollout_trajectories"]["config"]["traces_path"] = str(traces)
    init_home(tmp_path, tmp_path / "dagster")
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        result = dg.materialize(ASSETS + CHECKS, resources=resources, run_config=config, instance=instance)
    assert result.success
    episodes = result.output_for_node("rollout_trajectories")
    assert set(episodes["task"]) == set(tasks) and episodes["success"].any() and not episodes["success"].all()
    pairs = result.output_for_node("preference_pairs")
    assert len(pairs) > 0 and all(env.parse(c).ok for c in pairs["chosen"])
    report = result.output_for_node("evaluation_report")
    assert report.environment == env.name and report.decision in ("promote", "keep previous", "needs review")
    if family == "sql":
        kept = report.summary["retention"]
        assert kept["tasks"] == ["sql-group"] and kept["n"] == 3 and kept["passed"] == (kept["candidate"] >= 0.95 * kept["baseline"])
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()])
    assert {r.data.tags.get("environment") for r in runs if r.data.tags.get("stage") in ("sft", "rollouts", "pairs", "evaluation")} == {env.name}


def test_bad_environments_fail_naming_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "half_env.py").write_text("class Half:\n    name = 'half'\n    tasks = ('t',)\n    def open(self, task):\n        return None\n")
    with pytest.raises(ValueError, match="unknown environment 'webshop'"):
        load_environment("webshop")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        load_environment("no_such_module:Env")
    with pytest.raises(ValueError, match="lacks parse"):
        load_environment("half_env:Half")
    with pytest.raises(ValueError, match="options \\['colour'\\] do not fit"):
        load_environment("tooluse", colour="red")
    # Through Dagster: the first asset fails before writing anything.
    monkeypatch.setenv("DPO_HOME", str(tmp_path))
    cfg = preset("tiny")
    cfg["ops"] = {"sft_adapter": cfg["ops"]["sft_adapter"]}
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        result = dg.materialize(ASSETS[:1], run_config=cfg, instance=instance, raise_on_error=False, resources={
            "policy_model": PolicyModel(cache_dir=str(tmp_path / "models")), "task_suite": TaskSuite(),
            "environment": EnvironmentResource(family="half_env:Half"), "artifact_store": ArtifactStore(root=str(tmp_path / "artifacts")),
            "tracker": MLflowTracker(), "trainer": TrainingLauncher()})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "lacks parse" in str(failure.event_specific_data.error)
    assert not (tmp_path / "artifacts").exists()
