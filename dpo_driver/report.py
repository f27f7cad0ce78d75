"""Evaluation report: per-task success rates with intervals, the paired difference, the decision.

Input is one row per evaluation episode (policy, task, seed, success). Every policy must have
run the same (task, seed) episodes, because the comparison pairs them.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpo_driver.io import atomic_write_bytes
from dpo_driver.stats import bootstrap_mean, decide, paired_bootstrap_diff, wilson_interval

REQUIRED_COLUMNS = ("policy", "task", "seed", "success")
MEAN_ROW = "mean"


@dataclass
class EvalReport:
    table: pd.DataFrame  # index: tasks then "mean"; columns: <policy>_{successes,n,rate,ci_low,ci_high}, diff_*_points
    decision: str  # "promote" | "keep previous" | "needs review", from the mean row
    summary: dict  # JSON-serialisable digest for asset metadata / MLflow
    markdown: str
    baseline: str
    candidate: str
    confidence: float


def _validated(episodes: pd.DataFrame, baseline: str, candidate: str) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in episodes.columns]
    if missing:
        raise ValueError(f"episodes lacks columns {missing}; expected at least {list(REQUIRED_COLUMNS)}")
    df = episodes[list(REQUIRED_COLUMNS)].copy()
    if df.empty:
        raise ValueError("episodes is empty; run the evaluation before building a report")
    if df.isna().any().any():
        raise ValueError(f"episodes has missing values in {df.columns[df.isna().any()].tolist()}; fix the evaluation output")
    if baseline == candidate:
        raise ValueError(f"baseline and candidate are both {baseline!r}; compare two different policies")
    present = sorted(df["policy"].unique())
    for role, name in (("baseline", baseline), ("candidate", candidate)):
        if name not in present:
            raise ValueError(f"{role} policy {name!r} has no episodes; policies present: {present}")
    if not df["success"].isin([0, 1]).all():
        bad = df.loc[~df["success"].isin([0, 1]), "success"].unique()[:5].tolist()
        raise ValueError(f"success must be bool or 0/1, got values like {bad}")
    df["success"] = df["success"].astype(int)
    if (df["task"] == MEAN_ROW).any():
        raise ValueError(f"a task is named {MEAN_ROW!r}, which is reserved for the summary row; rename it")
    dup = df[df.duplicated(["policy", "task", "seed"], keep=False)]
    if not dup.empty:
        raise ValueError(f"duplicate episodes for (policy, task, seed), e.g. {dup.iloc[0][['policy', 'task', 'seed']].tolist()}")

    keys = {p: set(zip(g["task"], g["seed"])) for p, g in df.groupby("policy")}
    union = set().union(*keys.values())
    gaps = [f"{p!r} lacks {len(union - k)} of them, e.g. {sorted(union - k)[:3]}" for p, k in sorted(keys.items()) if union - k]
    if gaps:
        raise ValueError("every policy must be evaluated on the same (task, seed) episodes: " + "; ".join(gaps))
    return df


def _rate_columns(policy: str, successes: int, n: int, rate: float, low: float, high: float) -> dict:
    return {f"{policy}_successes": successes, f"{policy}_n": n, f"{policy}_rate": rate,
            f"{policy}_ci_low": low, f"{policy}_ci_high": high}


def build_report(episodes: pd.DataFrame, baseline: str = "sft", candidate: str = "dpo",
                 confidence: float = 0.95, n_boot: int = 10000, seed: int = 0) -> EvalReport:
    """Per-task Wilson intervals, paired-bootstrap differences in points, and the decision.

    The "mean" row is the unweighted mean over tasks. Its difference interval comes from the
    task-stratified bootstrap. Its per-policy interval is Wilson on pooled counts when every
    task has the same number of episodes (then pooled rate == mean of task rates), else the
    task-stratified bootstrap of the mean rate.
    """
    df = _validated(episodes, baseline, candidate)
    policies = [baseline, candidate] + sorted(set(df["policy"]) - {baseline, candidate})
    wide = df.pivot(index=["task", "seed"], columns="policy", values="success").sort_index()
    tasks = wide.index.get_level_values("task")
    boot = dict(n_boot=n_boot, confidence=confidence, seed=seed)

    rows = {}
    for task in tasks.unique():
        sub = wide.loc[task]
        row = {}
        for p in policies:
            k, n = int(sub[p].sum()), len(sub)
            row |= _rate_columns(p, k, n, k / n, *wilson_interval(k, n, confidence))
        d, lo, hi = paired_bootstrap_diff(sub[baseline], sub[candidate], **boot)
        row |= {"diff_points": 100 * d, "diff_ci_low_points": 100 * lo, "diff_ci_high_points": 100 * hi}
        rows[task] = row

    per_task = pd.DataFrame.from_dict(rows, orient="index")
    balanced = per_task[f"{baseline}_n"].nunique() == 1
    mean = {}
    for p in policies:
        k, n = int(wide[p].sum()), len(wide)
        rate = float(per_task[f"{p}_rate"].mean())
        if balanced:
            lo, hi = wilson_interval(k, n, confidence)
        else:
            _, lo, hi = bootstrap_mean(wide[p], strata=tasks, **boot)
        mean |= _rate_columns(p, k, n, rate, lo, hi)
    d, lo, hi = paired_bootstrap_diff(wide[baseline], wide[candidate], strata=tasks, **boot)
    mean |= {"diff_points": 100 * d, "diff_ci_low_points": 100 * lo, "diff_ci_high_points": 100 * hi}

    table = pd.concat([per_task, pd.DataFrame([mean], index=[MEAN_ROW])])
    table.index.name = "task"
    decision = decide(d, lo, hi)
    summary = _summary(table, policies, baseline, candidate, confidence, decision)
    report = EvalReport(table, decision, summary, "", baseline, candidate, confidence)
    report.markdown = _markdown(report, policies)
    return report


def _summary(table, policies, baseline, candidate, confidence, decision) -> dict:
    tasks = [t for t in table.index if t != MEAN_ROW]
    m = table.loc[MEAN_ROW]
    # Plain Python types so the dict survives json.dumps and Dagster metadata.
    return {
        "baseline": baseline,
        "candidate": candidate,
        "confidence": float(confidence),
        "per_task": {t: {p: float(table.at[t, f"{p}_rate"]) for p in policies} for t in tasks},
        "n_per_task": {t: int(table.at[t, f"{baseline}_n"]) for t in tasks},
        "n": int(m[f"{baseline}_n"]),
        "mean": {p: float(m[f"{p}_rate"]) for p in policies},
        f"{candidate}_minus_{baseline}_points": float(m["diff_points"]),
        "diff_ci_low_points": float(m["diff_ci_low_points"]),
        "diff_ci_high_points": float(m["diff_ci_high_points"]),
        "decision": decision,
    }


def _pct(row, p: str) -> str:
    return f"{100 * row[f'{p}_rate']:.0f}% [{100 * row[f'{p}_ci_low']:.0f}, {100 * row[f'{p}_ci_high']:.0f}]"


def _pts(v: float) -> str:
    return f"{v + 0.0:+.1f}"  # + 0.0 turns -0.0 into 0.0, so a zero bound never prints as "-0.0"


def _markdown(report: EvalReport, policies: list[str]) -> str:
    base, cand = report.baseline.upper(), report.candidate.upper()
    level = f"{100 * report.confidence:g}%"
    lines = [
        "| task | n | " + " | ".join(p.upper() for p in policies) + f" | {cand} − {base} (points, {level} CI) |",
        "|---|---:|" + "---:|" * len(policies) + "---:|",
    ]
    for task, row in report.table.iterrows():
        diff = f"{_pts(row['diff_points'])} [{_pts(row['diff_ci_low_points'])}, {_pts(row['diff_ci_high_points'])}]"
        name = f"**{task}**" if task == MEAN_ROW else str(task)
        n = int(row[f"{report.baseline}_n"])
        lines.append(f"| {name} | {n} | " + " | ".join(_pct(row, p) for p in policies) + f" | {diff} |")
    m = report.table.loc[MEAN_ROW]
    lines += ["", (f"Decision: **{report.decision}** ({cand} − {base} = {_pts(m['diff_points'])} points, "
                   f"{level} CI [{_pts(m['diff_ci_low_points'])}, {_pts(m['diff_ci_high_points'])}])")]
    return "\n".join(lines) + "\n"


def plot_report(report_or_table: EvalReport | pd.DataFrame, path: Path) -> Path:
    """Grouped bar chart of success rate per task (and the mean) per policy, Wilson error bars.

    Written to a temp file beside ``path`` and renamed, so a reader never sees a half PNG.
    """
    table = report_or_table.table if isinstance(report_or_table, EvalReport) else report_or_table
    policies = [c[: -len("_rate")] for c in table.columns if c.endswith("_rate")]
    if not policies:
        raise ValueError(f"table has no <policy>_rate columns (columns: {list(table.columns)}); pass build_report()'s table")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    # A bare Figure + Agg canvas: no pyplot global state, safe in worker threads.
    fig = Figure(figsize=(max(6.0, 1.0 + 0.6 * len(table) * len(policies)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(table))
    width = 0.8 / len(policies)
    for i, p in enumerate(policies):
        rate = table[f"{p}_rate"].to_numpy(float)
        err = [rate - table[f"{p}_ci_low"].to_numpy(float), table[f"{p}_ci_high"].to_numpy(float) - rate]
        # A percentile-bootstrap mean interval can sit a hair off the estimate; matplotlib rejects negative errors.
        err = np.clip(err, 0.0, None)
        ax.bar(x + (i - (len(policies) - 1) / 2) * width, 100 * rate, width, yerr=100 * np.array(err),
               capsize=3, label=p.upper())
    ax.set_xticks(x, [str(t) for t in table.index], rotation=30, ha="right")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 115)  # headroom for the legend row above the 100% bars
    ax.set_yticks(range(0, 101, 20))
    if MEAN_ROW in table.index:
        ax.axvline(len(table) - 1.5, color="grey", linewidth=0.8, linestyle=":")
    title = "Success rate per task"
    if isinstance(report_or_table, EvalReport):
        title += f" (decision: {report_or_table.decision})"
    ax.set_title(title)
    ax.legend(loc="upper center", ncols=len(policies), frameon=False)
    fig.tight_layout()

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    return atomic_write_bytes(path, png.getvalue(), mode=0o644)  # 0644: the chart is meant to be read by the UI


@dataclass
class Retention:
    """What the round did to tasks it did not train on: the candidate's success there against the
    baseline's, with the paired interval of the difference."""

    tasks: list[str]
    n: int
    baseline: float
    candidate: float
    diff_points: float
    ci_points: tuple[float, float]
    min_ratio: float
    # (baseline, candidate) episodes ending on an answer the family rejects: a skill lost to a wrong
    # choice and one lost to a malformed answer (format drift) call for different fixes
    malformed: tuple[int, int] | None = None

    @property
    def ratio(self) -> float:
        return self.candidate / self.baseline if self.baseline > 0 else 1.0  # nothing to lose where the baseline never succeeds

    @property
    def passed(self) -> bool:
        return self.ratio >= self.min_ratio

    def line(self) -> str:
        return (f"retention on {', '.join(self.tasks)} ({self.n} episodes): {100 * self.candidate:.0f}% vs {100 * self.baseline:.0f}%, "
                f"{self.ratio:.0%} of the baseline (needs {self.min_ratio:.0%}); difference {_pts(self.diff_points)} "
                f"[{_pts(self.ci_points[0])}, {_pts(self.ci_points[1])}] points"
                + (f"; answers the environment rejected: {self.malformed[1]} vs {self.malformed[0]}" if self.malformed else ""))


def retention(episodes: pd.DataFrame, baseline: str, candidate: str, min_ratio: float = 0.95, confidence: float = 0.95,
              n_boot: int = 10000, seed: int = 0) -> Retention:
    """Capability retention on held-out tasks: the candidate must keep `min_ratio` of the baseline's
    (task-averaged) success there. `episodes` hold both policies on the same (task, seed) items."""
    df = _validated(episodes, baseline, candidate)
    wide = df.pivot(index=["task", "seed"], columns="policy", values="success").sort_index()
    tasks = wide.index.get_level_values("task")
    d, lo, hi = paired_bootstrap_diff(wide[baseline], wide[candidate], strata=tasks, n_boot=n_boot, confidence=confidence, seed=seed)
    means = wide.groupby(level="task").mean()
    malformed = None
    if "invalid" in episodes.columns:
        bad = episodes["invalid"].fillna(False).astype(bool)
        malformed = tuple(int(bad[episodes["policy"] == p].sum()) for p in (baseline, candidate))
    return Retention(sorted(set(tasks)), len(wide), float(means[baseline].mean()), float(means[candidate].mean()),
                     100 * d, (100 * lo, 100 * hi), min_ratio, malformed)


def with_retention(decision: str, kept: Retention | None) -> str:
    """The promotion rule with retention: "promote" also needs the retention set kept."""
    return "keep previous" if decision == "promote" and kept is not None and not kept.passed else decision


def drop_crashed_items(episodes: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(episodes without any (task, seed) on which some policy's environment crashed, how many
    items were dropped). A browser fault says nothing about either policy: the item is dropped for
    all of them, so the comparison stays paired."""
    crashed = episodes[episodes["env_error"]]
    bad = set(zip(crashed["task"], crashed["seed"]))
    if not bad:
        return episodes, 0
    return episodes[[(t, s) not in bad for t, s in zip(episodes["task"], episodes["seed"])]], len(bad)


@dataclass
class Promotion:
    """One evaluation's outcome: the report (decision included), the episodes it rests on and
    what was dropped or checked on the way."""

    report: EvalReport
    episodes: pd.DataFrame  # the held-out suite, crashed items dropped for every policy
    dropped_items: int
    kept: Retention | None  # capability retention, when retention tasks were played


def promotion_decision(episodes: pd.DataFrame, retention_episodes: pd.DataFrame | None, baseline: str, environment: str,
                       confidence: float = 0.95, n_boot: int = 10000, min_retention: float = 0.95) -> Promotion:
    """The promotion decision from evaluation episodes: drop crashed items (for every policy), compare
    the candidate "dpo" with `baseline` on the held-out suite, then require the retention set kept.
    A "promote" that loses the retention set becomes "keep previous", and the report says so."""
    frame, dropped = drop_crashed_items(episodes)
    report = build_report(frame, baseline=baseline, candidate="dpo", confidence=confidence, n_boot=n_boot)
    report.summary["environment"] = environment
    kept = None
    if retention_episodes is not None and len(retention_episodes):
        kept = retention(drop_crashed_items(retention_episodes)[0], baseline, "dpo", min_retention, confidence, n_boot)
        decision = with_retention(report.decision, kept)
        report.summary.update(decision=decision, retention=asdict(kept) | {"ratio": kept.ratio, "passed": kept.passed})
        report.markdown += f"\n\nCapability {kept.line()}: {'kept' if kept.passed else '**not kept**'}."
        if decision != report.decision:
            report.markdown += f" Decision: **{decision}** (was {report.decision})."
        report.decision = decision
    return Promotion(report, frame, dropped, kept)


def write_evaluation(folder: Path, promotion: Promotion, retention_episodes: list[dict]) -> list[Path]:
    """The evaluation stage's files in `folder`: every episode (suite and retention), the report
    as markdown and JSON, and the plot."""
    import json

    from dpo_driver.io import atomic_write_jsonl, atomic_write_text

    folder = Path(folder)
    written = [atomic_write_jsonl(folder / "episodes.jsonl", promotion.episodes.to_dict("records"))]
    if retention_episodes:
        written.append(atomic_write_jsonl(folder / "retention_episodes.jsonl", retention_episodes))
    written.append(atomic_write_text(folder / "report.md", promotion.report.markdown + "\n"))
    written.append(atomic_write_text(folder / "report.json", json.dumps(promotion.report.summary, indent=2) + "\n"))
    written.append(plot_report(promotion.report, folder / "success_by_task.png"))
    return written
