"""Episodes as MLflow 3 traces: one trace per episode, one span per step, linked to a stage's run.

MLflow's trace view is made for agent steps: a trace logged here shows, under the run's Traces tab
and the experiment's, the episode as a root span (inputs: the first prompt; outputs: success,
reward, number of steps) with one child span per step (inputs: the prompt; outputs: the completion
and the parsed action; attributes: reward, valid, done, step).

Trace tags are the ones `dpo_driver.traces.load_mlflow_traces` reads (`dpo.task`, `dpo.item` =
the seed, `dpo.success`, `dpo.score` = the reward; the last two also as CODE feedback assessments,
which the UI shows as columns and in the trace view) and step spans carry `dpo.action`, `dpo.valid`,
`dpo.reward`, so logged episodes can be re-imported as logged traces.

No global MLflow state is touched: MLflow's fluent tracing (`mlflow.start_span`,
`MlflowClient.start_trace`) exports through a process-wide tracer provider bound to the global
tracking URI and active experiment/run. Here each trace is built whole (its episode already
finished) and written with a `TracingClient` bound to the tracker's URI: one `start_trace` per
trace and one batched `log_spans` for all spans, synchronously, so nothing is pending when this
returns and no async-logging setting matters.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections import defaultdict
from typing import Any, Iterable

from mlflow.entities import AssessmentSource, AssessmentSourceType, Feedback, SpanType, TraceInfo, TraceLocation, TraceState
from mlflow.entities.span import Span
from mlflow.tracing.constant import (
    TRACE_REQUEST_ID_PREFIX,
    TRACE_SCHEMA_VERSION,
    TRACE_SCHEMA_VERSION_KEY,
    SpanAttributeKey,
    TraceMetadataKey,
    TraceTagKey,
)

from dpo_driver.traces import ATTR_ACTION, ATTR_REWARD, ATTR_VALID, TAG_ITEM, TAG_SCORE, TAG_SUCCESS, TAG_TASK

# Extra tags/attributes (the importer ignores them; they make traces searchable and explainable).
TAG_POLICY, TAG_EPISODE, TAG_SAMPLE, TAG_STAGE = "dpo.policy", "dpo.episode_id", "dpo.sample", "dpo.stage"
ATTR_STEP, ATTR_DONE, ATTR_SECONDS = "dpo.step", "dpo.done", "dpo.seconds"
PREVIEW_CHARS = 1000  # request/response previews in the trace list; the spans keep the full text
_MIN_STEP_NS = 1_000  # steps with 0 s still get increasing start times, so their order survives


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and the like (episodes read back through pandas)."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _dump(value: Any) -> str:
    return json.dumps(value, default=_plain, ensure_ascii=False)


def _clean(value: Any) -> Any:
    """Numpy scalars to Python, NaN to None (JSON has no NaN; MLflow's encoder would write NaN)."""
    value = json.loads(_dump(value)) if not isinstance(value, (str, int, float, bool, type(None))) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sample_episodes(episodes: Iterable[dict], max_traces: int | None = 50, seed: int = 0) -> list[dict]:
    """A deterministic sample of at most `max_traces` episodes, in input order.

    Stratified by (policy, task, success): strata are drawn from in turns, each turn going to the
    stratum with the fewest picks so far, ties broken by the fewest picks of that outcome, of that
    task, of that policy, then by a seeded shuffle; within a stratum episodes are in a seeded
    shuffled order. So a small sample still holds successes and failures, of every task when it
    can. Episodes without steps are left out (a trace needs a step span). None: every episode.
    """
    usable = [(i, ep) for i, ep in enumerate(episodes) if ep.get("steps")]
    if max_traces is None or len(usable) <= max_traces:
        return [ep for _, ep in usable]
    rng = random.Random(seed)
    strata: dict[tuple, list] = defaultdict(list)
    for i, ep in usable:
        strata[(str(ep.get("policy")), str(ep.get("task")), bool(ep.get("success")))].append((i, ep))
    keys = sorted(strata)
    order = {k: n for n, k in enumerate(rng.sample(keys, len(keys)))}
    for k in keys:
        rng.shuffle(strata[k])
    taken: dict[Any, int] = defaultdict(int)  # picks per stratum, per ("outcome", s), ("task", t), ("policy", p)
    chosen = []
    while len(chosen) < max_traces:
        live = [k for k in keys if strata[k]]
        if not live:
            break
        k = min(live, key=lambda k: (taken[k], taken["outcome", k[2]], taken["task", k[1]], taken["policy", k[0]], order[k]))
        chosen.append(strata[k].pop(0))
        for key in (k, ("outcome", k[2]), ("task", k[1]), ("policy", k[0])):
            taken[key] += 1
    return [ep for _, ep in sorted(chosen, key=lambda pair: pair[0])]


def _otel_span(name: str, trace_id: str, otel_trace_id: int, span_id: int, parent_id: int | None, start_ns: int,
               end_ns: int, span_type: str, inputs: Any, outputs: Any, attributes: dict, error: str | None = None) -> Span:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

    def ctx(sid: int) -> SpanContext:
        return SpanContext(trace_id=otel_trace_id, span_id=sid, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))

    # MLflow stores every span attribute JSON-encoded (LiveSpan.set_attribute does the same).
    attrs = {SpanAttributeKey.REQUEST_ID: _dump(trace_id), SpanAttributeKey.SPAN_TYPE: _dump(span_type),
             SpanAttributeKey.INPUTS: _dump(inputs), SpanAttributeKey.OUTPUTS: _dump(outputs)}
    attrs |= {k: _dump(_clean(v)) for k, v in attributes.items()}
    status = Status(StatusCode.ERROR, error) if error else Status(StatusCode.OK)
    return Span(ReadableSpan(name=name, context=ctx(span_id), parent=ctx(parent_id) if parent_id else None,
                             start_time=start_ns, end_time=end_ns, attributes=attrs, status=status,
                             resource=Resource.get_empty()))


def episode_trace(episode: dict, experiment_id: str, run_id: str | None, start_ns: int,
                  stage: str | None = None) -> tuple[TraceInfo, list[Span]]:
    """One finished episode as an MLflow trace (info + spans), starting at `start_ns`.

    Step spans follow each other, each lasting the step's `seconds`; the root lasts the episode's
    `wall_seconds` (at least the steps' sum).
    """
    rng = random.Random(uuid.uuid4().int)  # ids need only be unique, not reproducible
    otel_trace_id = rng.getrandbits(128) or 1
    trace_id = f"{TRACE_REQUEST_ID_PREFIX}{otel_trace_id:032x}"
    root_id = rng.getrandbits(64) or 1
    task, seed, sample = _clean(episode.get("task")), _clean(episode.get("seed")), _clean(episode.get("sample"))
    policy = _clean(episode.get("policy"))
    steps = list(episode.get("steps") or [])
    success, reward = bool(episode.get("success")), _clean(episode.get("reward"))

    spans, t = [], start_ns
    for i, st in enumerate(steps):
        seconds = _clean(st.get("seconds")) or 0.0
        end = t + max(int(seconds * 1e9), _MIN_STEP_NS)
        outputs = {"output": st.get("output"), "action": _clean(st.get("action"))}
        attrs = {ATTR_STEP: st.get("step", i), ATTR_REWARD: st.get("reward"), ATTR_VALID: st.get("valid"),
                 ATTR_DONE: st.get("done"), ATTR_ACTION: st.get("action"), ATTR_SECONDS: seconds}
        spans.append(_otel_span(f"step {st.get('step', i)}", trace_id, otel_trace_id, rng.getrandbits(64) or 1, root_id,
                                t, end, SpanType.LLM, {"prompt": st.get("prompt")}, outputs,
                                {k: v for k, v in attrs.items() if v is not None}))
        t = end
    wall = _clean(episode.get("wall_seconds")) or 0.0
    end_ns = max(t, start_ns + int(wall * 1e9)) + _MIN_STEP_NS
    error = episode.get("error") or ("environment error" if episode.get("env_error") else None)
    first_prompt = steps[0].get("prompt") if steps else None
    outputs = {"success": success, "reward": reward, "num_steps": _clean(episode.get("num_steps", len(steps)))}
    for key in ("truncated", "invalid", "env_error", "error"):
        if episode.get(key):
            outputs[key] = _clean(episode[key])
    root_attrs = {"dpo.task": task, "dpo.seed": seed, "dpo.sample": sample, "dpo.policy": policy,
                  "dpo.episode_id": episode.get("episode_id")}
    name = f"{policy} {task} seed {seed} #{sample}"
    root = _otel_span(name, trace_id, otel_trace_id, root_id, None, start_ns, end_ns, SpanType.AGENT,
                      {"prompt": first_prompt}, outputs, {k: v for k, v in root_attrs.items() if v is not None},
                      error=str(error) if error else None)
    request, response = _dump({"prompt": first_prompt}), _dump(outputs)
    metadata = {TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION),
                TraceMetadataKey.INPUTS: request[:PREVIEW_CHARS], TraceMetadataKey.OUTPUTS: response[:PREVIEW_CHARS]}
    if run_id is not None:
        metadata[TraceMetadataKey.SOURCE_RUN] = run_id  # what the run page's Traces tab and search_traces(run_id=) match
    tags = {TraceTagKey.TRACE_NAME: name, TAG_TASK: str(task), TAG_ITEM: str(seed),
            TAG_SUCCESS: str(success).lower(), TAG_POLICY: str(policy),
            TAG_EPISODE: str(episode.get("episode_id")), TAG_SAMPLE: str(sample)}
    if reward is not None:
        tags[TAG_SCORE] = str(reward)
    if stage is not None:
        tags[TAG_STAGE] = stage
    # The outcome as feedback too: the UI shows assessments as columns of the trace list and in the
    # trace view (the trace's own state only says whether the episode ran without error).
    source = AssessmentSource(source_type=AssessmentSourceType.CODE, source_id="dpo-driver environment reward")
    now_ms = start_ns // 1_000_000
    assessments = [Feedback(name=TAG_SUCCESS, value=success, source=source, trace_id=trace_id, create_time_ms=now_ms,
                            last_update_time_ms=now_ms)]
    if reward is not None:
        assessments.append(Feedback(name=TAG_SCORE, value=float(reward), source=source, trace_id=trace_id,
                                    create_time_ms=now_ms, last_update_time_ms=now_ms))
    info = TraceInfo(trace_id=trace_id, trace_location=TraceLocation.from_experiment_id(experiment_id),
                     request_time=start_ns // 1_000_000, execution_duration=(end_ns - start_ns) // 1_000_000,
                     state=TraceState.ERROR if error else TraceState.OK,
                     request_preview=request[:PREVIEW_CHARS], response_preview=response[:PREVIEW_CHARS],
                     trace_metadata=metadata, tags=tags, assessments=assessments)
    return info, [root, *spans]


def _tracking_uri(tracker_or_client: Any) -> str:
    """A Tracker, a StageRun (its client), an MlflowClient, or a tracking URI string."""
    if isinstance(tracker_or_client, str):
        return tracker_or_client
    uri = getattr(tracker_or_client, "tracking_uri", None)
    if isinstance(uri, str):
        return uri
    client = getattr(tracker_or_client, "client", None)
    if client is not None and isinstance(getattr(client, "tracking_uri", None), str):
        return client.tracking_uri
    raise TypeError(f"expected a Tracker, StageRun, MlflowClient or tracking URI, got {type(tracker_or_client).__name__}")


def log_episode_traces(tracker_or_client: Any, run_id: str, episodes: Iterable[dict], max_traces: int | None = 50,
                       seed: int = 0, stage: str | None = None) -> int:
    """Log a deterministic sample (`sample_episodes`) of `episodes` as MLflow traces under run `run_id`.

    The traces go to the run's experiment, with trace metadata `mlflow.sourceRun` = `run_id`, so
    they show in the run's and the experiment's Traces tabs. `tracker_or_client`: a `Tracker`, a
    `StageRun`, an `MlflowClient` or a tracking URI; only its tracking URI is used. Traces are laid
    out one after another from now (episodes carry durations, not start times). Synchronous: the
    traces are stored when this returns. Returns the number of traces logged.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracing.client import TracingClient

    chosen = sample_episodes(episodes, max_traces, seed)
    if not chosen:
        return 0
    client = TracingClient(_tracking_uri(tracker_or_client))
    experiment_id = client.store.get_run(run_id).info.experiment_id
    built, t = [], time.time_ns()
    for ep in chosen:
        info, spans = episode_trace(ep, experiment_id, run_id, t, stage)
        built.append((info, spans))
        t = max(t + 1_000_000, spans[0].end_time_ns)  # at least 1 ms apart: the trace list keeps this order
    stored = [client.start_trace(info) for info, _ in built]
    try:
        client.log_spans(experiment_id, [s for _, spans in built for s in spans])
    except (NotImplementedError, MlflowException) as e:
        # Stores without span logging (file store, older servers) keep spans as a trace artifact.
        if isinstance(e, MlflowException) and e.get_http_status_code() != 501 and "not supported" not in e.message:
            raise
        from mlflow.entities import TraceData

        for info, (_, spans) in zip(stored, built):
            client._upload_trace_data(info, TraceData(spans=spans))
    return len(built)


def run_trace_count(tracker_or_client: Any, run_id: str) -> int:
    """How many traces are linked to run `run_id` (0 if none): lets a caller skip re-logging."""
    from mlflow.tracing.client import TracingClient

    client = TracingClient(_tracking_uri(tracker_or_client))
    experiment_id = client.store.get_run(run_id).info.experiment_id
    count, token = 0, None
    while True:
        page = client.search_traces(locations=[experiment_id], run_id=run_id, max_results=500, page_token=token,
                                    include_spans=False)
        count += len(page)
        token = page.token
        if not token:
            return count
