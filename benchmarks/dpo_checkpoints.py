"""DPO along its budget: which optimizer step, if any, keeps the SFT policy and gains?

A probe on a finished (or stopped) `learning.py` run: from its saved SFT adapter and round-1
rollouts it builds the same training pairs, trains DPO with the preset's settings (plus any
`--dpo` overrides), saves the adapter at each of `--steps`, and evaluates SFT and every saved
adapter greedily on the first `--items` held-out items per task of the rollouts' own suite.
`--also NAME=DIR` evaluates more adapters on the same items (e.g. the run's `rft_r1` and `dpo_r1`);
`--sft-adapter` may be any adapter to start DPO from (it is also the reference). No gates: for
the full loop use learning.py. Prints a table and writes JSON.

    python benchmarks/dpo_checkpoints.py --env tooluse --workdir /tmp/bench_tooluse \
        --sft-adapter /tmp/bench_tooluse/sft_r2 --steps 23,46 --items 10 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: `benchmarks` is not installed
from benchmarks.eval_adapter import parse_adapters  # noqa: E402
from benchmarks.learning import Clock, _act, _paired_diff, _per_task, _sampling, add_dpo_argument, dpo_config  # noqa: E402
from dpo_assets.configs import EvaluationConfig, PairsConfig, RolloutConfig  # noqa: E402
from dpo_assets.presets import op_configs, preset  # noqa: E402
from dpo_driver.demos import generate_demos  # noqa: E402
from dpo_driver.environment import load_environment  # noqa: E402
from dpo_driver.io import atomic_write_text  # noqa: E402
from dpo_driver.model import resolve_model  # noqa: E402
from dpo_driver.pairs import build_preference_pairs, to_dpo_records  # noqa: E402
from dpo_driver.policy import LMPolicy  # noqa: E402
from dpo_driver.stats import decide  # noqa: E402
from dpo_driver.tasks import SeedPlan  # noqa: E402
from dpo_driver.training import DPOParams, build_dpo_trainer, load_policy  # noqa: E402
from resources import TaskSuite  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", default="miniwob")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--workdir", type=Path, required=True, help="a learning.py --workdir with rollouts_r1.jsonl")
    ap.add_argument("--sft-adapter", type=Path, required=True)
    ap.add_argument("--steps", default="23,46", help="optimizer steps at which the adapter is saved and evaluated")
    ap.add_argument("--items", type=int, default=10, help="held-out items per task (the first of the eval band)")
    ap.add_argument("--eval-offset", type=int, default=0)
    ap.add_argument("--also", action="append", default=[], metavar="NAME=DIR",
                    help="another adapter to evaluate on the same items, paired with the start adapter (repeatable)")
    add_dpo_argument(ap)
    ap.add_argument("--start-name", default="sft", help="the start adapter's name in the table (e.g. rft)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-training", action="store_true",
                    help="evaluate the adapters an earlier run with the same --dpo saved, e.g. on a fresh --eval-offset")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    steps = sorted({int(s) for s in args.steps.split(",")})
    also = parse_adapters(args.also)
    if args.start_name in dict(also):
        raise SystemExit(f"--also name {args.start_name!r} is the start adapter's (--start-name)")

    cfg = preset(args.preset)
    ops = op_configs(cfg)
    suite = cfg["resources"]["task_suite"]["config"]
    env = load_environment(args.env)
    episodes = [json.loads(line) for line in open(args.workdir / "rollouts_r1.jsonl")]
    # The run's suite is the one its rollouts cover (a learning.py --tasks run is not the preset's).
    tasks = env.suite(list(dict.fromkeys(e["task"] for e in episodes)))
    plan = SeedPlan.build(suite["demo_seeds"], suite["rollout_seeds"], args.items, eval_offset=args.eval_offset,
                          n_pair_validation=TaskSuite(**suite).pair_validation_seeds)
    pair_cfg = PairsConfig(**ops["preference_pairs"])
    pairs = build_preference_pairs(episodes, pair_cfg.pair_params(), pair_cfg.score_weights(env), parse=env.parse)
    records = to_dpo_records(pairs)
    params = dpo_config(ops, args.dpo, args.seed)
    out = {"command": " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "environment": env.name, "dpo": params, "pairs": len(pairs), "pairs_by_task": pairs.groupby("task").size().to_dict(),
           "pairs_sha256": hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest(),
           "eval_seeds": [plan.eval[0], plan.eval[-1]], "items_per_task": args.items, "tasks": tasks,
           "start": {"name": args.start_name, "adapter": str(args.sft_adapter)}, "also": {n: str(d) for n, d in also}, "policies": {}, "wall": {}}
    base = resolve_model(cfg["resources"]["policy_model"]["config"]["model"])
    # One folder per (start adapter, DPO settings, seed): probes in one workdir do not overwrite each
    # other. Settings at DPOParams' defaults are left out, so a new option does not move old folders.
    defaults = asdict(DPOParams())
    settings = {k: v for k, v in params.items() if k not in defaults or v != defaults[k]}
    key = hashlib.sha256(json.dumps([str(args.sft_adapter.resolve()), settings], sort_keys=True).encode()).hexdigest()[:8]
    folder = args.workdir / f"dpo_checkpoints_s{args.seed}_{key}"

    from transformers import TrainerCallback

    class SaveAt(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):
            if state.global_step in steps:
                model.save_pretrained(str(folder / f"step{state.global_step}"), selected_adapters=["default"])

    if args.skip_training:
        missing = [s for s in steps if not (folder / f"step{s}" / "adapter_config.json").is_file()]
        if missing:
            raise SystemExit(f"--skip-training: no saved adapter for steps {missing} in {folder}; run once without it")
        out["training_skipped"] = f"adapters reused from {folder}"
    else:
        t = time.time()
        anchor = generate_demos(env, tasks, list(plan.demo)) if params.get("anchor_weight", 0) > 0 else None  # the SFT demos
        trainer = build_dpo_trainer(base, args.sft_adapter, records, folder / "scratch", DPOParams(**params), anchor=anchor)
        trainer.add_callback(SaveAt())
        trainer.train()
        out["wall"]["dpo"] = round(time.time() - t, 1)
        out["log_history"] = trainer.state.log_history
    eval_cfg, roll_cfg = EvaluationConfig(**ops["evaluation_report"]).model_dump(), RolloutConfig(**ops["rollout_trajectories"]).model_dump()
    clock = Clock()
    episodes_of: dict[str, list[dict]] = {}
    for name, adapter in [(args.start_name, args.sft_adapter), *also] + [(f"dpo@{s}", folder / f"step{s}") for s in steps]:
        model, tok = load_policy(base, Path(adapter))
        eps = episodes_of[name] = _act(clock, f"eval:{name}", LMPolicy(model, tok, env), env, tasks, list(plan.eval), 1,
                                       _sampling(eval_cfg, True, env), roll_cfg["max_steps"] or None)
        out["policies"][name] = {"tasks": _per_task(eps, tasks), "mean": float(np.mean([e["success"] for e in eps])),
                                 "by_item": {f"{e['task']}/{e['seed']}": float(e["success"]) for e in eps}}
        if name != args.start_name:  # paired with the start over the same items, as learning.py compares arms
            d, lo, hi = _paired_diff(episodes_of[args.start_name], eps, seed=0)
            out["policies"][name]["minus_start_points"] = [round(100 * d, 1), round(100 * lo, 1), round(100 * hi, 1)]
            out["policies"][name]["decision"] = decide(d, lo, hi)
    out["wall"].update(clock.wall)
    print(f"\n{out['pairs']} pairs ({out['pairs_sha256'][:8]}), DPO {params['max_steps']} steps in {out['wall'].get('dpo', 'reused')} s; "
          f"{args.items} items per task from seed {plan.eval[0]}")
    print("| policy | " + " | ".join(tasks) + f" | mean | − {args.start_name} [95%] |")
    print("|---|" + "---:|" * (len(tasks) + 2))
    for name, pol in out["policies"].items():
        diff = "{:+.1f} [{:+.1f}, {:+.1f}]".format(*pol["minus_start_points"]) if "minus_start_points" in pol else ""
        print(f"| {name} | " + " | ".join(f"{100 * pol['tasks'][t]:.0f}%" for t in tasks) + f" | {100 * pol['mean']:.0f}% | {diff} |")
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
