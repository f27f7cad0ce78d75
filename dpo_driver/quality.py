"""Great Expectations gates on the pipeline's data, returning structured, JSON-ready results.

Every verdict comes from a GE 1.x expectation run through one ephemeral context per call.
Where a property is not a plain column property (eval-seed membership, n-gram overlap with the
eval prompts, near-duplicate keys), it is first derived into a column and GE checks that column.
No Dagster here: the asset checks wrap these functions.
"""

from __future__ import annotations

import os

# GE 1.x reads this (documented switch) when a context is built. 1.24.1 ships no analytics
# client, but other 1.x releases post usage events, and a run must not wait on the network.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import math
import re
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.row_conditions import Column


MAX_OFFENDING = 20  # rows per gate shown in the check's metadata; enough to debug, small in the UI
# The schema this module relies on; dpo_driver.pairs may add columns (episode ids).
REQUIRED_PAIR_COLUMNS = ("pair_id", "task", "seed", "step", "prompt", "chosen", "rejected",
                         "chosen_score", "rejected_score", "margin")
ID_COLUMNS = ("pair_id", "episode_id", "task", "seed")  # whichever exist name an offending row
# SUMMARY carries unexpected counts and up to partial_unexpected_count row indices; COMPLETE
# would also list every unexpected value, which we neither need nor want on 100k-row frames.
_RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_OFFENDING}


@dataclass
class PairGateThresholds:
    """Thresholds for `run_pair_gates`; the check metadata echoes the ones applied."""

    min_pairs: int = 1000  # production default from the seed templates; presets set their own
    min_margin: float = 0.5  # every pair's chosen_score - rejected_score must reach this
    min_mean_margin: float = 0.15  # the preference-gap target from the seed templates
    ngram: int = 12  # word n-gram size for prompt overlap with eval prompts (normalized text)
    # A pair is contaminated when more than this fraction of its prompt's n-grams occur in
    # some eval prompt. enter-text prompts of different seeds differ in one name only (~0.57
    # overlap): 0.8 still catches a near-verbatim copy while the seed check catches the rest.
    max_ngram_overlap: float = 0.8
    # Fraction of pairs that must be free of n-gram contamination (GE `mostly`). The seed
    # templates say 0.9; ours is 1.0. Pairs from held-out eval seeds always fail, whatever this.
    min_decontamination_score: float = 1.0
    # Length gate in characters: the training max length is in tokens and the trainer enforces
    # it; counting tokens here would need the tokenizer. Chars are a conservative proxy (these
    # prompts are ASCII English, ~4 chars/token); presets that shorten max_length lower these.
    max_prompt_chars: int = 4000
    max_completion_chars: int = 1000  # tool-use answers (Thought + JSON) and SQL queries run to a few hundred
    # The issue asks that every completion parse; a run that deliberately trains against
    # malformed outputs as `rejected` sets this False.
    require_rejected_parses: bool = True
    # Near-duplicate prompts (see _prompt_key) are always counted; gated only below 1.0 because
    # several pairs per state is normal (many rollouts diverge from the same observation).
    max_near_duplicate_fraction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_ngram_overlap", "min_decontamination_score", "max_near_duplicate_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PairGateThresholds.{name}={getattr(self, name)!r}: must be a fraction in [0, 1]")
        for name in ("ngram", "max_prompt_chars", "max_completion_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"PairGateThresholds.{name}={getattr(self, name)!r}: must be at least 1")
        if self.min_pairs < 0:
            raise ValueError(f"PairGateThresholds.min_pairs={self.min_pairs!r}: must be non-negative")


@dataclass
class ExpectationOutcome:
    expectation: str  # GE expectation type, e.g. "expect_column_values_to_be_between"
    columns: list[str]
    success: bool
    observed: Any  # observed_value, or unexpected counts + sample for per-row expectations
    kwargs: dict[str, Any]  # the thresholds GE applied (min_value, mostly, regex, ...)
    error: str | None = None  # GE's message when the expectation could not run (missing column)


@dataclass
class GateResult:
    name: str
    passed: bool
    expectations: list[ExpectationOutcome]
    offending: list[dict[str, Any]]  # up to MAX_OFFENDING rows: ids, failed expectation, value
    metadata: dict[str, Any]

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [e for e in self.expectations if not e.success]

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def run_pair_gates(
    pairs: pd.DataFrame,
    thresholds: PairGateThresholds,
    eval_seeds: dict[str, list[int]],
    eval_prompts: list[str] | None,
    action_regex: str,
) -> dict[str, GateResult]:
    """The count, margin, decontamination, format and duplicates gates on preference pairs.

    `action_regex` is the family's grammar (Environment.action_regex): chosen (and rejected, with
    `require_rejected_parses`) must match it whole.
    `eval_prompts` is the held-out pages' text for the n-gram check; `[]` says on purpose that no
    task's pages can be told apart by text (every task exempt), leaving the seed check alone."""
    _require_frame(pairs, "pairs")
    # Missing eval context would make decontamination pass vacuously: a result that checked nothing.
    if not any(eval_seeds.values()) or eval_prompts is None:
        raise ValueError("eval_seeds must be non-empty and eval_prompts given: pass the held-out seeds per task "
                         "and the first-observation prompts of the evaluation episodes")
    view = _pair_view(pairs, thresholds, eval_seeds, eval_prompts)
    runner = _Runner(view)  # one context and batch shared by the five gates: contexts cost
    results = {"count": _count_gate, "margin": _margin_gate, "decontamination": _decontamination_gate,
               "format": partial(_format_gate, action_regex=action_regex), "duplicates": _duplicates_gate}
    results = {name: gate(runner, view, thresholds) for name, gate in results.items()}
    results["decontamination"].metadata |= {"n_eval_seeds": sum(len(s) for s in eval_seeds.values()),
                                            "n_eval_prompts": len(eval_prompts)}
    return results


def _count_gate(runner: _Runner, view: pd.DataFrame, t: PairGateThresholds) -> GateResult:
    # Always present: every per-row expectation below passes vacuously on zero rows.
    return runner.gate("count", [gxe.ExpectTableRowCountToBeBetween(min_value=t.min_pairs)],
                       {"n_pairs": len(view), "min_pairs": t.min_pairs})


def _margin_gate(runner: _Runner, view: pd.DataFrame, t: PairGateThresholds) -> GateResult:
    margins = pd.to_numeric(view["margin"], errors="coerce") if "margin" in view else pd.Series(dtype=float)
    return runner.gate("margin", [
        gxe.ExpectColumnValuesToNotBeNull(column="margin"),  # the between-check skips nulls
        gxe.ExpectColumnValuesToBeBetween(column="margin", min_value=t.min_margin),
        gxe.ExpectColumnMeanToBeBetween(column="margin", min_value=t.min_mean_margin),
    ], {"mean_margin": margins.mean(), "min_observed_margin": margins.min(),
        "min_margin": t.min_margin, "min_mean_margin": t.min_mean_margin})


def _decontamination_gate(runner: _Runner, view: pd.DataFrame, t: PairGateThresholds) -> GateResult:
    derived = {"is_eval_seed", "eval_ngram_overlap"} <= set(view.columns) and len(view) > 0
    overlapping = view["eval_ngram_overlap"] > t.max_ngram_overlap if derived else None
    return runner.gate("decontamination", [
        # Held-out seeds are a hard failure: no `mostly`.
        gxe.ExpectColumnValuesToBeInSet(column="is_eval_seed", value_set=[False]),
        gxe.ExpectColumnValuesToBeBetween(column="eval_ngram_overlap", max_value=t.max_ngram_overlap,
                                          mostly=t.min_decontamination_score),
    ], {
        # Reported only; the two expectations give the verdict.
        "decontamination_score": float((~view["is_eval_seed"] & ~overlapping).mean()) if derived else None,
        "eval_seed_pairs": int(view["is_eval_seed"].sum()) if derived else None,
        # Prompts of templated tasks differ by a word or two across seeds; this shows which task trips.
        "ngram_contaminated_by_task": _count_by_task(view, overlapping) if derived else {},
        "ngram": t.ngram, "max_ngram_overlap": t.max_ngram_overlap,
        "min_decontamination_score": t.min_decontamination_score,
    })


def _format_gate(runner: _Runner, view: pd.DataFrame, t: PairGateThresholds, action_regex: str) -> GateResult:
    must_parse = ("chosen", "rejected") if t.require_rejected_parses else ("chosen",)
    return runner.gate("format", [
        *[gxe.ExpectColumnToExist(column=c) for c in REQUIRED_PAIR_COLUMNS],
        *[gxe.ExpectColumnValuesToNotBeNull(column=c)
          for c in ("pair_id", "task", "seed", "prompt", "chosen", "rejected")],
        # Min length 1: a pair truncated to nothing gives a NaN DPO loss.
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1, max_value=t.max_prompt_chars),
        *[gxe.ExpectColumnValueLengthsToBeBetween(column=c, min_value=1, max_value=t.max_completion_chars)
          for c in ("chosen", "rejected")],
        # GE has no "column A != column B" for strings, so the comparison is derived.
        gxe.ExpectColumnValuesToBeInSet(column="chosen_equals_rejected", value_set=[False]),
        *[gxe.ExpectColumnValuesToMatchRegex(column=c, regex=_full_match(action_regex)) for c in must_parse],
    ], {"max_prompt_chars": t.max_prompt_chars, "max_completion_chars": t.max_completion_chars,
        "require_rejected_parses": t.require_rejected_parses})


def _full_match(regex: str) -> str:
    """`regex` anchored at both ends: GE's regex expectation searches (str.contains), families
    state their grammar as a whole-answer match. Leading inline flags such as `(?s)` stay in front."""
    flags = re.match(r"\(\?[a-zA-Z]+\)", regex)
    lead = flags.group(0) if flags else ""
    return f"{lead}^(?:{regex[len(lead):]})$"


def _duplicates_gate(runner: _Runner, view: pd.DataFrame, t: PairGateThresholds) -> GateResult:
    keys = view.get("prompt_key", pd.Series(dtype=object))
    near_dups = int(keys.notna().sum() - keys.nunique())  # pairs whose prompt repeats an earlier one
    gated = t.max_near_duplicate_fraction < 1.0
    return runner.gate("duplicates", [
        gxe.ExpectColumnValuesToBeUnique(column="pair_id"),  # offending rows are named by it
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["prompt", "chosen", "rejected"]),
        # unique fraction = 1 - near-duplicate fraction
        *([gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="prompt_key", min_value=1.0 - t.max_near_duplicate_fraction)] if gated else []),
    ], {"near_duplicate_prompts": near_dups, "near_duplicate_fraction": near_dups / len(view) if len(view) else None,
        "max_near_duplicate_fraction": t.max_near_duplicate_fraction})


def run_trajectory_gates(
    episodes: pd.DataFrame,
    known_tasks: list[str],
    max_env_error_fraction: float = 0.2,
    min_episodes: int = 1,
) -> dict[str, GateResult]:
    """Count, terminal reward, known task and env-error gates on rollout episodes.

    Env-error episodes (a crashed browser) are flagged, not failures: they are exempt from the
    reward expectation, and the gate fails only when more than `max_env_error_fraction` of
    episodes hit one.
    """
    _require_frame(episodes, "episodes")
    view = episodes.drop(columns=["steps"], errors="ignore").reset_index(drop=True)
    flagged = view[view["env_error"].fillna(False).astype(bool)] if "env_error" in view else view.iloc[0:0]
    runner = _Runner(view)
    return {
        "count": runner.gate("count", [gxe.ExpectTableRowCountToBeBetween(min_value=min_episodes)],
                             {"n_episodes": len(view), "min_episodes": min_episodes}),
        "terminal_reward": runner.gate("terminal_reward", [gxe.ExpectColumnValuesToNotBeNull(
            column="reward", row_condition=Column("env_error") == False)], {}),  # noqa: E712 (GE condition DSL)
        "known_task": runner.gate("known_task", [
            gxe.ExpectColumnValuesToNotBeNull(column="task"),
            gxe.ExpectColumnValuesToBeInSet(column="task", value_set=sorted(known_tasks)),
        ], {"known_tasks": sorted(known_tasks)}),
        "env_errors": runner.gate("env_errors", [gxe.ExpectColumnValuesToBeInSet(
            column="env_error", value_set=[False], mostly=1.0 - max_env_error_fraction)],
            {"env_error_count": len(flagged), "env_error_fraction": len(flagged) / len(view) if len(view) else None,
             "max_env_error_fraction": max_env_error_fraction,
             "env_error_episodes": flagged.get("episode_id", pd.Series(dtype=object)).head(MAX_OFFENDING).tolist()}),
    }


def check_eval_seeds_disjoint(eval_seeds: dict[str, list[int]], train_seeds: dict[str, list[int]]) -> GateResult:
    """No (task, seed) used for evaluation may appear among the training seeds.

    An empty eval seed set fails too: a vacuous "disjoint" would look like a checked result.
    """
    rows = [(task, int(s)) for task, seeds in eval_seeds.items() for s in seeds]
    train = {(task, int(s)) for task, seeds in train_seeds.items() for s in seeds}
    view = pd.DataFrame(rows, columns=["task", "seed"])
    view["in_train"] = [r in train for r in rows]
    return _Runner(view).gate("eval_seeds_disjoint", [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="in_train", value_set=[False]),
    ], {"n_eval_seeds": len(view), "n_overlapping": int(view["in_train"].sum())})


# --- derived columns ---------------------------------------------------------------------------

def repeated_page_tasks(prompts: dict[tuple[str, int], str], min_distinct: float) -> list[str]:
    """Tasks whose held-out pages repeat: fewer than `min_distinct` of their eval-seed prompts are
    distinct (click-test shows one page on every seed, click-tab a handful). Text overlap cannot
    separate splits there: every held-out page also occurs among training seeds word for word, so
    only the seed check applies to them. Decided from the pages themselves, for any task."""
    by_task: dict[str, list[str]] = {}
    for (task, _), p in prompts.items():
        by_task.setdefault(task, []).append(p)
    return sorted(t for t, ps in by_task.items() if len(set(ps)) < min_distinct * len(ps))


def _pair_view(pairs: pd.DataFrame, t: PairGateThresholds, eval_seeds, eval_prompts) -> pd.DataFrame:
    """The pairs plus the derived columns GE checks; a missing source column leaves its derived
    column missing too, so the expectation on it fails with GE's "column does not exist"."""
    view = pairs.reset_index(drop=True).copy()  # positional index: GE reports row indices
    if {"task", "seed"} <= set(view.columns):
        held_out = {(task, int(s)) for task, seeds in eval_seeds.items() for s in seeds}
        view["is_eval_seed"] = [(task, _as_int(s)) in held_out for task, s in zip(view["task"], view["seed"])]
    if "prompt" in view.columns:
        overlap = _NgramOverlap(eval_prompts, t.ngram)
        view["eval_ngram_overlap"] = [overlap(p) if isinstance(p, str) else None for p in view["prompt"]]
        view["prompt_key"] = [_prompt_key(p) if isinstance(p, str) else None for p in view["prompt"]]
    if {"chosen", "rejected"} <= set(view.columns):
        view["chosen_equals_rejected"] = (view["chosen"] == view["rejected"]).fillna(False).astype(bool)
    return view


def _words(text: str) -> list[str]:
    """Normalized words: lowercase, punctuation stripped, whitespace folded."""
    return re.sub(r"[^\w\s]", "", text.lower()).split()


def _prompt_key(prompt: str) -> str:
    # Near-duplicate = identical once normalized and digits dropped (element numbering, counts,
    # dates): one hash per prompt, where pairwise Jaccard would be quadratic in the pair count.
    return " ".join(re.sub(r"\d", "", w) for w in _words(prompt))


class _NgramOverlap:
    """Fraction of a prompt's word n-grams found in any eval prompt.

    Prompts shorter than n words use n = their length, so a short verbatim copy still counts.
    """

    def __init__(self, eval_prompts: list[str], n: int):
        self._eval = [_words(p) for p in eval_prompts]
        self._n = n
        self._grams: dict[int, set[tuple[str, ...]]] = {}

    def _eval_grams(self, n: int) -> set[tuple[str, ...]]:
        if n not in self._grams:
            self._grams[n] = {g for w in self._eval for g in _ngrams(w, n)}
        return self._grams[n]

    def __call__(self, prompt: str) -> float:
        words = _words(prompt)
        n = min(self._n, len(words))
        grams = _ngrams(words, n) if n else []
        return sum(g in self._eval_grams(n) for g in grams) / len(grams) if grams else 0.0


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def _count_by_task(view: pd.DataFrame, mask: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in view.loc[mask, "task"].value_counts().items()} if "task" in view else {}


# --- GE glue ---------------------------------------------------------------------------------

class _Runner:
    """One ephemeral GE context and batch per frame; each gate is a suite validated on it."""

    def __init__(self, frame: pd.DataFrame):
        context = gx.get_context(mode="ephemeral")
        # tqdm bars per suite would flood Dagster's captured stderr.
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        batch_def = (context.data_sources.add_pandas("memory")
                     .add_dataframe_asset("frame").add_batch_definition_whole_dataframe("whole"))
        self._frame = frame
        self._batch = batch_def.get_batch(batch_parameters={"dataframe": frame})

    def gate(self, name: str, expectations: list, metadata: dict[str, Any]) -> GateResult:
        suite = gx.ExpectationSuite(name=name)
        for i, expectation in enumerate(expectations):
            expectation.meta = {"order": i}  # suite results come back unordered
            suite.add_expectation(expectation)
        with warnings.catch_warnings():
            # GE's regex metric calls str.contains with the family's action regex, whose capture groups make
            # pandas warn that they are unused; the match itself is what we want.
            warnings.filterwarnings("ignore", "This pattern is interpreted as a regular expression")
            validated = self._batch.validate(suite, result_format=_RESULT_FORMAT)
        results = sorted(validated.results, key=lambda r: r.expectation_config.meta["order"])
        outcomes = [_outcome(r) for r in results]
        return GateResult(
            name=name,
            passed=all(o.success for o in outcomes),
            expectations=outcomes,
            offending=self._offending(results),
            metadata=_jsonable(metadata),
        )

    def _offending(self, results) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        ids = [c for c in ID_COLUMNS if c in self._frame.columns]
        for r in results:
            if r.success:
                continue
            columns = _columns(r.expectation_config.kwargs)
            for i in (r.result or {}).get("partial_unexpected_index_list") or []:
                if len(rows) == MAX_OFFENDING:
                    return rows
                row = {c: self._frame.at[i, c] for c in ids}
                row["expectation"] = r.expectation_config.type
                row["column"] = ",".join(columns)
                values = [self._frame.at[i, c] for c in columns]
                row["value"] = values[0] if len(values) == 1 else values
                rows.append(_jsonable(row))
        return rows


def _outcome(r) -> ExpectationOutcome:
    kwargs = {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"}
    result = r.result or {}
    if "observed_value" in result:
        observed = result["observed_value"]
    elif "unexpected_count" in result:
        observed = {k: result.get(k) for k in ("element_count", "unexpected_count", "unexpected_percent",
                                               "partial_unexpected_list")}
    else:
        observed = None
    return ExpectationOutcome(
        expectation=r.expectation_config.type,
        columns=_columns(kwargs),
        success=bool(r.success),
        observed=_jsonable(observed),
        kwargs=_jsonable(kwargs),
        error=_error(r.exception_info or {}),
    )


def _error(info: dict) -> str | None:
    # GE nests exception info per failed metric when a metric (not the expectation) raised.
    entries = [info, *[v for v in info.values() if isinstance(v, dict)]]
    for e in entries:
        if str(e.get("raised_exception")) == "True":
            return str(e.get("exception_message"))
    return None


def _columns(kwargs: dict) -> list[str]:
    if "column" in kwargs:
        return [kwargs["column"]]
    return list(kwargs.get("column_list") or [])


def _jsonable(x: Any) -> Any:
    """Plain JSON values for Dagster/MLflow metadata: numpy scalars unwrapped, NaN/NA -> None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if pd.api.types.is_scalar(x) and pd.isna(x):
        return None
    return str(x)


def _as_int(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value  # a null seed: matches no eval key; the format gate's not-null check names it


def _require_frame(value: Any, name: str) -> None:
    if not isinstance(value, pd.DataFrame):
        raise TypeError(f"{name}: expected a pandas DataFrame, got {type(value).__name__}; "
                        f"pass the asset's value as a DataFrame (see dpo_driver.pairs)")
