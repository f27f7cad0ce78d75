import json
import re

import numpy as np
import pandas as pd
import pytest

from dpo_driver.report import EvalReport, build_report, plot_report
from dpo_driver.stats import wilson_interval

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_episodes(rates: dict[str, dict[str, float]], seeds=range(20), extra_columns=True) -> pd.DataFrame:
    """Deterministic episodes: policy p succeeds on the first round(rate * n) seeds of each task."""
    seeds = list(seeds)
    rows = []
    for policy, per_task in rates.items():
        for task, rate in per_task.items():
            k = round(rate * len(seeds))
            for i, seed in enumerate(seeds):
                rows.append({"policy": policy, "task": task, "seed": seed, "success": i < k})
    df = pd.DataFrame(rows)
    if extra_columns:
        df["reward"] = df["success"].astype(float)
        df["steps"] = 3
    return df


BETTER = {
    "sft": {"click-button": 0.50, "enter-text": 0.30, "click-tab": 0.70},
    "dpo": {"click-button": 0.80, "enter-text": 0.60, "click-tab": 0.90},
    "random": {"click-button": 0.10, "enter-text": 0.0, "click-tab": 0.20},
}


@pytest.fixture(scope="module")
def report() -> EvalReport:
    return build_report(make_episodes(BETTER), n_boot=2000)


def test_table_has_a_row_per_task_and_a_mean_row(report):
    assert list(report.table.index) == ["click-button", "click-tab", "enter-text", "mean"]
    for policy in ("sft", "dpo", "random"):
        for stat in ("successes", "n", "rate", "ci_low", "ci_high"):
            assert f"{policy}_{stat}" in report.table.columns


def test_rates_and_intervals_match_the_episodes(report):
    episodes = make_episodes(BETTER)
    rates = episodes.groupby(["task", "policy"])["success"].mean()
    for task in BETTER["sft"]:
        row = report.table.loc[task]
        for policy in BETTER:
            assert row[f"{policy}_rate"] == pytest.approx(rates[(task, policy)])
        assert (row["sft_ci_low"], row["sft_ci_high"]) == pytest.approx(wilson_interval(row["sft_successes"], 20))
        assert row["diff_points"] == pytest.approx(100 * (rates[(task, "dpo")] - rates[(task, "sft")]))
    mean = report.table.loc["mean"]
    assert mean["sft_rate"] == pytest.approx(np.mean(list(BETTER["sft"].values())))
    assert mean["sft_n"] == 60
    mean_of = lambda policy: np.mean(list(BETTER[policy].values()))  # noqa: E731
    assert mean["diff_points"] == pytest.approx(100 * (mean_of("dpo") - mean_of("sft")))


def test_clear_improvement_is_promoted_and_stated_in_markdown(report):
    s = report.summary
    assert report.decision == s["decision"] == "promote"
    assert s["diff_ci_low_points"] > 0
    line = (f"Decision: **promote** (DPO − SFT = {s['dpo_minus_sft_points']:+.1f} points, "
            f"95% CI [{s['diff_ci_low_points']:+.1f}, {s['diff_ci_high_points']:+.1f}])")
    assert line in report.markdown
    assert "| click-button | 20 | 50% [30, 70] | 80% [58, 92] |" in report.markdown
    assert re.search(r"\| \*\*mean\*\* \| 60 \| \d+% \[\d+, \d+\] \|", report.markdown)


def test_summary_is_json_serialisable(report):
    s = json.loads(json.dumps(report.summary))
    assert s["per_task"]["enter-text"] == {"sft": 0.3, "dpo": 0.6, "random": 0.0}
    assert s["mean"]["dpo"] == pytest.approx((0.8 + 0.6 + 0.9) / 3)
    assert s["n"] == 60 and s["n_per_task"]["click-tab"] == 20


@pytest.mark.parametrize(
    "dpo_rates,expected",
    [
        ({"click-button": 0.1, "enter-text": 0.0, "click-tab": 0.3}, "keep previous"),
        (BETTER["sft"], "needs review"),
    ],
)
def test_decision_follows_the_interval(dpo_rates, expected):
    rep = build_report(make_episodes({"sft": BETTER["sft"], "dpo": dpo_rates}), n_boot=500)
    assert rep.decision == expected
    assert f"Decision: **{expected}**" in rep.markdown


def test_unbalanced_tasks_weigh_equally():
    big = make_episodes({"sft": {"a": 0.0}, "dpo": {"a": 1.0}}, seeds=range(30))
    small = make_episodes({"sft": {"b": 0.0}, "dpo": {"b": 0.0}}, seeds=range(10))
    rep = build_report(pd.concat([big, small]), n_boot=500)
    assert rep.table.loc["mean", "dpo_rate"] == pytest.approx(0.5)  # pooled would be 0.75
    assert rep.table.loc["mean", "diff_points"] == pytest.approx(50.0)
    low, high = rep.table.loc["mean", ["dpo_ci_low", "dpo_ci_high"]]
    assert low <= 0.5 <= high


def test_row_order_does_not_change_the_report(report):
    shuffled = make_episodes(BETTER).sample(frac=1.0, random_state=3)
    pd.testing.assert_frame_equal(build_report(shuffled, n_boot=2000).table, report.table)


def test_mismatched_seeds_are_rejected():
    episodes = make_episodes(BETTER)
    episodes.loc[(episodes.policy == "dpo") & (episodes.seed == 4) & (episodes.task == "enter-text"), "seed"] = 99
    with pytest.raises(ValueError, match=r"same \(task, seed\).*'dpo' lacks 1.*'enter-text', 4"):
        build_report(episodes)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda df: df.drop(columns="seed"), "lacks columns"),
        (lambda df: df[df.policy != "dpo"], "candidate policy 'dpo'"),
        (lambda df: pd.concat([df, df.iloc[:1]]), "duplicate episodes"),
        (lambda df: df.assign(success=df["success"].astype(int) * 2), "success must be bool or 0/1"),
        (lambda df: df.iloc[:0], "empty"),
    ],
)
def test_bad_episodes_are_rejected(mutate, message):
    with pytest.raises(ValueError, match=message):
        build_report(mutate(make_episodes(BETTER)))


@pytest.mark.parametrize("use_table", [False, True])
def test_plot_is_a_png_written_atomically(report, tmp_path, use_table):
    target = tmp_path / "charts" / "eval.png"
    out = plot_report(report.table if use_table else report, target)
    data = out.read_bytes()
    assert out == target
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000
    assert [p.name for p in target.parent.iterdir()] == ["eval.png"]  # no temp file left behind


def test_plot_replaces_an_existing_file(report, tmp_path):
    target = tmp_path / "eval.png"
    target.write_bytes(b"stale")
    plot_report(report, target)
    assert target.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_rejects_a_table_without_rates(tmp_path):
    with pytest.raises(ValueError, match="_rate columns"):
        plot_report(pd.DataFrame({"x": [1]}), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_retention_blocks_a_promotion_that_loses_held_out_skill():
    from dpo_driver.report import retention, with_retention

    rows = [{"policy": p, "task": t, "seed": s, "success": ok}
            for t in ("a", "b") for s in range(10)
            for p, ok in (("sft", s < 8), ("dpo", s < 4))]
    kept = retention(pd.DataFrame(rows), "sft", "dpo", min_ratio=0.95, n_boot=2000)
    assert kept.baseline == 0.8 and kept.candidate == 0.4 and kept.ratio == 0.5 and not kept.passed
    assert kept.ci_points[1] < 0 and "50% of the baseline (needs 95%)" in kept.line()
    assert with_retention("promote", kept) == "keep previous"
    assert with_retention("needs review", kept) == "needs review" and with_retention("promote", None) == "promote"
    same = retention(pd.DataFrame([{**r, "success": r["seed"] < 8} for r in rows]), "sft", "dpo", n_boot=2000)
    assert same.passed and with_retention("promote", same) == "promote"
    never = retention(pd.DataFrame([{**r, "success": False} for r in rows]), "sft", "dpo", n_boot=2000)
    assert never.ratio == 1.0 and never.passed  # nothing to lose where the baseline never succeeds
    assert kept.malformed is None and "rejected" not in kept.line()  # episodes without the flag: nothing claimed
    # The line says whether the loss is malformed answers: here dpo's failures are, sft's are not.
    flagged = retention(pd.DataFrame([{**r, "invalid": r["policy"] == "dpo" and not r["success"]} for r in rows]), "sft", "dpo", n_boot=2000)
    assert flagged.malformed == (0, 12) and "answers the environment rejected: 12 vs 0" in flagged.line()


def test_a_crashed_item_is_dropped_for_every_policy():
    from dpo_driver.report import drop_crashed_items

    eps = pd.DataFrame([{"policy": p, "task": "t", "seed": s, "success": True, "env_error": p == "dpo" and s == 1}
                        for p in ("sft", "dpo") for s in range(3)])
    kept, dropped = drop_crashed_items(eps)
    assert dropped == 1 and sorted(set(kept["seed"])) == [0, 2] and len(kept) == 4
    assert drop_crashed_items(kept) == (kept, 0)


def test_promotion_decision_drops_crashes_and_needs_the_retention_set_kept(tmp_path):
    from dpo_driver.report import promotion_decision

    eps = make_episodes(BETTER, seeds=range(40), extra_columns=False).assign(env_error=False)
    eps.loc[(eps["policy"] == "sft") & (eps["seed"] == 39), "env_error"] = True  # a browser fault on one item, one policy
    held = pd.DataFrame([{"policy": p, "task": "kept-task", "seed": s, "success": s < (8 if p == "sft" else 2), "env_error": False}
                         for p in ("sft", "dpo") for s in range(10)])
    alone = promotion_decision(eps, None, "sft", "miniwob", n_boot=2000)
    assert alone.report.decision == "promote" and alone.kept is None and alone.report.summary["environment"] == "miniwob"
    assert alone.dropped_items == 3 and 39 not in set(alone.episodes["seed"])  # (task, 39) dropped for both policies, every task
    lost = promotion_decision(eps, held, "sft", "miniwob", n_boot=2000)
    assert lost.report.decision == lost.report.summary["decision"] == "keep previous" and not lost.kept.passed
    assert "**not kept**" in lost.report.markdown and "(was promote)" in lost.report.markdown
    kept = promotion_decision(eps, held.assign(success=held["seed"] < 8), "sft", "miniwob", n_boot=2000)
    assert kept.report.decision == "promote" and kept.kept.passed and kept.report.summary["retention"]["passed"]
    from dpo_driver.io import read_jsonl
    from dpo_driver.report import write_evaluation

    written = write_evaluation(tmp_path, lost, held.to_dict("records"))
    assert sorted(p.name for p in written) == sorted(p.name for p in tmp_path.iterdir()) == [
        "episodes.jsonl", "report.json", "report.md", "retention_episodes.jsonl", "success_by_task.png"]
    assert json.loads((tmp_path / "report.json").read_text())["decision"] == "keep previous"
    assert len(read_jsonl(tmp_path / "episodes.jsonl")) == len(lost.episodes)
    assert [p.name for p in write_evaluation(tmp_path / "alone", alone, [])].count("retention_episodes.jsonl") == 0
