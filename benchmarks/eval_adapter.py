"""Greedy held-out success of one adapter on every supported MiniWoB task (the suites protocol's
full-set seeds: 20 per task from offset 3000). Prints and writes JSON with its command.

    .venv/bin/python benchmarks/eval_adapter.py ADAPTER_DIR NAME [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

from dpo_driver.environment import load_environment
from dpo_driver.families.miniwob import SUPPORTED_TASKS
from dpo_driver.model import resolve_model
from dpo_driver.policy import LMPolicy, Sampling
from dpo_driver.rollouts import run_episodes
from dpo_driver.tasks import SeedPlan
from dpo_driver.training import load_policy


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter")
    ap.add_argument("name")
    ap.add_argument("--eval-seeds", type=int, default=20)
    ap.add_argument("--eval-offset", type=int, default=3000)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    env = load_environment("miniwob")
    plan = SeedPlan.build(5, 20, args.eval_seeds, eval_offset=args.eval_offset)
    t0 = time.time()
    model, tokenizer = load_policy(resolve_model("smollm2-135m"), Path(args.adapter))
    episodes = run_episodes(LMPolicy(model, tokenizer, env), env, list(SUPPORTED_TASKS), list(plan.eval), 1,
                            Sampling(temperature=0.0, max_new_tokens=env.max_new_tokens), None, policy_name=args.name)
    per = pd.DataFrame(episodes).groupby("task")["success"].mean()
    out = {"command": " ".join(shlex.quote(a) for a in sys.argv), "adapter": args.adapter, "name": args.name,
           "seeds": [plan.eval[0], plan.eval[-1]], "mean": float(per.mean()), "per_task": per.round(3).to_dict(),
           "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
