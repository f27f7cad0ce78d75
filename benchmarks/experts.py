"""Expert benchmark: how often each task's scripted expert solves demo seeds, and in how many steps.

A task is supported when its expert solves >= 95% of 100 demo seeds; the longest episode sets
its step limit (dpo_driver.families.miniwob.STEP_LIMITS). One browser per task, tasks one after another.

    python benchmarks/experts.py --seeds 100 --json benchmarks/results/experts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dpo_driver.demos import play_expert
from dpo_driver.experts import EXPERTS
from dpo_driver.io import atomic_write_text
from dpo_driver.families.miniwob import SUPPORTED_TASKS, MiniWoBSession
from dpo_driver.tasks import seeds_for

STEP_CAP = 20  # generous: this run measures the longest episode the limits are set from
PASS = 0.95


def measure(task: str, seeds: list[int], verbose: bool = False) -> dict:
    steps, solved, failures = [], 0, []
    t0 = time.perf_counter()
    with MiniWoBSession(task, None, None) as session:
        for seed in seeds:
            ep = play_expert(session, seed, STEP_CAP)
            if ep.solved:
                solved += 1
                steps.append(len(ep.records))
            else:
                failures.append({"seed": seed, "why": ep.failure})
                if verbose:
                    last = ep.records[-1] if ep.records else None
                    print(f"  FAIL {task} seed {seed}: {ep.failure}")
                    if last:
                        print("   " + last["prompt"][0]["content"].replace("\n", "\n   ") + " " + last["completion"][0]["content"])
    return {
        "task": task, "episodes": len(seeds), "solved": solved, "success": solved / len(seeds),
        "max_steps": max(steps, default=0), "mean_steps": round(sum(steps) / len(steps), 2) if steps else 0.0,
        "seconds": round(time.perf_counter() - t0, 1), "failures": failures[:10],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100, help="demo seeds per task (0..N-1)")
    ap.add_argument("--tasks", default=",".join(SUPPORTED_TASKS), help="comma-separated tasks (default: all supported)")
    ap.add_argument("--json", default="benchmarks/results/experts.json", help="where to write the results ('' for nowhere)")
    ap.add_argument("--verbose", action="store_true", help="print the last prompt of each failed episode")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in EXPERTS]
    if unknown:
        ap.error(f"no scripted expert for {unknown}")
    seeds = seeds_for("demo", args.seeds)
    rows = []
    print(f"{'task':28} {'steps max/mean':>15} {'success':>8}")
    for task in tasks:
        row = measure(task, seeds, args.verbose)
        rows.append(row)
        mark = "" if row["success"] >= PASS else "  (below 95%)"
        print(f"{task:28} {row['max_steps']:>7}/{row['mean_steps']:<7} {row['success']:>8.0%}{mark}", flush=True)
    if args.json:
        out = {"command": " ".join(sys.argv), "seeds": args.seeds, "pass_threshold": PASS, "tasks": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
