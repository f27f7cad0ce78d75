"""The GE quality gates, run for real: good data passes; each kind of bad data fails its gate
with the failed expectation, its observed value and the offending pair named."""

import json

import pandas as pd
import pytest

from dpo_driver.actions import ACTION_REGEX
from dpo_driver.quality import (
    PairGateThresholds,
    check_eval_seeds_disjoint,
    run_pair_gates,
    run_trajectory_gates,
)

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
EVAL_SEEDS = {"click-button": [2_000_000, 2_000_001]}


def prompt(names: list[str]) -> str:
    """A prompt in the policy's format (observation.render_prompt)."""
    elements = [f'{i}. button "{n}"' for i, n in enumerate(names, 1)]
    return "\n".join([f'Task: Click on the "{names[0]}" button.', "Elements:", *elements, "Next action:"])


EVAL_PROMPTS = [prompt(["kilo", "lima", "mike", "november", "oscar"])]


def pair(i: int, **overrides) -> dict:
    names = [f"{WORDS[(i + k) % len(WORDS)]}{i}" for k in range(5)]
    row = {
        "pair_id": f"p{i}", "task": "click-button", "seed": 1_000_000 + i, "step": 0,
        "prompt": prompt(names), "chosen": f'click button "{names[0]}"', "rejected": f'click button "{names[1]}"',
        "chosen_score": 1.0, "rejected_score": 0.0, "margin": 1.0,
    }
    return row | overrides


def frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


GOOD = [pair(i) for i in range(5)]
SMALL = PairGateThresholds(min_pairs=3, max_ngram_overlap=0.5)  # the near copy below overlaps an eval prompt by 0.5-0.8


def gates(df: pd.DataFrame, thresholds: PairGateThresholds = SMALL):
    return run_pair_gates(df, thresholds, EVAL_SEEDS, EVAL_PROMPTS, ACTION_REGEX)


def failed(result) -> dict[tuple[str, tuple[str, ...]], object]:
    """{(expectation type, columns): observed} for the failed expectations of a gate."""
    return {(e.expectation, tuple(e.columns)): e.observed for e in result.failed}


def offending_ids(result, key="pair_id") -> set:
    return {row[key] for row in result.offending}


def test_good_pairs_pass_every_gate():
    results = gates(frame(*GOOD))
    assert set(results) == {"count", "margin", "decontamination", "format", "duplicates"}
    for name, r in results.items():
        assert r.passed, (name, r.failed)
        assert r.offending == []
    assert results["decontamination"].metadata["decontamination_score"] == 1.0
    assert results["margin"].metadata["mean_margin"] == 1.0
    assert results["count"].metadata == {"n_pairs": 5, "min_pairs": 3}
    json.dumps({n: r.to_dict() for n, r in results.items()}, allow_nan=False)


def test_empty_frame_with_columns_fails_count_and_nothing_crashes():
    results = gates(frame(*GOOD).iloc[0:0])
    assert not results["count"].passed
    assert failed(results["count"]) == {("expect_table_row_count_to_be_between", ()): 0}
    # Per-row expectations are vacuous on empty data; that is why the count gate exists.
    assert results["format"].passed and results["duplicates"].passed


def test_frame_without_columns_is_a_format_failure_not_a_crash():
    results = gates(pd.DataFrame())
    assert failed(results["count"]) == {("expect_table_row_count_to_be_between", ()): 0}
    missing = {cols[0] for (kind, cols) in failed(results["format"]) if kind == "expect_column_to_exist"}
    assert {"prompt", "chosen", "rejected", "margin"} <= missing
    margin = results["margin"].failed[0]
    assert not results["margin"].passed and "margin" in margin.error and "does not exist" in margin.error
    json.dumps({n: r.to_dict() for n, r in results.items()}, allow_nan=False)


def test_too_few_pairs_fails_count_with_the_observed_count():
    r = gates(frame(*GOOD), PairGateThresholds(min_pairs=10))["count"]
    assert failed(r) == {("expect_table_row_count_to_be_between", ()): 5}
    assert r.expectations[0].kwargs == {"min_value": 10}


def test_one_pair_below_min_margin_fails_margin_naming_it():
    r = gates(frame(*GOOD[:4], pair(4, chosen_score=0.2, margin=0.2)))["margin"]
    assert not r.passed
    observed = failed(r)[("expect_column_values_to_be_between", ("margin",))]
    assert observed["unexpected_count"] == 1 and observed["partial_unexpected_list"] == [0.2]
    assert r.offending == [{"pair_id": "p4", "task": "click-button", "seed": 1_000_004,
                            "expectation": "expect_column_values_to_be_between", "column": "margin", "value": 0.2}]


def test_mean_margin_below_target_fails_though_every_pair_clears_the_minimum():
    r = gates(frame(*[pair(i, margin=0.6) for i in range(5)]),
              PairGateThresholds(min_pairs=3, min_margin=0.5, min_mean_margin=0.9))["margin"]
    assert set(failed(r)) == {("expect_column_mean_to_be_between", ("margin",))}
    assert failed(r)[("expect_column_mean_to_be_between", ("margin",))] == pytest.approx(0.6)
    assert r.metadata["mean_margin"] == pytest.approx(0.6)


def test_pair_from_an_eval_seed_fails_decontamination():
    r = gates(frame(*GOOD[:4], pair(4, seed=2_000_001)))["decontamination"]
    assert set(failed(r)) == {("expect_column_values_to_be_in_set", ("is_eval_seed",))}
    assert r.offending[0]["pair_id"] == "p4" and r.offending[0]["seed"] == 2_000_001
    assert r.metadata["decontamination_score"] == pytest.approx(0.8)
    assert r.metadata["eval_seed_pairs"] == 1


def test_eval_seed_is_a_hard_failure_even_when_mostly_allows_some_contamination():
    lenient = PairGateThresholds(min_pairs=3, max_ngram_overlap=0.5, min_decontamination_score=0.5)
    assert not gates(frame(*GOOD[:4], pair(4, seed=2_000_001)), lenient)["decontamination"].passed


def near_copy_of_eval_prompt() -> str:
    # One element renamed, punctuation and case changed: still most 12-grams of an eval prompt.
    return EVAL_PROMPTS[0].replace('"oscar"', '"papa"').upper().replace(".", "")


def test_near_copy_of_an_eval_prompt_fails_decontamination():
    r = gates(frame(*GOOD[:4], pair(4, prompt=near_copy_of_eval_prompt())))["decontamination"]
    observed = failed(r)[("expect_column_values_to_be_between", ("eval_ngram_overlap",))]
    assert observed["unexpected_count"] == 1 and observed["partial_unexpected_list"][0] > 0.5
    assert [row["pair_id"] for row in r.offending] == ["p4"]
    assert r.metadata["decontamination_score"] == pytest.approx(0.8)
    assert r.metadata["ngram_contaminated_by_task"] == {"click-button": 1}


def test_min_decontamination_score_is_the_mostly_of_the_overlap_expectation():
    df = frame(*GOOD[:4], pair(4, prompt=near_copy_of_eval_prompt()))
    assert gates(df, PairGateThresholds(min_pairs=3, max_ngram_overlap=0.5, min_decontamination_score=0.8))["decontamination"].passed
    assert not gates(df, PairGateThresholds(min_pairs=3, max_ngram_overlap=0.5, min_decontamination_score=0.9))["decontamination"].passed


def test_empty_completion_fails_format():
    r = gates(frame(*GOOD[:4], pair(4, rejected="")))["format"]
    assert failed(r)[("expect_column_value_lengths_to_be_between", ("rejected",))]["unexpected_count"] == 1
    assert offending_ids(r) == {"p4"}


def test_chosen_equal_to_rejected_fails_format():
    r = gates(frame(*GOOD[:4], pair(4, rejected=pair(4)["chosen"])))["format"]
    assert set(failed(r)) == {("expect_column_values_to_be_in_set", ("chosen_equals_rejected",))}
    assert offending_ids(r) == {"p4"}


def test_completion_that_does_not_parse_fails_format_unless_rejected_may_be_malformed():
    df = frame(*GOOD[:4], pair(4, rejected="I would click the okay button"))
    r = gates(df)["format"]
    observed = failed(r)[("expect_column_values_to_match_regex", ("rejected",))]
    assert observed["partial_unexpected_list"] == ["I would click the okay button"]
    assert offending_ids(r) == {"p4"}
    assert gates(df, PairGateThresholds(min_pairs=3, require_rejected_parses=False))["format"].passed


def test_prompt_longer_than_max_chars_fails_format():
    r = gates(frame(*GOOD), PairGateThresholds(min_pairs=3, max_prompt_chars=50))["format"]
    assert failed(r)[("expect_column_value_lengths_to_be_between", ("prompt",))]["unexpected_count"] == 5


def test_duplicate_triples_fail_naming_both_pairs():
    r = gates(frame(*GOOD, pair(0, pair_id="p0-again")))["duplicates"]
    assert set(failed(r)) == {("expect_compound_columns_to_be_unique", ("prompt", "chosen", "rejected"))}
    assert offending_ids(r) == {"p0", "p0-again"}


def test_near_duplicate_prompts_are_counted_and_gated_only_when_asked():
    renumbered = pair(9, prompt=pair(0)["prompt"].replace("0", "7"))  # same text up to digits
    df = frame(*GOOD, renumbered)
    r = gates(df)["duplicates"]
    assert r.passed and r.metadata["near_duplicate_prompts"] == 1
    strict = gates(df, PairGateThresholds(min_pairs=3, max_near_duplicate_fraction=0.1))["duplicates"]
    assert set(failed(strict)) == {("expect_column_proportion_of_unique_values_to_be_between", ("prompt_key",))}


def test_bad_inputs_raise_naming_them():
    with pytest.raises(ValueError, match="max_ngram_overlap"):
        PairGateThresholds(max_ngram_overlap=1.5)
    with pytest.raises(TypeError, match="pairs: expected a pandas DataFrame"):
        run_pair_gates(GOOD, SMALL, EVAL_SEEDS, EVAL_PROMPTS, ACTION_REGEX)
    with pytest.raises(ValueError, match="eval_prompts given"):
        run_pair_gates(frame(*GOOD), SMALL, EVAL_SEEDS, None, ACTION_REGEX)
    with pytest.raises(ValueError, match="eval_seeds must be non-empty"):
        run_pair_gates(frame(*GOOD), SMALL, {}, EVAL_PROMPTS, ACTION_REGEX)


def test_tasks_whose_held_out_pages_repeat_are_found_from_the_pages():
    from dpo_driver.quality import repeated_page_tasks

    prompts = {("click-test", s): "Task: Click the button." for s in range(10)}
    prompts |= {("click-tab", s): f"Tab #{s % 3}" for s in range(10)}
    prompts |= {("click-link", s): f"link {s}" for s in range(10)}
    assert repeated_page_tasks(prompts, 0.5) == ["click-tab", "click-test"]
    assert repeated_page_tasks(prompts, 0.05) == []


# --- rollout trajectories --------------------------------------------------------------------

def episode(i: int, **overrides) -> dict:
    row = {"episode_id": f"e{i}", "task": "click-button", "seed": 1_000_000 + i, "sample": 0,
           "success": True, "reward": 0.8, "env_error": False, "num_steps": 1, "steps": [{"step": 0}]}
    return row | overrides


EPISODES = [episode(i) for i in range(10)]
TASKS = ["click-button", "click-link"]


def test_good_episodes_pass_and_env_errors_are_reported_not_failed():
    crashed = episode(9, env_error=True, success=None, reward=None)  # no reward: exempt
    results = run_trajectory_gates(frame(*EPISODES[:9], crashed), TASKS)
    assert all(r.passed for r in results.values()), {n: r.failed for n, r in results.items()}
    assert results["env_errors"].metadata["env_error_count"] == 1
    assert results["env_errors"].metadata["env_error_episodes"] == ["e9"]


def test_unknown_task_fails():
    r = run_trajectory_gates(frame(*EPISODES[:9], episode(9, task="book-flight")), TASKS)["known_task"]
    assert failed(r)[("expect_column_values_to_be_in_set", ("task",))]["partial_unexpected_list"] == ["book-flight"]
    assert offending_ids(r, "episode_id") == {"e9"}


def test_missing_terminal_reward_fails():
    r = run_trajectory_gates(frame(*EPISODES[:9], episode(9, reward=None)), TASKS)["terminal_reward"]
    assert ("expect_column_values_to_not_be_null", ("reward",)) in failed(r)
    assert offending_ids(r, "episode_id") == {"e9"}


def test_env_error_fraction_above_threshold_fails():
    eps = [episode(i, env_error=i < 3) for i in range(10)]  # 30% crashed
    r = run_trajectory_gates(frame(*eps), TASKS)["env_errors"]
    assert not r.passed and r.metadata["env_error_fraction"] == pytest.approx(0.3)
    assert run_trajectory_gates(frame(*eps), TASKS, max_env_error_fraction=0.3)["env_errors"].passed


def test_empty_episodes_fail_count():
    assert not run_trajectory_gates(frame(*EPISODES).iloc[0:0], TASKS)["count"].passed


# --- evaluation seeds ----------------------------------------------------------------------

def test_eval_seeds_overlapping_training_seeds_fail():
    r = check_eval_seeds_disjoint({"click-button": [1, 2, 3]}, {"click-button": [3, 4], "click-link": [1]})
    assert not r.passed
    assert [(row["task"], row["seed"]) for row in r.offending] == [("click-button", 3)]
    assert r.metadata == {"n_eval_seeds": 3, "n_overlapping": 1}


def test_disjoint_eval_seeds_pass_and_empty_eval_set_fails():
    assert check_eval_seeds_disjoint({"click-button": [1, 2]}, {"click-button": [3]}).passed
    assert not check_eval_seeds_disjoint({}, {"click-button": [3]}).passed
