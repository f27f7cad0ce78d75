import base64
import re
import time

import pytest

from dpo_driver.episode_traces import log_episode_traces, run_trace_count, sample_episodes
from dpo_driver.report import build_report, plot_report
from dpo_driver.traces import load_mlflow_traces
from dpo_driver.ui import embed_png_markdown


def episode(i: int, task: str = "click-button", success: bool = True, policy: str = "dpo", steps: int = 3) -> dict:
    return {
        "episode_id": f"{policy}:{task}:{1000 + i}:0", "policy": policy, "task": task, "seed": 1000 + i, "sample": 0,
        "success": success, "reward": 1.0 if success else -0.25, "raw_reward": 1.0 if success else 0.0,
        "truncated": False, "invalid": False, "env_error": False, "error": None, "num_steps": steps,
        "steps": [{"step": s, "prompt": f"{task} seed {1000 + i} state {s}", "output": f" click({s}) ",
                   "action": None if s == 1 else f"click({s})", "valid": s != 1,
                   "reward": (1.0 if success else -0.25) if s == steps - 1 else 0.0, "done": s == steps - 1,
                   "seconds": 0.0 if s == 0 else 0.02} for s in range(steps)],
        "wall_seconds": 0.1,
    }


# --- sampling ---


def test_sample_keeps_all_when_few_and_skips_stepless():
    eps = [episode(i) for i in range(5)] + [{**episode(9), "steps": [], "num_steps": 0}]
    assert sample_episodes(eps, max_traces=50) == eps[:5]
    assert sample_episodes(eps, max_traces=None) == eps[:5]
    assert sample_episodes(eps, max_traces=0) == []


def test_sample_is_deterministic_stratified_and_in_input_order():
    # 3 tasks x 2 policies; successes are rare (1 in 10), so a plain random sample of 6 would often miss them.
    eps = [episode(i, task=f"task{i % 3}", success=i % 10 == 0, policy=("sft", "dpo")[i // 100]) for i in range(200)]
    picked = sample_episodes(eps, max_traces=6, seed=0)
    assert picked == sample_episodes(eps, max_traces=6, seed=0)
    assert picked != sample_episodes(eps, max_traces=6, seed=1)
    assert len(picked) == 6
    assert {e["success"] for e in picked} == {True, False}
    assert sum(e["success"] for e in picked) == 3  # outcomes balanced
    assert {e["task"] for e in picked} == {"task0", "task1", "task2"}
    assert {e["policy"] for e in picked} == {"sft", "dpo"}
    positions = [eps.index(e) for e in picked]
    assert positions == sorted(positions)
    # A stratum smaller than its share is used up, the rest goes to the others.
    few = [episode(0, success=True)] + [episode(i, success=False) for i in range(1, 30)]
    assert sum(e["success"] for e in sample_episodes(few, max_traces=10)) == 1


# --- MLflow ---


@pytest.fixture
def isolated_mlflow(monkeypatch):
    """Fails the test if logging traces changed MLflow's process-global state."""
    import mlflow
    import mlflow.tracking._tracking_service.utils as tracking_utils

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    before = (tracking_utils._tracking_uri, mlflow.active_run(), mlflow.tracking.fluent._active_experiment_id)
    yield
    after = (tracking_utils._tracking_uri, mlflow.active_run(), mlflow.tracking.fluent._active_experiment_id)
    assert after == before
    assert mlflow.get_current_active_span() is None


def test_traces_land_under_the_run_and_round_trip_through_the_importer(make_tracker, isolated_mlflow):
    tracker = make_tracker()
    eps = [episode(0, success=True), episode(1, task="enter-text", success=False, steps=2)]
    with tracker.stage_run("evaluation", {"n": 2}) as run:
        assert log_episode_traces(run, run.run_id, eps, stage="evaluation") == 2
    with tracker.stage_run("rollouts", {}) as other:
        pass
    assert run_trace_count(tracker, run.run_id) == 2
    assert run_trace_count(tracker.client, other.run_id) == 0

    traces = tracker.client.search_traces(locations=[tracker.experiment_id()], run_id=run.run_id,
                                          order_by=["timestamp_ms ASC"])
    assert len(traces) == 2
    first = traces[0]
    assert first.info.trace_metadata["mlflow.sourceRun"] == run.run_id
    assert first.info.tags["dpo.task"] == "click-button" and first.info.tags["dpo.item"] == "1000"
    assert first.info.tags["dpo.success"] == "true" and first.info.tags["dpo.score"] == "1.0"
    assert first.info.tags["dpo.stage"] == "evaluation" and first.info.tags["dpo.episode_id"] == "dpo:click-button:1000:0"
    assert first.info.state.value == "OK"
    feedback = {a.name: a.value for a in first.info.assessments}
    assert feedback == {"dpo.success": True, "dpo.score": 1.0}
    assert {a.name: a.value for a in traces[1].info.assessments} == {"dpo.success": False, "dpo.score": -0.25}
    root = next(s for s in first.data.spans if s.parent_id is None)
    assert root.name == "dpo click-button seed 1000 #0"
    assert root.inputs == {"prompt": "click-button seed 1000 state 0"}
    assert root.outputs == {"success": True, "reward": 1.0, "num_steps": 3}
    assert root.get_attribute("dpo.policy") == "dpo" and root.get_attribute("dpo.seed") == 1000
    steps = sorted((s for s in first.data.spans if s.parent_id == root.span_id), key=lambda s: s.start_time_ns)
    assert [s.name for s in steps] == ["step 0", "step 1", "step 2"]
    assert steps[1].inputs == {"prompt": "click-button seed 1000 state 1"}
    assert steps[1].outputs == {"output": " click(1) ", "action": None}
    assert steps[1].get_attribute("dpo.valid") is False and steps[2].get_attribute("dpo.done") is True
    assert steps[2].get_attribute("dpo.reward") == 1.0 and steps[0].get_attribute("dpo.step") == 0
    assert all(a.end_time_ns <= b.start_time_ns for a, b in zip(steps, steps[1:]))
    assert root.start_time_ns <= steps[0].start_time_ns and steps[-1].end_time_ns <= root.end_time_ns

    # The logged-traces importer reads them back as episodes with the same outcome and steps.
    back = load_mlflow_traces(tracker.experiment, tracker.tracking_uri)
    assert [(b["task"], b["item"], b["success"], b["reward"]) for b in back] == [
        ("click-button", "1000", True, 1.0), ("enter-text", "1001", False, -0.25)]
    for b, e in zip(back, eps):
        # An unparsed step (action None) comes back with the importer's default action, the stripped output.
        assert [(s["prompt"], s["output"], s["action"], s["valid"], s["reward"]) for s in b["steps"]] == [
            (s["prompt"], s["output"], s["action"] or s["output"].strip(), s["valid"], s["reward"]) for s in e["steps"]]


def test_error_episode_and_numpy_values(make_tracker, isolated_mlflow):
    np = pytest.importorskip("numpy")
    tracker = make_tracker()
    ep = episode(3, success=False, steps=1)
    ep |= {"seed": np.int64(1003), "reward": np.float64(0.0), "env_error": True, "error": "browser died"}
    ep["steps"][0]["reward"] = float("nan")
    with tracker.stage_run("evaluation", {}) as run:
        pass
    assert log_episode_traces(tracker.tracking_uri, run.run_id, [ep]) == 1
    (trace,) = tracker.client.search_traces(locations=[tracker.experiment_id()], run_id=run.run_id)
    assert trace.info.state.value == "ERROR"
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.outputs["error"] == "browser died" and root.outputs["env_error"] is True
    assert root.status.description == "browser died"
    assert trace.info.tags["dpo.item"] == "1003"


def test_fifty_traces_are_fast_and_sampled(make_tracker, isolated_mlflow):
    tracker = make_tracker()
    eps = [episode(i, task=f"task{i % 4}", success=i % 3 == 0) for i in range(120)]
    with tracker.stage_run("rollouts", {}) as run:
        pass
    t0 = time.perf_counter()
    assert log_episode_traces(tracker, run.run_id, eps, max_traces=50) == 50
    seconds = time.perf_counter() - t0
    print(f"50 traces x 3 steps: {seconds:.2f} s")
    assert seconds < 20  # ~1.5 s on a loaded 2-core machine; generous for CI
    assert run_trace_count(tracker, run.run_id) == 50


# --- Dagster markdown ---


def test_embed_png_markdown_decodes_to_the_png(tmp_path):
    import pandas as pd

    frame = pd.DataFrame([{"policy": p, "task": "t", "seed": s, "success": (s + (p == "dpo")) % 2 == 0}
                          for p in ("sft", "dpo") for s in range(6)])
    png = plot_report(build_report(frame, n_boot=200), tmp_path / "plot.png")
    md = embed_png_markdown(png, "success by task [95% CI]")
    m = re.fullmatch(r"!\[(.*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert m is not None
    assert m.group(1) == r"success by task \[95% CI\]"
    assert base64.b64decode(m.group(2)) == png.read_bytes()


def test_embed_png_markdown_refuses_non_png_and_big(tmp_path):
    (tmp_path / "x.png").write_bytes(b"GIF89a...")
    with pytest.raises(ValueError, match="not a PNG"):
        embed_png_markdown(tmp_path / "x.png")
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    with pytest.raises(ValueError, match="over the 50 bytes"):
        embed_png_markdown(tmp_path / "big.png", max_bytes=50)
