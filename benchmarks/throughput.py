"""Evaluation throughput, side by side in one run: episodes/s of greedy evaluation on real MiniWoB++.

  (a) env only:   RandomPolicy through the one-browser loop (no generation; the browser's cost)
  (b) sequential: the LM, greedy, through the one-browser loop (run_episodes num_envs=0), with
      the last step's KV cache reused for the shared prompt prefix (LMPolicy.reuse_prefix) and,
      as `no-reuse`, without it
  (c) lockstep:   the LM, greedy, N browsers stepping together (run_episodes num_envs=N), per N

    .venv/bin/python -m benchmarks.throughput [--seeds 25] [--num-envs 8 16] [--repeats 2] [--adapter DIR]

Every timing includes starting the browsers. CPU contention from other processes adds noise;
`--repeats` runs every row again after the first pass, so the spread is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from dpo_driver.model import resolve_model
from dpo_driver.policy import LMPolicy, RandomPolicy, Sampling
from dpo_driver.rollouts import run_episodes
from dpo_driver.families.miniwob import DEFAULT_TASKS, MiniWoB
from dpo_driver.tasks import seeds_for
from dpo_driver.tracking import package_versions
from dpo_driver.training import load_policy

GREEDY = Sampling(temperature=0.0)  # as benchmarks/learning.py evaluates


def _measure(label: str, policy, env, tasks: list[str], seeds: list[int], max_steps: int, num_envs: int) -> tuple[dict, list[dict]]:
    t0 = time.perf_counter()
    eps = run_episodes(policy, env, tasks, seeds, 1, GREEDY, max_steps, policy_name=label, num_envs=num_envs)
    wall = time.perf_counter() - t0
    s = policy.stats
    row = {
        "loop": label, "num_envs": num_envs, "episodes": len(eps), "wall_seconds": round(wall, 2),
        "episodes_per_second": round(len(eps) / wall, 2),
        "steps": sum(e["num_steps"] for e in eps),
        "success_rate": round(sum(e["success"] for e in eps) / len(eps), 3),
        "env_errors": sum(e["env_error"] for e in eps),
        "generate_calls": s.calls, "prompt_tokens": s.prompt_tokens, "reused_prompt_tokens": s.reused_tokens, "new_tokens": s.new_tokens,
        "gen_seconds": round(s.seconds, 2),
        "new_tokens_per_second": round(s.tokens_per_second, 1),
    }
    print(f"  {label:<14} envs={num_envs:<3} {row['episodes_per_second']:6.2f} episodes/s  ({row['wall_seconds']} s, "
          f"{row['new_tokens_per_second']} new tok/s, success {row['success_rate']})", flush=True)
    return row, eps


def _actions(eps: list[dict]) -> dict[str, list]:
    return {e["episode_id"].split(":", 1)[1]: [s["output"] for s in e["steps"]] for e in eps}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    ap.add_argument("--seeds", type=int, default=25, help="evaluation-band seeds per task")
    ap.add_argument("--num-envs", type=int, nargs="+", default=[8, 16], help="browser counts for the lockstep rows")
    ap.add_argument("--max-steps", type=int, default=0, help="0 = each task's own limit (MiniWoB.max_steps)")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--adapter", type=Path, default=None, help="LoRA adapter dir (the SFT policy); none = the base model")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = ap.parse_args(argv)
    env = MiniWoB()
    tasks, seeds = env.suite(args.tasks), seeds_for("eval", args.seeds)

    model, tokenizer = load_policy(resolve_model(args.base), args.adapter)
    LMPolicy(model, tokenizer).propose(["warm-up"], [None], 1, GREEDY, seed=0)  # first-call setup is not throughput
    print(f"{len(tasks)} tasks x {len(seeds)} seeds, {model.dtype}, {torch.get_num_threads()} torch threads", flush=True)

    rows, agree = [], []
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        row, _ = _measure("env-only", RandomPolicy(env), env, tasks, seeds, args.max_steps, 0)
        rows.append({"repeat": repeat, **row})
        seq_row, seq = _measure("sequential", LMPolicy(model, tokenizer, env), env, tasks, seeds, args.max_steps, 0)
        rows.append({"repeat": repeat, **seq_row})
        row, plain = _measure("no-reuse", LMPolicy(model, tokenizer, env, reuse_prefix=False), env, tasks, seeds, args.max_steps, 0)
        rows.append({"repeat": repeat, **row, "speedup_vs_sequential": round(row["episodes_per_second"] / seq_row["episodes_per_second"], 2)})
        agree.append({"repeat": repeat, "num_envs": 0, "reuse_prefix": False, "same_actions_as_sequential": _actions(plain) == _actions(seq)})
        for n in args.num_envs:
            row, lock = _measure("lockstep", LMPolicy(model, tokenizer, env), env, tasks, seeds, args.max_steps, n)
            rows.append({"repeat": repeat, **row, "speedup_vs_sequential": round(row["episodes_per_second"] / seq_row["episodes_per_second"], 2)})
            same = _actions(lock) == _actions(seq)
            agree.append({"repeat": repeat, "num_envs": n, "same_actions_as_sequential": same})

    print(f"\n{'repeat':>6} {'loop':<11} {'envs':>4} {'eps/s':>7} {'x seq':>6} {'wall s':>7} {'steps':>6} {'success':>7} {'gen calls':>9} {'new tok/s':>9}")
    for r in rows:
        print(f"{r['repeat'] + 1:>6} {r['loop']:<11} {r['num_envs']:>4} {r['episodes_per_second']:>7.2f} {r.get('speedup_vs_sequential', ''):>6} "
              f"{r['wall_seconds']:>7.1f} {r['steps']:>6} {r['success_rate']:>7.3f} {r['generate_calls']:>9} {r['new_tokens_per_second']:>9.1f}")
    result = {
        "command": " ".join(sys.argv), "tasks": tasks, "seeds": [seeds[0], seeds[-1]], "max_steps": args.max_steps,
        "base": args.base, "adapter": str(args.adapter) if args.adapter else None, "dtype": str(model.dtype),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "versions": package_versions(),
        "rows": rows, "matches_sequential": agree,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
