"""Blocking Great Expectations gates: a failed gate stops DPO (and everything after it) in that run.

`sft_adapter_validation` gates rollouts on the SFT policy (dpo_driver.validation). The GE glue lives in dpo_driver.quality; this module only maps gate results to Dagster
AssetCheckResults and logs them to MLflow beside the asset they judge.
"""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from dpo_assets.governance import audit_failed_gates, audit_gate_failure
from dpo_driver.dpo_gates import kl_to_reference, load_policy_and_reference, preference_accuracy
from dpo_driver.io import read_jsonl
from dpo_driver.options import default
from dpo_driver.pii import PATTERN_ENTITY_TYPES, surviving
from dpo_driver.policy import LMPolicy
from dpo_driver.quality import (GateResult, PairGateThresholds, check_eval_seeds_disjoint, repeated_page_tasks, run_pair_gates,
                                run_trajectory_gates)
from dpo_driver.rollouts import first_prompts
from dpo_driver.stages import DPOOutput, EvaluationOutput, SFTOutput
from dpo_driver.validation import validate_policy
from resources import EnvironmentResource, MLflowTracker, PolicyModel, TaskSuite

PAIR_GATES = ("count", "margin", "decontamination", "format", "duplicates")
TRAJECTORY_GATES = ("count", "terminal_reward", "known_task", "env_errors")


class PairGateConfig(dg.Config):
    min_pairs: int = Field(default(PairGateThresholds, "min_pairs"), description="pair-count gate; production default from the seed templates, presets set their own")
    min_margin: float = Field(default(PairGateThresholds, "min_margin"), description="every pair's score margin must reach this")
    min_mean_margin: float = Field(default(PairGateThresholds, "min_mean_margin"), description="the mean margin must reach this preference-gap target")
    ngram: int = Field(default(PairGateThresholds, "ngram"), description="word n-gram size for overlap with evaluation prompts")
    # enter-text prompts of different seeds differ in one name only (~0.57 overlap): 0.8 still
    # catches a near-verbatim copy of an eval prompt while the seed check catches the rest.
    max_ngram_overlap: float = Field(default(PairGateThresholds, "max_ngram_overlap"), description="a pair is contaminated above this n-gram overlap with an eval prompt")
    min_decontamination_score: float = Field(default(PairGateThresholds, "min_decontamination_score"), description="fraction of pairs that must be clean; eval seeds always fail")
    # click-tab pages are "Tab #k of n" lists: every held-out page also occurs among training
    # seeds word for word, so text overlap cannot separate splits there; the seed gate still applies.
    ngram_exempt_tasks: list[str] = Field([], description="tasks exempt from text decontamination besides those found automatically "
                                          "(min_distinct_eval_pages); the seed check applies to every task")
    min_distinct_eval_pages: float = Field(1.0, description="a task whose held-out pages are less than this fraction distinct (1.0: "
                                           "any page shown on two held-out seeds) repeats its pages across seeds: text overlap cannot "
                                           "separate splits there, so it is exempt")
    max_prompt_chars: int = Field(default(PairGateThresholds, "max_prompt_chars"), description="length gate on prompts (chars; the trainer enforces tokens)")
    max_completion_chars: int = Field(default(PairGateThresholds, "max_completion_chars"), description="length gate on chosen/rejected (chars)")
    require_rejected_parses: bool = Field(default(PairGateThresholds, "require_rejected_parses"), description="every rejected completion must parse as an action")
    max_near_duplicate_fraction: float = Field(default(PairGateThresholds, "max_near_duplicate_fraction"),
                                               description="near-duplicate prompts tolerated; 1.0 = counted, not gated")


class TrajectoryGateConfig(dg.Config):
    max_env_error_fraction: float = Field(0.2, description="browser-crash episodes tolerated (flagged, not failures)")
    min_episodes: int = Field(1, description="at least this many episodes")


def _check_result(asset: str, name: str, gate: GateResult) -> dg.AssetCheckResult:
    failed = gate.failed
    lines = [f"| {e.expectation} | {', '.join(e.columns)} | {'pass' if e.success else '**FAIL**'} | {json.dumps(e.observed)[:120]} |"
             for e in gate.expectations]
    table = "| expectation | columns | result | observed |\n|---|---|---|---|\n" + "\n".join(lines)
    return dg.AssetCheckResult(
        asset_key=asset,
        check_name=f"{asset}_{name}",
        passed=gate.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "expectations": dg.MetadataValue.md(table),
            "failed_expectations": [f"{e.expectation}({', '.join(e.columns)}): observed {json.dumps(e.observed)[:200]}" for e in failed],
            "offending_rows": dg.MetadataValue.json(gate.to_dict()["offending"][:20]),
            **{k: dg.MetadataValue.json(v) if isinstance(v, (dict, list)) else v
               for k, v in gate.to_dict()["metadata"].items() if v is not None},
        },
    )


def _log_to_mlflow(context, tracker: MLflowTracker, asset: str, gates: dict[str, GateResult]):
    """Attach the gate verdicts to the MLflow run of the materialization they judged."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    run_id = event.asset_materialization.metadata.get("mlflow_run_id") if event else None
    if run_id is None:
        context.log.warning(f"no MLflow run recorded for {asset}; gate results only in Dagster")
        return
    client = tracker.tracker().client
    for name, g in gates.items():
        client.set_tag(run_id.value, f"gate.{name}", "pass" if g.passed else "FAIL")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "gates.json"
        p.write_text(json.dumps({n: g.to_dict() for n, g in gates.items()}, indent=2))
        client.log_artifact(run_id.value, str(p), "quality_gates")


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(f"preference_pairs_{g}", asset="preference_pairs", blocking=True,
                             description=f"Great Expectations {g} gate on the pairs") for g in PAIR_GATES],
)
def preference_pairs_gates(
    context: dg.AssetCheckExecutionContext,
    config: PairGateConfig,
    preference_pairs: pd.DataFrame,
    task_suite: TaskSuite,
    environment: EnvironmentResource,
    tracker: MLflowTracker,
):
    env = environment.get()
    tasks, plan = task_suite.task_list(env), task_suite.plan()
    prompts = {k: env.decontamination_text(p) for k, p in first_prompts(env, tasks, list(plan.eval)).items()}
    exempt = sorted(set(repeated_page_tasks(prompts, config.min_distinct_eval_pages)) | (set(config.ngram_exempt_tasks) & set(tasks)))
    eval_prompts = [p for (t, _), p in prompts.items() if t not in exempt]
    gates = run_pair_gates(preference_pairs, PairGateThresholds(**config.model_dump(exclude={"ngram_exempt_tasks", "min_distinct_eval_pages"})),
                           {t: list(plan.eval) for t in tasks}, eval_prompts, env.action_regex)
    gates["decontamination"].metadata["ngram_exempt_tasks"] = exempt
    _log_to_mlflow(context, tracker, "preference_pairs", gates)
    audit_failed_gates(context, tracker, "preference_pairs", gates)
    for name in PAIR_GATES:
        yield _check_result("preference_pairs", name, gates[name])


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(f"rollout_trajectories_{g}", asset="rollout_trajectories", blocking=True,
                             description=f"Great Expectations {g} gate on the episodes") for g in TRAJECTORY_GATES],
)
def rollout_trajectories_gates(
    context: dg.AssetCheckExecutionContext,
    config: TrajectoryGateConfig,
    rollout_trajectories: pd.DataFrame,
    task_suite: TaskSuite,
    environment: EnvironmentResource,
    tracker: MLflowTracker,
):
    gates = run_trajectory_gates(rollout_trajectories, task_suite.task_list(environment.get()), config.max_env_error_fraction, config.min_episodes)
    _log_to_mlflow(context, tracker, "rollout_trajectories", gates)
    audit_failed_gates(context, tracker, "rollout_trajectories", gates)
    for name in TRAJECTORY_GATES:
        yield _check_result("rollout_trajectories", name, gates[name])


@dg.asset_check(asset="evaluation_report", blocking=True, description="evaluation seeds are disjoint from demo and rollout seeds")
def evaluation_report_seeds_disjoint(context: dg.AssetCheckExecutionContext, evaluation_report: EvaluationOutput, task_suite: TaskSuite,
                                     environment: EnvironmentResource, tracker: MLflowTracker) -> dg.AssetCheckResult:
    plan = task_suite.plan()
    tasks = task_suite.task_list(environment.get())
    train = {t: list(plan.demo) + list(plan.rollout) for t in tasks}
    evaluated = {t: evaluation_report.eval_seeds for t in tasks}
    gate = check_eval_seeds_disjoint(evaluated, train)
    audit_failed_gates(context, tracker, "evaluation_report", {"seeds_disjoint": gate})
    return _check_result("evaluation_report", "seeds_disjoint", gate)


class SFTGateConfig(dg.Config):
    min_valid_fraction: float = Field(0.8, description="share of held-out demo states where the SFT policy's greedy answer parses as an action")
    min_expert_match: float = Field(0.25, description="share of held-out demo states where it equals the expert's action")


# Op name "sft_adapter_validation" (<asset>_<check>), the key its config has in run config and presets.
@dg.asset_check(asset="sft_adapter", name="validation", blocking=True,
                description="the SFT policy answers held-out expert states (validation slice of the demo band) validly and like the expert")
def sft_adapter_validation(context: dg.AssetCheckExecutionContext, config: SFTGateConfig, sft_adapter: SFTOutput,
                           policy_model: PolicyModel, environment: EnvironmentResource, tracker: MLflowTracker) -> dg.AssetCheckResult:
    env = environment.get()
    # The asset's last SFT round measured these states greedily with this adapter and token budget: the same numbers.
    measured_by = "sft_adapter's last round" if sft_adapter.validation else "this check"
    result = sft_adapter.validation or validate_policy(LMPolicy(*policy_model.load(sft_adapter.adapter_dir), env),
                                                       read_jsonl(Path(sft_adapter.validation_path)), env.parse,
                                                       sft_adapter.validation_max_new_tokens or env.max_new_tokens)
    passed, message = result.verdict(config.min_valid_fraction, config.min_expert_match)
    context.log.info(f"{message} (measured by {measured_by})")
    run_id = sft_adapter.mlflow_run_id
    if not passed:
        audit_gate_failure(context, tracker, "sft_adapter", "sft_adapter_validation", message, run_id)
    if run_id and run_id != "none":
        client = tracker.tracker().client
        client.set_tag(run_id, "gate.sft_validation", "pass" if passed else "FAIL")
        for k in ("valid_fraction", "expert_match"):
            client.log_metric(run_id, f"validation_{k}", getattr(result, k))
    per_task = pd.DataFrame(result.per_task).T
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=message,
        metadata={
            "valid_fraction": result.valid_fraction, "expert_match": result.expert_match, "states": result.num_states, "measured_by": measured_by,
            "min_valid_fraction": config.min_valid_fraction, "min_expert_match": config.min_expert_match,
            "per_task": dg.MetadataValue.md(per_task.to_markdown() if not per_task.empty else "(none)"),
            "mismatches": dg.MetadataValue.json(result.examples),
        },
    )


class PiiGateConfig(dg.Config):
    entity_types: list[str] = Field(list(PATTERN_ENTITY_TYPES), description="PII types (Presidio entity names) that must not survive "
                                    "in training data; PERSON needs a spaCy model installed offline")


def _pii_check(context, tracker: MLflowTracker, asset: str, records: list[dict], entity_types: list[str], run_id: str | None):
    left = surviving(records, entity_types)
    passed = not left
    message = ("no " + ", ".join(entity_types) + " left in the training data" if passed else
               f"PII survives in {asset}'s training data: " + ", ".join(f"{t} x{n}" for t, n in sorted(left.items()))
               + ". Turn scrub_pii on, or clean the source.")
    if not passed:
        audit_gate_failure(context, tracker, asset, f"{asset}_pii", message, run_id)
    return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.ERROR, description=message,
                               metadata={"entity_types": entity_types, **{f"surviving_{t.lower()}": left.get(t, 0) for t in entity_types}})


@dg.asset_check(asset="rollout_trajectories", name="pii", blocking=True,
                description="no configured PII type survives in the episodes (Presidio re-scan)")
def rollout_trajectories_pii(context: dg.AssetCheckExecutionContext, config: PiiGateConfig, rollout_trajectories: pd.DataFrame,
                             tracker: MLflowTracker) -> dg.AssetCheckResult:
    steps = [{k: s.get(k) for k in ("prompt", "output", "action")} for steps in rollout_trajectories["steps"] for s in steps]
    return _pii_check(context, tracker, "rollout_trajectories", steps, config.entity_types, None)


@dg.asset_check(asset="sft_adapter", name="pii", blocking=True, description="no configured PII type survives in the demos SFT trained on")
def sft_adapter_pii(context: dg.AssetCheckExecutionContext, config: PiiGateConfig, sft_adapter: SFTOutput,
                    tracker: MLflowTracker) -> dg.AssetCheckResult:
    demos = read_jsonl(Path(sft_adapter.demos_path)) if sft_adapter.demos_path else []
    return _pii_check(context, tracker, "sft_adapter", demos, config.entity_types, sft_adapter.mlflow_run_id)


class DPOGateConfig(dg.Config):
    max_kl: float = Field(0.1, description="KL(policy || reference) per generated token on held-out prompts (the seed's target)")
    min_preference_accuracy: float = Field(0.7, description="share of held-out pairs whose implicit reward prefers chosen")
    max_prompts: int = Field(32, description="held-out prompts (SFT validation states) the KL is measured on")
    max_new_tokens: int = Field(0, description="tokens the policy generates per KL prompt; 0 = the family's (Environment.max_new_tokens)")


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec("dpo_adapter_kl", asset="dpo_adapter", blocking=True,
                             description="KL(policy || reference) per token on held-out prompts stays under max_kl"),
           dg.AssetCheckSpec("dpo_adapter_preference_accuracy", asset="dpo_adapter", blocking=True,
                             description="the DPO policy prefers chosen over rejected on the held-out pairs")],
)
def dpo_adapter_gates(context: dg.AssetCheckExecutionContext, config: DPOGateConfig, dpo_adapter: DPOOutput, policy_model: PolicyModel,
                      environment: EnvironmentResource, tracker: MLflowTracker):
    env = environment.get()
    base, policy, reference = dpo_adapter.base_model, dpo_adapter.adapter_dir, dpo_adapter.start_adapter_dir
    loaded = load_policy_and_reference(base, policy, reference, policy_model.dtype)
    states = read_jsonl(Path(dpo_adapter.validation_path)) if dpo_adapter.validation_path else []
    prompts = list(dict.fromkeys(r["prompt"][0]["content"] for r in states))[: config.max_prompts]
    kl = kl_to_reference(base, policy, reference, prompts, config.max_new_tokens or env.max_new_tokens, loaded=loaded)
    pairs = read_jsonl(Path(dpo_adapter.validation_pairs_path)) if dpo_adapter.validation_pairs_path else []
    acc = preference_accuracy(base, policy, reference, pairs, loaded=loaded)
    results = {"kl": kl.verdict(config.max_kl), "preference_accuracy": acc.verdict(config.min_preference_accuracy)}
    values = {"kl": {"kl_per_token": kl.kl_per_token, "max_token_kl": kl.max_token_kl, "tokens": kl.num_tokens, "prompts": kl.num_prompts,
                     "max_kl": config.max_kl},
              "preference_accuracy": {"preference_accuracy": acc.accuracy, "mean_margin_nats": acc.mean_margin, "pairs": acc.num_pairs,
                                      "min_preference_accuracy": config.min_preference_accuracy}}
    run_id = dpo_adapter.mlflow_run_id
    for name, (passed, message) in results.items():
        context.log.info(message)
        if not passed:
            audit_gate_failure(context, tracker, "dpo_adapter", f"dpo_adapter_{name}", message, run_id)
        if run_id:
            client = tracker.tracker().client
            client.set_tag(run_id, f"gate.{name}", "pass" if passed else "FAIL")
            client.log_metric(run_id, f"gate_{name}", float(next(iter(values[name].values()))))
        extra = {"per_task": dg.MetadataValue.json(acc.per_task)} if name == "preference_accuracy" else {}
        yield dg.AssetCheckResult(check_name=f"dpo_adapter_{name}", passed=passed, severity=dg.AssetCheckSeverity.ERROR,
                                  description=message, metadata={**values[name], **extra})


CHECKS = [sft_adapter_validation, sft_adapter_pii, rollout_trajectories_pii, dpo_adapter_gates, preference_pairs_gates, rollout_trajectories_gates, evaluation_report_seeds_disjoint]
