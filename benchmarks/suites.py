"""Multi-suite protocol: does the loop learn on suites it was never tuned on?

Runs benchmarks/learning.py's whole loop per (suite, training seed) with one preset, adds each
result to one JSON file (so the protocol can run suite by suite, no command longer than an hour
here), and prints one table over everything in that file: per suite SFT, DPO, RFT, ETO, the expert
fallback arm (FB), the expert-start arm (BP) and random mean success; DPO - SFT, DPO - RFT and DPO minus each of those with paired
95% intervals pooled over training seeds; pairs, yield, wall time; then the same differences pooled over
all suites; with `--per-task`, per task, pooled over every run that evaluated it.

Suites: `default` (the preset's), `full` (every supported task), and `random:K` — K disjoint random
subsets of 2-6 supported tasks drawn by `--draw-seed` (a suite nobody picked), named `random<draw>-<i>`;
that name alone runs the one suite (so a draw can run suite by suite).

    python benchmarks/suites.py --suites default,random:3 --draw-seed 7 --train-seeds 0,1 --eval-offset 5000
    python benchmarks/suites.py --table-only --per-task --pool-with benchmarks/results/suites_draw*.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: `benchmarks` is not installed
from benchmarks import learning  # noqa: E402
from dpo_assets.presets import op_configs, preset  # noqa: E402
from dpo_driver.io import atomic_write_text  # noqa: E402
from dpo_driver.stats import paired_bootstrap_diff  # noqa: E402
from dpo_driver.families.miniwob import SUPPORTED_TASKS  # noqa: E402

RESULTS = Path("benchmarks/results/suites.json")


def draw_suites(k: int, draw_seed: int, tasks: tuple[str, ...] = SUPPORTED_TASKS, sizes: tuple[int, int] = (2, 6)) -> list[list[str]]:
    """K disjoint random subsets of `tasks`, each of 2-6 tasks, fixed by `draw_seed`."""
    rng = random.Random(draw_seed)
    pool = list(tasks)
    rng.shuffle(pool)
    suites = []
    for _ in range(k):
        size = rng.randint(*sizes)
        if len(pool) < sizes[0]:
            break
        suites.append(sorted(pool[:size]))
        pool = pool[size:]
    return suites


def resolve_suites(spec: str, preset_name: str, draw_seed: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "default":
            out["default"] = list(preset(preset_name)["resources"]["task_suite"]["config"]["tasks"])
        elif part == "full":
            out["full"] = list(SUPPORTED_TASKS)
        elif part.startswith("random:"):
            for i, tasks in enumerate(draw_suites(int(part.split(":")[1]), draw_seed)):
                out[f"random{draw_seed}-{i}"] = tasks
        elif m := re.fullmatch(r"random(\d+)-(\d+)", part):  # one suite of a draw, by the name the table gives it
            drawn = draw_suites(int(m[2]) + 1, int(m[1]))
            if len(drawn) <= int(m[2]):
                raise ValueError(f"suite {part!r}: draw {m[1]} has only {len(drawn)} suites")
            out[part] = drawn[int(m[2])]
        else:
            raise ValueError(f"unknown suite {part!r}: use default, full, random:K (with --draw-seed) or a drawn suite's name (random7-1)")
    return out


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": []}


def _task_of(episode_key: str) -> str:
    """The task of an ``eval_success`` key, ``task:seed`` (as benchmarks/learning.py writes it)."""
    return episode_key.rsplit(":", 1)[0]


def pooled_diff(runs: list[dict], candidate: str, baseline: str, seed: int = 0) -> tuple[float, float, float, int] | None:
    """Candidate - baseline success over every (run, task, eval seed) both evaluated, with a paired
    bootstrap interval stratified by run and task; None when no run has both."""
    a, b, strata = [], [], []
    for r in runs:
        s = r.get("eval_success", {})
        if candidate not in s or baseline not in s:
            continue
        for key in sorted(s[candidate].keys() & s[baseline].keys()):
            a.append(s[baseline][key])
            b.append(s[candidate][key])
            strata.append(f"{r['suite']}:{r['seed']}:{_task_of(key)}")
    if not a:
        return None
    d, lo, hi = paired_bootstrap_diff(np.array(a, float), np.array(b, float), strata=strata, seed=seed)
    return 100 * d, 100 * lo, 100 * hi, len(a)


def _mean(runs: list[dict], policy: str) -> float | None:
    vals = [v for r in runs for v in r.get("eval_success", {}).get(policy, {}).values()]
    return 100 * float(np.mean(vals)) if vals else None


def _only_task(run: dict, task: str) -> dict:
    """``run`` with each arm's episodes cut to one task's."""
    return {**run, "eval_success": {arm: {k: v for k, v in eps.items() if _task_of(k) == task}
                                    for arm, eps in run.get("eval_success", {}).items()}}


def task_table(runs: list[dict]) -> tuple[list[dict], str]:
    """Per task, pooled over every run that evaluated it: where DPO and RFT differ, task by task."""
    tasks = sorted({_task_of(k) for r in runs for k in r.get("eval_success", {}).get("dpo", {})})
    rows, lines = [], [f"{'task':<28}{'runs':>5}{'eps':>6}{'SFT':>6}{'DPO':>6}{'RFT':>6}{'DPO-SFT [95% CI]':>24}{'DPO-RFT [95% CI]':>24}"]
    for task in tasks:
        cut = [c for c in (_only_task(r, task) for r in runs) if c["eval_success"].get("dpo")]
        row = {"task": task, "runs": len(cut), "episodes": sum(len(c["eval_success"]["dpo"]) for c in cut),
               **{p: _mean(cut, p) for p in ("sft", "dpo", "rft")},
               "dpo_minus_sft": pooled_diff(cut, "dpo", "sft"), "dpo_minus_rft": pooled_diff(cut, "dpo", "rft")}
        rows.append(row)
        lines.append(f"{task:<28}{row['runs']:>5}{row['episodes']:>6}{_pct(row['sft']):>6}{_pct(row['dpo']):>6}{_pct(row['rft']):>6}"
                     f"{_fmt(row['dpo_minus_sft']):>24}{_fmt(row['dpo_minus_rft']):>24}")
    return rows, "\n".join(lines)


def _fmt(d) -> str:
    return f"{d[0]:+.1f} [{d[1]:+.1f},{d[2]:+.1f}]" if d else "-"


def _pct(x) -> str:
    return f"{x:.0f}" if x is not None else "-"


# The arms compared with DPO in the table besides RFT (learning.py arm -> column): expert-assisted peers.
EXPERT_ARMS = {"eto": "ETO", "fallback": "FB", "backplay": "BP"}


def table(results: dict) -> tuple[list[dict], str]:
    by_suite: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by_suite.setdefault(r["suite"], []).append(r)
    rows, lines = [], []
    versus = ["sft", "rft", *EXPERT_ARMS]
    label = {"sft": "SFT", "rft": "RFT", **EXPERT_ARMS}
    head = (f"{'suite':<16}{'tasks':>6}{'seeds':>6}{'SFT':>6}{'DPO':>6}{'RFT':>6}" + "".join(f"{c:>6}" for c in EXPERT_ARMS.values())
            + f"{'rand':>6}" + "".join(f"{'DPO-' + label[a] + ' [95% CI]':>24}" for a in versus) + f"{'pairs':>10}{'yield':>12}{'wall s':>8}")
    lines.append(head)
    for suite, runs in by_suite.items():
        row = {"suite": suite, "tasks": runs[0]["tasks"], "train_seeds": [r["seed"] for r in runs],
               **{p: _mean(runs, p) for p in ("sft", "dpo", "rft", *EXPERT_ARMS, "random", "base", "zero_dpo")},
               **{f"dpo_minus_{a}": pooled_diff(runs, "dpo", a) for a in versus},
               "zero_minus_base": pooled_diff(runs, "zero_dpo", "base"),
               "pairs": [r.get("pairs") for r in runs], "pair_yield": [r.get("pair_yield") for r in runs],
               "wall_seconds": [r["wall_seconds"]["total"] for r in runs],
               "sft_gate": [r.get("sft_validation", {}).get("passed") for r in runs]}
        rows.append(row)
        lines.append(f"{suite:<16}{len(row['tasks']):>6}{len(runs):>6}" + "".join(f"{_pct(row[p]):>6}" for p in ("sft", "dpo", "rft", *EXPERT_ARMS, "random"))
                     + "".join(f"{_fmt(row[f'dpo_minus_{a}']):>24}" for a in versus) + f"{'/'.join(str(p) for p in row['pairs']):>10}"
                     f"{'/'.join(f'{y:.2f}' for y in row['pair_yield'] if y is not None):>12}{sum(row['wall_seconds']):>8.0f}")
    for suite, runs in by_suite.items():
        lines.append(f"  {suite}: {', '.join(runs[0]['tasks'])}")
        z = pooled_diff(runs, "zero_dpo", "base")
        if z:
            lines.append(f"  {suite} zero-demo arm: base {_pct(_mean(runs, 'base'))}% -> DPO {_pct(_mean(runs, 'zero_dpo'))}%, {_fmt(z)}")
    all_runs = results["runs"]
    pooled = {f"dpo_minus_{a}": pooled_diff(all_runs, "dpo", a) for a in ("rft", *EXPERT_ARMS, "sft")}
    lines.append("pooled over all suites: " + ", ".join(f"{k.replace('_minus_', ' - ').upper()} {_fmt(v)} (n={v[3]})"
                                                       for k, v in pooled.items() if v))
    return rows, "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", default="default", help="comma-separated: default, full, random:K, or one drawn suite by name (random7-1)")
    ap.add_argument("--draw-seed", type=int, default=0, help="seed that draws the random suites")
    ap.add_argument("--train-seeds", default="0,1", help="training seeds per suite")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--arms", default="rft,eto", help="learning.py arms per run (rft, eto, fallback, zero, ...)")
    ap.add_argument("--eval-offset", type=int, default=0, help="held-out seeds start this far into the eval band")
    ap.add_argument("--eval-seeds", type=int, default=0, help="override held-out seeds per task")
    ap.add_argument("--rollout-seeds", type=int, default=0, help="learning.py --rollout-seeds: rollout seeds per task")
    ap.add_argument("--pair-validation-seeds", type=int, default=0, help="learning.py --pair-validation-seeds")
    ap.add_argument("--sft-adapter", default="", help="learning.py --sft-adapter: one suite and one training seed only")
    ap.add_argument("--json", default=str(RESULTS), help="results file; each run is added (same suite+seed replaced)")
    ap.add_argument("--table-only", action="store_true", help="print the table of the results file and exit")
    ap.add_argument("--pool-with", nargs="+", default=[], metavar="JSON",
                    help="more results files (read only) whose runs join --json's in the printed table and its pooled row")
    ap.add_argument("--per-task", action="store_true", help="also print each task's success and differences, pooled over the runs")
    decoding = ap.add_mutually_exclusive_group()
    decoding.add_argument("--constrained", action="store_true", help="learning.py --constrained (give it its own --json)")
    decoding.add_argument("--free", action="store_true", help="learning.py --free (give it its own --json)")
    learning.add_num_envs_argument(ap)
    learning.add_sft_argument(ap)
    learning.add_rollouts_argument(ap)
    learning.add_dpo_argument(ap)  # with --sft: runs are keyed by suite, seed and offset only: give other overrides their own --json
    args = ap.parse_args(argv)
    path = Path(args.json)
    pool_with = [Path(f) for f in args.pool_with]
    for missing in (f for f in pool_with if not f.exists()):
        ap.error(f"--pool-with: no results file {missing}")  # before any run, not after an hour of them
    if not args.table_only:
        ops = op_configs(preset(args.preset))
        learning.dpo_config(ops, args.dpo, 0)  # a bad override fails here, before an hour of runs
        learning.stage_config(ops, "sft_adapter", learning.SFTAdapterConfig, args.sft, "--sft")
        learning.rollout_config(ops, args.rollouts)
        suites, seeds = resolve_suites(args.suites, args.preset, args.draw_seed), [int(s) for s in args.train_seeds.split(",") if s.strip()]
        if args.sft_adapter and len(suites) * len(seeds) != 1:
            ap.error("--sft-adapter is one suite's SFT stage: give one suite and one training seed")
        for suite, tasks in suites.items():
            for seed in seeds:
                t0 = time.time()
                print(f"\n=== suite {suite} ({', '.join(tasks)}), training seed {seed} ===", flush=True)
                res = learning.main(["--preset", args.preset, "--seed", str(seed), "--tasks", ",".join(tasks), "--arms", args.arms,
                                     "--eval-offset", str(args.eval_offset), "--eval-seeds", str(args.eval_seeds),
                                     "--rollout-seeds", str(args.rollout_seeds), "--pair-validation-seeds", str(args.pair_validation_seeds),
                                     "--sft-adapter", args.sft_adapter, "--dpo", args.dpo, "--sft", args.sft, "--rollouts", args.rollouts, "--num-envs", str(args.num_envs)] + (["--constrained"] if args.constrained else [])
                                    + (["--free"] if args.free else []))
                res.pop("report_markdown", None)
                res.update(suite=suite, tasks=tasks, suites_command=" ".join(shlex.quote(a) for a in sys.argv),
                           suite_wall_seconds=round(time.time() - t0, 1))
                results = _load(path)  # re-read: another process may have added runs meanwhile
                results["runs"] = [r for r in results["runs"] if (r["suite"], r["seed"], r.get("eval_offset_used")) !=
                                   (suite, seed, args.eval_offset)] + [{**res, "eval_offset_used": args.eval_offset}]
                results["commands"] = sorted(set(results.get("commands", [])) | {res["suites_command"]})
                atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    results = _load(path)
    for other in pool_with:
        results["runs"] += _load(other)["runs"]
    rows, text = table(results)
    out = {"rows": rows, "text": text}
    if args.per_task:
        out["task_rows"], task_text = task_table(results["runs"])
        out["text"] += "\n\n" + task_text
    print("\n" + out["text"])
    return out


if __name__ == "__main__":
    main()
