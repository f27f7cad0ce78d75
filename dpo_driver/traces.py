"""A team's logged agent traces as episodes: the self-improving loop's input.

Logged traces (a JSONL file, or MLflow 3 traces) with outcome scores become episode records in the
format `rollouts.py` writes, so the pairs stage, its gates, DPO and evaluation treat them like the
pipeline's own rollouts: a success and a failure from the same starting item are paired at the
first step where their outputs differ from the same prompt.

JSONL schema, one episode per line (blank lines skipped, unknown keys ignored)::

    {"trace_id": str,            # unique in the file; kept in the episode record
     "task": str,                # any task name: nothing here is tied to MiniWoB++
     "item": str | int,          # the state/item the episode started from; same task + item = siblings
     "success": bool,            # the outcome the pairs stage pairs on
     "score": float,             # optional outcome score (episode `reward`); default 1.0/0.0 from success
     "steps": [                  # non-empty, in order
        {"prompt": str,          # what the agent saw at this step
         "output": str,          # the completion it produced
         "action": str | null,   # optional canonical action; default: output stripped
         "valid": bool,          # optional: the output could be applied; default true
         "reward": float,        # optional step reward; default: score on the last step, 0.0 before
         "seconds": float}]}     # optional

MLflow: one trace per episode, see `load_mlflow_traces` for the expected shape.

Seeds: the pairs stage groups by (task, seed) and refuses evaluation seeds, so every episode gets a
seed in the *rollout* band derived from (task, str(item)) by SHA-1 (`trace_seed`): stable across
runs and machines, identical for the item 7 and "7" (an MLflow tag is always a string), and never an
evaluation or demo seed. Two different items of one task can share a seed (about n^2 / 2e6 of n
items); the pairs stage still only pairs steps with identical prompts, so such a collision merges
two groups but never pairs different states. `import_traces` reports the count.

Errors: every record is validated before anything is returned or written; the first problem raises
ValueError naming the file and line (or the MLflow trace id) and the field, e.g.
`trace file logs.jsonl line 7: steps[2].output: expected a string, got int`.

CLI: `python -m dpo_driver.traces import FILE --out episodes.jsonl` or
`python -m dpo_driver.traces import --mlflow EXPERIMENT --tracking-uri URI --out episodes.jsonl`;
exit code 2 with the message on bad input, and nothing written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpo_driver.io import atomic_write_jsonl, jsonl_rows
from dpo_driver.tasks import BAND, SPLIT_BANDS

POLICY = "traces"

# MLflow trace tags (set with mlflow.update_current_trace(tags=...) or MlflowClient.set_trace_tag).
TAG_TASK, TAG_ITEM, TAG_SUCCESS, TAG_SCORE = "dpo.task", "dpo.item", "dpo.success", "dpo.score"
# Optional attributes of a step span (span.set_attribute).
ATTR_ACTION, ATTR_VALID, ATTR_REWARD = "dpo.action", "dpo.valid", "dpo.reward"

Parse = Callable[[str], Any]  # completion -> environment.Parsed (`.action`, `.ok`)


def trace_seed(task: str, item: str | int) -> int:
    """A stable rollout-band seed for the state `item` of `task` (SHA-1, never Python's hash())."""
    digest = hashlib.sha1(f"{task}\x00{item}".encode()).digest()
    return SPLIT_BANDS["rollout"] * BAND + int.from_bytes(digest[:8], "big") % BAND


# --- validation: one raw record (a JSONL line, or an MLflow trace made into the same shape) ---


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(row: dict, key: str, where: str, field: str | None = None):
    if key not in row:
        raise ValueError(f"{where}: {field or key}: missing")
    return row[key]


def _string(value: Any, where: str, field: str, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field}: expected a string, got {_kind(value)}")
    if not empty_ok and not value.strip():
        raise ValueError(f"{where}: {field}: empty string")
    return value


def _number(value: Any, where: str, field: str) -> float:
    if not _is_number(value):
        raise ValueError(f"{where}: {field}: expected a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: {field}: expected a finite number, got {value}")
    return float(value)


def _bool(value: Any, where: str, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {field}: expected true or false, got {_kind(value)}")
    return value


def _step(raw: Any, i: int, last: bool, score: float, where: str, parse: Parse | None) -> dict:
    field = f"steps[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: {field}: expected an object, got {_kind(raw)}")
    prompt = _string(_require(raw, "prompt", where, f"{field}.prompt"), where, f"{field}.prompt")
    output = _string(_require(raw, "output", where, f"{field}.output"), where, f"{field}.output", empty_ok=True)
    action = raw.get("action")
    if action is not None:
        action = _string(action, where, f"{field}.action")
    valid = _bool(raw["valid"], where, f"{field}.valid") if "valid" in raw else True
    reward = _number(raw["reward"], where, f"{field}.reward") if raw.get("reward") is not None else (score if last else 0.0)
    seconds = _number(raw["seconds"], where, f"{field}.seconds") if raw.get("seconds") is not None else 0.0
    if parse is not None:
        try:
            parsed = parse(output)
        except Exception as e:  # a parser bug or an unreadable output: name the step it failed on
            raise ValueError(f"{where}: {field}.output: parser failed: {e}") from e
        action = parsed.action if parsed.ok else None
        valid = valid and bool(parsed.ok)
    elif action is None:
        action = output.strip()
    return {"step": i, "prompt": prompt, "output": output, "action": action, "valid": valid,
            "reward": reward, "done": last, "seconds": seconds}


def _episode_fields(row: Any, where: str, parse: Parse | None) -> dict:
    """Validate one raw record; return the episode fields (everything but seed/sample/episode_id)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_kind(row)}")
    trace_id = _string(_require(row, "trace_id", where), where, "trace_id")
    task = _string(_require(row, "task", where), where, "task")
    item = _require(row, "item", where)
    if isinstance(item, str):
        _string(item, where, "item")
    elif not isinstance(item, int) or isinstance(item, bool):
        raise ValueError(f"{where}: item: expected a string or an integer, got {_kind(item)}")
    success = _bool(_require(row, "success", where), where, "success")
    score = _number(row["score"], where, "score") if row.get("score") is not None else float(success)
    steps = _require(row, "steps", where)
    if not isinstance(steps, list):
        raise ValueError(f"{where}: steps: expected a list, got {_kind(steps)}")
    if not steps:
        raise ValueError(f"{where}: steps: empty; an episode needs at least one step")
    parsed = [_step(s, i, i == len(steps) - 1, score, where, parse) for i, s in enumerate(steps)]
    return {
        "success": success, "reward": score, "raw_reward": score, "truncated": False,
        "invalid": any(not s["valid"] for s in parsed), "env_error": False, "error": None,
        "num_steps": len(parsed), "steps": parsed,
        "wall_seconds": round(sum(s["seconds"] for s in parsed), 4),
        "trace_id": trace_id, "item": item, "task": task,
    }


def _assemble(fields: list[dict], sources: list[str]) -> list[dict]:
    """Episode records in input order: a rollout-band seed per (task, item), `sample` numbering the
    episodes that share (task, seed), in input order. `episode_id` is "traces:<trace_id>", so a
    pair's chosen/rejected episode names the logged trace it came from."""
    episodes, counter = [], {}
    for f, source in zip(fields, sources):
        task = f.pop("task")
        seed = trace_seed(task, f["item"])
        sample = counter.get((task, seed), 0)
        counter[(task, seed)] = sample + 1
        episodes.append({"episode_id": f"{POLICY}:{f['trace_id']}", "policy": POLICY, "task": task,
                         "seed": seed, "sample": sample, **f, "source": source})
    return episodes


def load_trace_jsonl(path: Path | str, parse: Parse | None = None) -> list[dict]:
    """Read and validate a trace JSONL (schema in the module docstring) into episode records.

    `parse(output) -> Parsed` (optional) fills each step's canonical `action` (None when it does not
    parse) and marks unparsable steps invalid. Every line is validated before anything is returned.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist")
    fields, sources, first_line = [], [], {}
    for n, where, row in jsonl_rows(path, "trace file"):
        ep = _episode_fields(row, where, parse)
        if ep["trace_id"] in first_line:
            raise ValueError(f"{where}: trace_id: {ep['trace_id']!r} already used on line {first_line[ep['trace_id']]}")
        first_line[ep["trace_id"]] = n
        fields.append(ep)
        sources.append(f"{path}:{n}")
    if not fields:
        raise ValueError(f"trace file {path} holds no traces")
    return _assemble(fields, sources)


# --- MLflow ---


def _truthy(value: Any, where: str, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if _is_number(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{where}: {field}: expected true or false, got {value!r}")


def _latest_feedback(trace, name: str):
    """The value of the newest valid assessment called `name` on the trace, else None."""
    found = [a for a in (getattr(trace.info, "assessments", None) or [])
             if a.name == name and getattr(a, "valid", True) is not False and getattr(a, "value", None) is not None]
    return max(found, key=lambda a: a.create_time_ms or 0).value if found else None


def _text(value: Any, key: str) -> Any:
    """A span's inputs/outputs as text: a bare string, or the `key` entry of a dict."""
    if isinstance(value, dict):
        return value.get(key)
    return value


def _trace_row(trace, where: str, step_name: str | None) -> dict:
    """An MLflow trace in the JSONL record shape, so one validator serves both sources."""
    tags = trace.info.tags or {}
    row: dict[str, Any] = {"trace_id": trace.info.trace_id}
    for key, tag in (("task", TAG_TASK), ("item", TAG_ITEM)):
        if tag not in tags:
            raise ValueError(f"{where}: tags.{tag}: missing")
        row[key] = tags[tag]
    success = _latest_feedback(trace, TAG_SUCCESS)
    success = success if success is not None else tags.get(TAG_SUCCESS)
    if success is None:
        raise ValueError(f"{where}: tags.{TAG_SUCCESS}: missing (set the tag, or log a feedback named {TAG_SUCCESS})")
    row["success"] = _truthy(success, where, TAG_SUCCESS)
    score = _latest_feedback(trace, TAG_SCORE)
    score = score if score is not None else tags.get(TAG_SCORE)
    if score is not None:
        try:
            row["score"] = float(score)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {TAG_SCORE}: expected a number, got {score!r}") from None
    spans = list(trace.data.spans) if trace.data else []
    roots = [s for s in spans if s.parent_id is None]
    if len(roots) != 1:
        raise ValueError(f"{where}: spans: expected one root span, found {len(roots)}")
    if step_name is None:
        chosen = [s for s in spans if s.parent_id == roots[0].span_id]
    else:
        chosen = [s for s in spans if s.name == step_name and s.parent_id is not None]
    steps = []
    for i, s in enumerate(sorted(chosen, key=lambda s: (s.start_time_ns or 0, s.span_id))):
        step = {"prompt": _text(s.inputs, "prompt"), "output": _text(s.outputs, "output")}
        for key, side, raw in (("prompt", "inputs", s.inputs), ("output", "outputs", s.outputs)):
            if not isinstance(step[key], str):
                raise ValueError(f"{where}: steps[{i}].{key}: span {s.name!r} {side}: expected a string or an object "
                                 f"with a string {key!r}, got {_kind(raw)}")
        for key, attr in (("action", ATTR_ACTION), ("valid", ATTR_VALID), ("reward", ATTR_REWARD)):
            value = s.get_attribute(attr)
            if value is not None:
                step[key] = value
        steps.append(step)
    row["steps"] = steps
    return row


def load_mlflow_traces(
    experiment: str,
    tracking_uri: str | None = None,
    *,
    filter_string: str | None = None,
    max_results: int | None = None,
    step_name: str | None = None,
    parse: Parse | None = None,
    page_size: int = 500,
) -> list[dict]:
    """Read MLflow 3 traces of one experiment (an id or a name) as episode records.

    Expected shape of a trace (one agent episode):

    * trace tags `dpo.task` (str), `dpo.item` (the starting item/state id), `dpo.success`
      ("true"/"false"), optional `dpo.score` (a number, the outcome score; default 1.0/0.0);
      a feedback assessment named `dpo.success` or `dpo.score` (`mlflow.log_feedback`), when
      present, overrides the tag: the scorer's later judgment wins.
    * one root span, and one span per step: by default every direct child of the root, or with
      `step_name` every span of that name; ordered by start time. A step span's inputs are the
      prompt (a string, or a dict with key "prompt"), its outputs the completion (a string, or a
      dict with key "output"); optional span attributes `dpo.action`, `dpo.valid`, `dpo.reward`.

    Traces are read oldest first (then by trace id), so `sample` numbers are stable. Every trace
    is validated before anything is returned; a bad one raises ValueError naming its id and field.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            exp = client.get_experiment(str(experiment))
        except MlflowException:
            exp = None
    if exp is None:
        raise ValueError(f"MLflow experiment {experiment!r} not found (by name or id) in {client.tracking_uri}")
    traces, token = [], None
    while max_results is None or len(traces) < max_results:
        want = page_size if max_results is None else min(page_size, max_results - len(traces))
        try:
            page = client.search_traces(locations=[exp.experiment_id], filter_string=filter_string, max_results=want,
                                        order_by=["timestamp_ms ASC"], page_token=token, flush=token is None)
        except MlflowException as e:
            raise ValueError(f"MLflow experiment {exp.name!r}: searching traces failed: {e.message}") from e
        traces.extend(page)
        token = page.token
        if not token:
            break
    traces.sort(key=lambda t: (t.info.request_time or 0, t.info.trace_id))
    if not traces:
        raise ValueError(f"MLflow experiment {exp.name!r} ({exp.experiment_id}) holds no traces"
                         + (f" matching {filter_string!r}" if filter_string else ""))
    fields, sources = [], []
    for t in traces:
        where = f"mlflow trace {t.info.trace_id}"
        fields.append(_episode_fields(_trace_row(t, where, step_name), where, parse))
        sources.append(f"mlflow:{exp.experiment_id}/{t.info.trace_id}")
    return _assemble(fields, sources)


# --- import ---


def summarize(episodes: list[dict]) -> dict:
    """Counts for an import: episodes, outcomes, and how many items can yield a pair."""
    outcomes: dict[tuple, set] = {}
    items_per_seed: dict[tuple, set] = {}
    for ep in episodes:
        outcomes.setdefault((ep["task"], str(ep["item"])), set()).add(bool(ep["success"]))
        items_per_seed.setdefault((ep["task"], ep["seed"]), set()).add(str(ep["item"]))
    return {
        "episodes": len(episodes),
        "successes": sum(1 for e in episodes if e["success"]),
        "failures": sum(1 for e in episodes if not e["success"]),
        "steps": sum(e["num_steps"] for e in episodes),
        "tasks": len({e["task"] for e in episodes}),
        "items": len(outcomes),
        "items_with_both": sum(1 for v in outcomes.values() if len(v) == 2),
        "seed_collisions": sum(len(v) - 1 for v in items_per_seed.values()),
    }


def import_traces(
    src: Path | str | None,
    out_path: Path | str,
    *,
    parse: Parse | None = None,
    mlflow_experiment: str | None = None,
    tracking_uri: str | None = None,
    **mlflow_kwargs,
) -> dict:
    """Load traces from a JSONL file `src`, or from `mlflow_experiment` (with `src` None), and write
    the episodes to `out_path` atomically. Returns `summarize`'s counts plus the output path. On any
    error nothing is written: a previous `out_path` is left as it was."""
    if (src is None) == (mlflow_experiment is None):
        raise ValueError("give either a trace JSONL file or an MLflow experiment, not both or neither")
    if src is not None:
        episodes = load_trace_jsonl(src, parse=parse)
    else:
        episodes = load_mlflow_traces(mlflow_experiment, tracking_uri, parse=parse, **mlflow_kwargs)
    out = atomic_write_jsonl(Path(out_path), episodes)
    return {**summarize(episodes), "path": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_driver.traces", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="turn logged traces into an episodes JSONL the pairs stage accepts")
    imp.add_argument("file", nargs="?", help="trace JSONL (schema: pydoc dpo_driver.traces)")
    imp.add_argument("--mlflow", metavar="EXPERIMENT", help="read MLflow traces of this experiment (name or id) instead")
    imp.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's own, e.g. $MLFLOW_TRACKING_URI)")
    imp.add_argument("--filter", help="MLflow search_traces filter string")
    imp.add_argument("--step-name", help="MLflow: spans of this name are the steps (default: the root's children)")
    imp.add_argument("--out", required=True, help="episodes JSONL to write")
    args = parser.parse_args(argv)
    extra = {}
    if args.filter:
        extra["filter_string"] = args.filter
    if args.step_name:
        extra["step_name"] = args.step_name
    try:
        if extra and not args.mlflow:
            raise ValueError("--filter and --step-name apply to --mlflow imports only")
        counts = import_traces(args.file, args.out, mlflow_experiment=args.mlflow, tracking_uri=args.tracking_uri, **extra)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
