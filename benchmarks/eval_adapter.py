"""Greedy held-out success of one or more adapters on a family's tasks, paired with the first.

Each `NAME=DIR` adapter plays the same (task, seed) items of `--env` (MiniWoB by default): every
supported task by default,
`--exclude` drops some (e.g. the suite an adapter was trained on, so what is left measures
retention on tasks the round never saw), `--tasks` picks them. Seeds: `--eval-seeds` per task
from `--eval-offset` into the evaluation band. The adapters after the first get their paired
bootstrap difference to it (stratified by task). Prints a table and writes JSON with its command.

    .venv/bin/python benchmarks/eval_adapter.py sft=/tmp/run/sft_r0 dpo=/tmp/run/dpo_r1 \
        --exclude click-button,click-link,click-widget,enter-text --eval-seeds 6 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: `benchmarks` is not installed
from benchmarks.learning import _paired_diff, _per_task, add_num_envs_argument  # noqa: E402
from dpo_driver.environment import load_environment  # noqa: E402
from dpo_driver.io import atomic_write_text  # noqa: E402
from dpo_driver.model import resolve_model  # noqa: E402
from dpo_driver.policy import LMPolicy, Sampling  # noqa: E402
from dpo_driver.rollouts import run_episodes  # noqa: E402
from dpo_driver.stats import decide  # noqa: E402
from dpo_driver.tasks import SeedPlan  # noqa: E402
from dpo_driver.training import load_policy  # noqa: E402


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """NAME=DIR pairs, each DIR a saved adapter; a clear error otherwise."""
    pairs = [tuple(s.split("=", 1)) for s in specs]
    bad = [s for s, p in zip(specs, pairs) if len(p) != 2 or not p[0] or not (Path(p[1]) / "adapter_config.json").is_file()]
    if bad:
        raise SystemExit(f"adapters are NAME=DIR with a saved adapter (adapter_config.json) in DIR: {bad}")
    names = [p[0] for p in pairs]
    if len(set(names)) != len(names):
        raise SystemExit(f"adapter names must differ: {names}")
    return [(n, Path(d)) for n, d in pairs]


def select_tasks(tasks: str, exclude: str, supported: tuple[str, ...]) -> list[str]:
    """The supported tasks to play: `tasks` (comma-separated; empty = all) minus `exclude`."""
    chosen = [t for t in tasks.split(",") if t] or list(supported)
    dropped = {t for t in exclude.split(",") if t}
    unknown = sorted((set(chosen) | dropped) - set(supported))
    if unknown:
        raise SystemExit(f"not supported tasks: {unknown}")
    left = [t for t in chosen if t not in dropped]
    if not left:
        raise SystemExit("no task left to play after --exclude")
    return left


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapters", nargs="+", metavar="NAME=DIR", help="the first is the baseline the others are paired with")
    ap.add_argument("--env", default="miniwob", help="environment family: miniwob, tooluse, sql, or package.module:Class")
    ap.add_argument("--tasks", default="", help="comma-separated supported tasks (empty = all)")
    ap.add_argument("--exclude", default="", help="comma-separated tasks to leave out (e.g. the training suite)")
    ap.add_argument("--eval-seeds", type=int, default=20)
    ap.add_argument("--eval-offset", type=int, default=3000)
    ap.add_argument("--model", default="smollm2-135m", help="the base model the adapters were trained on")
    ap.add_argument("--free", action="store_true", help="decode freely (default: held to the state's answers, as the pipeline "
                    "decodes: Sampling.constrained)")
    add_num_envs_argument(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    adapters = parse_adapters(args.adapters)
    env = load_environment(args.env)
    tasks = select_tasks(args.tasks, args.exclude, env.tasks)
    plan = SeedPlan.build(5, 20, args.eval_seeds, eval_offset=args.eval_offset)
    base = resolve_model(args.model)
    out = {"command": " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "environment": env.name, "tasks": tasks, "seeds": [plan.eval[0], plan.eval[-1]], "constrained": not args.free, "num_envs": args.num_envs, "baseline": adapters[0][0], "adapters": {}}
    episodes_of: dict[str, list[dict]] = {}
    for name, adapter in adapters:
        t0 = time.time()
        model, tokenizer = load_policy(base, adapter)
        eps = episodes_of[name] = run_episodes(LMPolicy(model, tokenizer, env), env, tasks, list(plan.eval), 1,
                                               Sampling(temperature=0.0, max_new_tokens=env.max_new_tokens, constrained=not args.free), None,
                                               policy_name=name, num_envs=args.num_envs or None)
        per = _per_task(eps, tasks)
        row = {"adapter": str(adapter), "mean": round(sum(per.values()) / len(per), 4), "per_task": per,
               "env_errors": sum(bool(e["env_error"]) for e in eps), "wall_s": round(time.time() - t0, 1),
               # a lost skill can be a wrong action or a malformed answer (format drift): say which
               "malformed_per_task": {t: sum(bool(e["invalid"]) for e in eps if e["task"] == t) for t in tasks},
               "malformed_examples": [[e["task"], next(st["output"] for st in e["steps"] if not st["valid"])]
                                      for e in eps if e["invalid"]][:5],
               "by_item": {f"{e['task']}/{e['seed']}": float(e["success"]) for e in eps if not e["env_error"]}}
        row["malformed"] = sum(row["malformed_per_task"].values())
        if name != adapters[0][0]:
            d, lo, hi = _paired_diff(episodes_of[adapters[0][0]], eps, seed=0)
            row["minus_baseline_points"] = [round(100 * d, 1), round(100 * lo, 1), round(100 * hi, 1)]
            row["decision"] = decide(d, lo, hi)
        out["adapters"][name] = row
        del model
    print(f"{len(tasks)} tasks x {args.eval_seeds} seeds from {plan.eval[0]}")
    print("| task | " + " | ".join(n for n, _ in adapters) + " |")
    print("|---|" + "---:|" * len(adapters))
    for t in tasks:
        print(f"| {t} | " + " | ".join(f"{100 * out['adapters'][n]['per_task'][t]:.0f}%" for n, _ in adapters) + " |")
    print("| mean | " + " | ".join(f"{100 * out['adapters'][n]['mean']:.1f}%" for n, _ in adapters) + " |")
    for name, row in out["adapters"].items():
        if "minus_baseline_points" in row:
            print(f"{name} - {adapters[0][0]}: {'{:+.1f} [{:+.1f}, {:+.1f}]'.format(*row['minus_baseline_points'])} points ({row['wall_s']} s)")
    for name, row in out["adapters"].items():
        print(f"{name}: {row['malformed']} of {len(tasks) * args.eval_seeds} episodes end on a malformed answer {row['malformed_examples'][:2]}")
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
