"""Logged agent traces (JSONL, MLflow) imported as episodes the pairs stage accepts."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from dpo_driver.pairs import PairParams, ScoreWeights, build_preference_pairs
from dpo_driver.tasks import BAND, split_of
from dpo_driver.traces import import_traces, load_mlflow_traces, load_trace_jsonl, main, trace_seed


def _trace(trace_id, item, success, outputs, task="support", **extra):
    return {"trace_id": trace_id, "task": task, "item": item, "success": success,
            "steps": [{"prompt": f"{task} {item} state {i}", "output": o} for i, o in enumerate(outputs)], **extra}


# item 1: both runs search first, then answer differently (pair at step 1); item "q2": one step
# each (pair at step 0); item 3: a failure alone (no pair).
TRACES = [
    _trace("t1", 1, True, ["search docs", "  answer A "]),
    _trace("t2", 1, False, ["search docs", "answer B"], score=0.1),
    _trace("t3", "q2", False, ["guess"]),
    _trace("t4", "q2", True, ["ask a clarifying question"], score=0.9),
    _trace("t5", 3, False, ["give up"]),
]


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _pairs(episodes):
    return build_preference_pairs(episodes, PairParams(rejected_must_parse=False), ScoreWeights())


def test_jsonl_traces_become_episodes_that_pair(tmp_path):
    episodes = load_trace_jsonl(_write(tmp_path / "traces.jsonl", TRACES))
    assert [e["episode_id"] for e in episodes] == ["traces:t1", "traces:t2", "traces:t3", "traces:t4", "traces:t5"]
    t1, t2, t3, t4, t5 = episodes
    assert t1["policy"] == "traces" and t1["trace_id"] == "t1" and t1["item"] == 1
    assert (t1["reward"], t2["reward"], t3["reward"], t4["reward"]) == (1.0, 0.1, 0.0, 0.9)  # score, or from success
    assert (t1["sample"], t2["sample"], t3["sample"], t4["sample"], t5["sample"]) == (0, 1, 0, 1, 0)
    assert t1["seed"] == t2["seed"] == trace_seed("support", 1) != t3["seed"]
    assert t1["num_steps"] == 2 and not t1["invalid"] and not t1["env_error"] and not t1["truncated"]
    assert t1["steps"][1] == {"step": 1, "prompt": "support 1 state 1", "output": "  answer A ", "action": "answer A",
                              "valid": True, "reward": 1.0, "done": True, "seconds": 0.0}
    assert t1["steps"][0]["done"] is False and t1["steps"][0]["reward"] == 0.0

    pairs = _pairs(episodes)
    got = {(r.seed, r.step, r.chosen, r.rejected, r.chosen_episode, r.rejected_episode) for r in pairs.itertuples()}
    assert got == {
        (trace_seed("support", 1), 1, "answer A", "answer B", "traces:t1", "traces:t2"),
        (trace_seed("support", "q2"), 0, "ask a clarifying question", "guess", "traces:t4", "traces:t3"),
    }
    assert set(pairs["prompt"]) == {"support 1 state 1", "support q2 state 0"}


def test_seeds_are_rollout_band_and_stable():
    seeds = [trace_seed(task, item) for task in ("support", "sql", "x") for item in range(300)]
    assert {split_of(s) for s in seeds} == {"rollout"}
    assert all(BAND <= s < 2 * BAND for s in seeds)
    # pinned: SHA-1 of "task\0item", not Python's per-process hash(); an int item and its string agree
    assert trace_seed("support", 1) == trace_seed("support", "1") == 1113259
    assert trace_seed("x", "y") == 1764403
    assert trace_seed("support", 1) != trace_seed("billing", 1)


def test_parse_fills_canonical_action_and_validity(tmp_path):
    @dataclass
    class Parsed:  # the shape of dpo_driver.environment.Parsed
        action: str | None
        error: str = ""

        @property
        def ok(self):
            return self.action is not None

    def parse(text):
        return Parsed(text.strip().upper()) if text.strip().startswith(("search", "answer")) else Parsed(None, "no verb")

    episodes = load_trace_jsonl(_write(tmp_path / "t.jsonl", TRACES[:3]), parse=parse)
    assert [s["action"] for s in episodes[0]["steps"]] == ["SEARCH DOCS", "ANSWER A"]
    assert not episodes[0]["invalid"]
    assert episodes[2]["steps"][0] == {**episodes[2]["steps"][0], "action": None, "valid": False}
    assert episodes[2]["invalid"]


def test_explicit_step_fields_are_kept(tmp_path):
    row = _trace("t1", "a", False, ["x", "y"])
    row["steps"][0].update(action="canon x", valid=False, reward=0.5, seconds=1.25)
    (ep,) = load_trace_jsonl(_write(tmp_path / "t.jsonl", [row]))
    assert ep["steps"][0] == {"step": 0, "prompt": "support a state 0", "output": "x", "action": "canon x",
                              "valid": False, "reward": 0.5, "done": False, "seconds": 1.25}
    assert ep["invalid"] and ep["wall_seconds"] == 1.25


def _broken_step_type():
    row = _trace("b", 1, True, ["a", "b"])
    row["steps"][1]["output"] = 7
    return row


@pytest.mark.parametrize("bad, field", [
    ('{"trace_id": "b", "task": ', "not valid JSON"),
    ({k: v for k, v in _trace("b", 1, True, ["a"]).items() if k != "success"}, "success: missing"),
    (_broken_step_type(), "steps[1].output: expected a string, got int"),
    (_trace("b", 1, True, []), "steps: empty"),
    ({**_trace("b", 1, True, ["a"]), "steps": [{"output": "a"}]}, "steps[0].prompt: missing"),
    ({**_trace("b", 1, True, ["a"]), "item": 1.5}, "item: expected a string or an integer, got float"),
    ({**_trace("b", 1, True, ["a"]), "success": "yes"}, "success: expected true or false, got str"),
    ({**_trace("b", 1, True, ["a"]), "score": True}, "score: expected a number, got bool"),
    (_trace("t1", 9, True, ["a"]), "trace_id: 't1' already used on line 1"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_bad_line_names_file_line_field_and_writes_nothing(tmp_path, capsys, bad, field):
    src = _write(tmp_path / "traces.jsonl", [TRACES[0], "", bad])  # the bad record is on line 3
    out = tmp_path / "out" / "episodes.jsonl"
    with pytest.raises(ValueError) as err:
        import_traces(src, out)
    assert str(err.value).startswith(f"trace file {src} line 3: ")
    assert field in str(err.value)
    assert not out.exists() and not out.parent.exists()

    out.parent.mkdir()
    out.write_text("previous\n")
    assert main(["import", str(src), "--out", str(out)]) == 2
    assert "line 3: " in capsys.readouterr().err
    assert out.read_text() == "previous\n"  # left as it was


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_trace_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="holds no traces"):
        load_trace_jsonl(_write(tmp_path / "empty.jsonl", [""]))


def test_cli_import_writes_episodes_and_counts(tmp_path, capsys):
    src, out = _write(tmp_path / "traces.jsonl", TRACES), tmp_path / "eps" / "episodes.jsonl"
    assert main(["import", str(src), "--out", str(out)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts == {"episodes": 5, "successes": 2, "failures": 3, "steps": 7, "tasks": 1, "items": 3,
                      "items_with_both": 2, "seed_collisions": 0, "path": str(out)}
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == load_trace_jsonl(src)  # JSON-clean, and the same on a second run
    assert len(_pairs(written)) == 2


# --- MLflow ---


def _log_trace(mlflow, item, success, outputs, task="support", score=None, tags=None, feedback=None):
    with mlflow.start_span(name="agent") as root:
        trace_tags = {"dpo.task": task, "dpo.item": str(item)}
        if success is not None:
            trace_tags["dpo.success"] = str(success).lower()
        if score is not None:
            trace_tags["dpo.score"] = str(score)
        mlflow.update_current_trace(tags={**trace_tags, **(tags or {})})
        for i, out in enumerate(outputs):
            with mlflow.start_span(name=f"llm-{i}") as span:
                span.set_inputs({"prompt": f"{task} {item} state {i}", "history": []})
                span.set_outputs({"output": out} if i % 2 == 0 else out)  # a dict or a bare string
                with mlflow.start_span(name="tool"):  # nested spans are not steps
                    pass
        trace_id = root.trace_id
    if feedback:
        mlflow.flush_trace_async_logging()
        for name, value in feedback.items():
            mlflow.log_feedback(trace_id=trace_id, name=name, value=value)
    return trace_id


@pytest.fixture
def mlflow_store(migrated_db, tmp_path, monkeypatch):
    """A fresh SQLite tracking store, and MLflow's process-global fluent state restored afterwards."""
    import mlflow
    import mlflow.tracking._tracking_service.utils as tracking_utils
    import mlflow.tracking.fluent as fluent

    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    # set_tracking_uri and set_experiment also export MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID (for
    # subprocesses). setenv first records each variable's state before the test, so that whatever
    # MLflow sets is undone afterwards instead of leaking into the next test file.
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")  # each async flush waits ~1 s
    mlflow.set_tracking_uri(uri)  # resets the tracer provider, which reads the variable above

    def experiment(name: str) -> str:
        exp_id = mlflow.MlflowClient(uri).create_experiment(name, artifact_location=(tmp_path / "artifacts" / name).as_uri())
        mlflow.set_experiment(experiment_id=exp_id)
        return exp_id

    yield mlflow, uri, experiment
    from mlflow.tracing.provider import reset

    reset()  # the tracer provider holds this store's URI; the next user sets it up afresh


def test_mlflow_traces_round_trip(mlflow_store, tmp_path):
    mlflow, uri, experiment = mlflow_store
    exp_id = experiment("agent-logs")
    ids = [
        _log_trace(mlflow, 1, True, ["search docs", "answer A"]),
        _log_trace(mlflow, 1, False, ["search docs", "answer B"], score=0.2),
        _log_trace(mlflow, "q2", None, ["guess"], feedback={"dpo.success": False}),
        # the scorer's feedback overrides the agent's own tags
        _log_trace(mlflow, "q2", False, ["ask a clarifying question"], score=0.0,
                   feedback={"dpo.success": True, "dpo.score": 0.75}),
    ]
    episodes = load_mlflow_traces("agent-logs", uri)
    assert episodes == load_mlflow_traces(exp_id, uri)  # by name or id, stable order
    assert [e["trace_id"] for e in episodes] == ids
    assert [e["success"] for e in episodes] == [True, False, False, True]
    assert [e["reward"] for e in episodes] == [1.0, 0.2, 0.0, 0.75]
    assert [e["item"] for e in episodes] == ["1", "1", "q2", "q2"]
    assert episodes[0]["seed"] == trace_seed("support", 1) and split_of(episodes[0]["seed"]) == "rollout"
    assert [s["output"] for s in episodes[0]["steps"]] == ["search docs", "answer A"]
    assert episodes[0]["steps"][0]["prompt"] == "support 1 state 0"
    assert episodes[0]["source"] == f"mlflow:{exp_id}/{ids[0]}"

    pairs = _pairs(episodes)
    assert {(r.step, r.chosen, r.rejected, r.chosen_episode) for r in pairs.itertuples()} == {
        (1, "answer A", "answer B", f"traces:{ids[0]}"),
        (0, "ask a clarifying question", "guess", f"traces:{ids[3]}"),
    }

    out = tmp_path / "mlflow-episodes.jsonl"
    assert main(["import", "--mlflow", "agent-logs", "--tracking-uri", uri, "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == episodes


def test_mlflow_trace_missing_a_tag_names_trace_and_field(mlflow_store, tmp_path):
    mlflow, uri, experiment = mlflow_store
    experiment("bad-logs")
    _log_trace(mlflow, 1, True, ["a"])
    bad = _log_trace(mlflow, 2, None, ["b"])  # no dpo.success tag and no feedback
    out = tmp_path / "episodes.jsonl"
    with pytest.raises(ValueError, match=rf"mlflow trace {bad}: tags\.dpo\.success: missing"):
        import_traces(None, out, mlflow_experiment="bad-logs", tracking_uri=uri)
    assert not out.exists()
    with pytest.raises(ValueError, match="not found"):
        load_mlflow_traces("no-such-experiment", uri)


def test_mlflow_step_spans_by_name_and_a_span_without_outputs(mlflow_store):
    mlflow, uri, experiment = mlflow_store
    experiment("named-steps")
    with mlflow.start_span(name="agent") as root:
        mlflow.update_current_trace(tags={"dpo.task": "sql", "dpo.item": "7", "dpo.success": "1"})
        with mlflow.start_span(name="plan"):  # the steps are nested one level down
            for i in range(2):
                with mlflow.start_span(name="llm") as span:
                    span.set_inputs(f"prompt {i}")
                    span.set_outputs(f"output {i}")
                    span.set_attribute("dpo.valid", i == 0)
    (ep,) = load_mlflow_traces("named-steps", uri, step_name="llm")
    assert [(s["prompt"], s["output"], s["valid"]) for s in ep["steps"]] == [("prompt 0", "output 0", True), ("prompt 1", "output 1", False)]
    assert ep["invalid"] and ep["success"] and ep["trace_id"] == root.trace_id and ep["seed"] == trace_seed("sql", 7)
    # by default the steps are the root's children: "plan" has no prompt
    with pytest.raises(ValueError, match=rf"mlflow trace {root.trace_id}: steps\[0\]\.prompt: span 'plan' inputs"):
        load_mlflow_traces("named-steps", uri)
