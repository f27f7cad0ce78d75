"""Learning benchmark: does environment-feedback DPO make the agent better — and better than RFT?

Runs the loop of a preset with plain functions (the same ones the Dagster assets call):
demos -> SFT -> rollouts -> pairs -> DPO (one or more on-policy rounds), plus on the same pairs
the RFT control (SFT continued on the chosen = successful actions, same steps, lr and batch),
then greedy evaluation of SFT, DPO, RFT and a random-valid-action baseline on held-out seeds.
Prints a table and writes JSON.

    python benchmarks/learning.py --preset default --seed 0 --json benchmarks/results/learning.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dpo_assets.checks import DPOGateConfig, SFTGateConfig
from dpo_assets.configs import DPOAdapterConfig, EvaluationConfig, PairsConfig, RolloutConfig, SFTAdapterConfig
from dpo_assets.presets import op_configs, preset
from dpo_driver.demos import generate_demos
from dpo_driver.dpo_gates import kl_to_reference, load_policy_and_reference, preference_accuracy, train_and_validation_pairs
from dpo_driver.eto import build_eto_pairs, expert_paths, expert_start_episodes, with_expert_fallback
from dpo_driver.io import atomic_write_jsonl, atomic_write_text
from dpo_driver.model import bf16_is_native, resolve_model
from dpo_driver.pairs import build_preference_pairs, expert_start_count, merge_pairs, pair_yield, to_dpo_records, to_kto_records
from dpo_driver.policy import LMPolicy, RandomPolicy, Sampling
from dpo_driver.report import build_report
from dpo_driver.rollouts import run_episodes
from dpo_driver.stats import decide, paired_bootstrap_diff
from dpo_driver.environment import load_environment
from dpo_driver.tasks import SeedPlan
from dpo_driver.tracking import package_versions
from dpo_driver.training import (DPOParams, SFTParams, TrainResult, chosen_records, init_adapter, load_policy, sft_params_like, train_dpo,
                                 train_kto, train_sft)
from resources import TaskSuite
from dpo_driver.validation import Round, round_message, train_until_ready, validate_policy, validation_seeds


LOOP_STAGES = ("model", "demos", "sft", "sft_validation", "eval:sft", "rollouts_r1:sft", "dpo_r1", "eval:dpo_r1")


class Clock:
    def __init__(self):
        self.wall: dict[str, float] = {}
        self.tokens: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        yield
        self.wall[name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {self.wall[name]} s", flush=True)


def _sampling(cfg: dict, greedy: bool, env) -> Sampling:
    tokens = cfg["max_new_tokens"] or env.max_new_tokens
    if greedy:
        return Sampling(temperature=0.0, max_new_tokens=tokens, batch_size=cfg["batch_size"], constrained=cfg["constrained"])
    return Sampling(cfg["temperature"], cfg["top_k"], cfg["top_p"], tokens, cfg["batch_size"], cfg["strategy"], cfg["constrained"])


def _act(clock: Clock, name: str, policy, env, tasks, seeds, k, sampling, max_steps, num_envs: int | None = None) -> list[dict]:
    with clock.stage(name):
        eps = run_episodes(policy, env, tasks, seeds, k, sampling, max_steps, policy_name=name.split(":")[-1], num_envs=num_envs)
    s = policy.stats
    clock.tokens[name] = {"new_tokens": s.new_tokens, "prompt_tokens": s.prompt_tokens, "gen_seconds": round(s.seconds, 1),
                          "tokens_per_second": round(s.tokens_per_second, 1)}
    return eps


def rft_records(pairs: pd.DataFrame) -> list[dict]:
    """The RFT control's data: the chosen (successful) action of every pair, nothing from failures."""
    return chosen_records(to_dpo_records(pairs))


def _per_task(episodes: list[dict], tasks: list[str]) -> dict[str, float]:
    """Success rate per task over the episodes without a browser fault."""
    return {t: round(float(np.mean([e["success"] for e in episodes if e["task"] == t and not e["env_error"]])), 4) for t in tasks}


def _paired_diff(baseline: list[dict], candidate: list[dict], seed: int) -> tuple[float, float, float]:
    """Candidate - baseline success with its paired bootstrap interval, over the (task, seed)
    episodes both policies ran without a browser fault, stratified by task."""
    def by_key(eps):
        return {(e["task"], e["seed"]): float(e["success"]) for e in eps if not e["env_error"]}

    a, b = by_key(baseline), by_key(candidate)
    keys = sorted(a.keys() & b.keys())
    return paired_bootstrap_diff(np.array([a[k] for k in keys]), np.array([b[k] for k in keys]),
                                 strata=[k[0] for k in keys], seed=seed)


def stage_config(ops: dict, op: str, config_cls, overrides: str, flag: str):
    """The preset's `op` config with `flag`'s JSON overrides, validated by the asset's own Config class."""
    extra = json.loads(overrides)
    unknown = sorted(set(extra) - set(config_cls.model_fields))  # the Config class would keep a typo silently
    if unknown:
        raise ValueError(f"{flag}: unknown {op} option(s) {unknown}; known: {sorted(config_cls.model_fields)}")
    return config_cls(**{**ops[op], **extra})


def dpo_config(ops: dict, overrides: str, seed: int) -> dict:
    """The preset's dpo_adapter config with `--dpo` JSON overrides."""
    return {**stage_config(ops, "dpo_adapter", DPOAdapterConfig, overrides, "--dpo").model_dump(), "seed": seed}


def add_num_envs_argument(ap) -> None:
    ap.add_argument("--num-envs", type=int, default=0, help="evaluation_report.num_envs: evaluation plays this many sessions at once "
                    "(MiniWoB: browsers in lockstep); 0 = the preset's")


def add_dpo_argument(ap) -> None:
    ap.add_argument("--dpo", default="{}", help='JSON overrides of the preset\'s dpo_adapter config, e.g. \'{"anchor_weight": 0}\'')


def add_sft_argument(ap) -> None:
    ap.add_argument("--sft", default="{}", help='JSON overrides of the preset\'s sft_adapter config, e.g. \'{"micro_batch_size": 1}\'')


def add_rollouts_argument(ap) -> None:
    ap.add_argument("--rollouts", default="{}", help='JSON overrides of the preset\'s rollout_trajectories config, applied in '
                    'every round, e.g. \'{"expert_starts": true}\'')


def rollout_config(ops: dict, overrides: str) -> dict:
    """The preset's rollout_trajectories config with `--rollouts` JSON overrides. The benchmark samples
    its own rollouts, so logged traces (the DAG's traces_path) are refused."""
    cfg = stage_config(ops, "rollout_trajectories", RolloutConfig, overrides, "--rollouts").model_dump()
    if cfg["traces_path"]:
        raise ValueError("--rollouts: traces_path is the DAG's logged-trace source; the benchmark samples its own rollouts")
    return cfg


def run(args) -> dict:
    cfg = preset(args.preset)
    ops = op_configs(cfg)
    suite = cfg["resources"]["task_suite"]["config"]
    model_name = args.model or cfg["resources"]["policy_model"]["config"]["model"]
    env = load_environment(args.env)
    tasks = env.suite(args.tasks.split(",") if args.tasks else (suite.get("tasks") if args.env == "miniwob" else None))
    plan = SeedPlan.build(args.demo_seeds or suite["demo_seeds"], args.rollout_seeds or suite["rollout_seeds"], args.eval_seeds or suite["eval_seeds"],
                           eval_offset=args.eval_offset,
                           n_pair_validation=args.pair_validation_seeds or TaskSuite(**suite).pair_validation_seeds)
    # Through the assets' own Config classes: the benchmark trains with exactly the DAG's defaults.
    sft_stage = stage_config(ops, "sft_adapter", SFTAdapterConfig, args.sft, "--sft")
    sft_cfg = {**asdict(sft_stage.sft_params()), "seed": args.seed}
    dpo_cfg = dpo_config(ops, args.dpo, args.seed)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for arm in arms:  # an arm that is the run's own DPO objective would train the same adapter again
        if arm.split("+") == list(dpo_cfg["loss_type"]):
            raise SystemExit(f"arm {arm!r} is the preset's own DPO loss ({'+'.join(dpo_cfg['loss_type'])}): "
                             "its adapter would be the run's DPO adapter, byte for byte")
    roll_cfg = rollout_config(ops, args.rollouts)
    if roll_cfg["expert_starts"] and "backplay" in arms:  # that arm is expert starts added to round 1: the run's DPO already has them
        raise SystemExit("arm 'backplay' with --rollouts expert_starts: the run's own DPO already trains on expert starts")
    eval_cfg = EvaluationConfig(**ops["evaluation_report"]).model_dump()
    if args.constrained or args.free:  # rollouts and evaluation, every arm alike
        roll_cfg["constrained"] = eval_cfg["constrained"] = args.constrained
    if args.num_envs:
        eval_cfg["num_envs"] = args.num_envs
    gate_cfgs = DPOGateConfig(**ops.get("dpo_adapter_gates", {})).model_dump()
    pair_cfg = PairsConfig(**ops["preference_pairs"])  # the asset's own config class: same defaults
    pair_params, weights = pair_cfg.pair_params(), pair_cfg.score_weights(env)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dpo-learning-"))
    clock = Clock()
    max_steps = roll_cfg["max_steps"] or None  # None: each task's own step limit

    with clock.stage("model"):
        base = resolve_model(model_name)
    with clock.stage("demos"):
        demos = generate_demos(env, tasks, list(plan.demo))
    gate_cfg = SFTGateConfig(**ops.get("sft_adapter_validation", {}))  # the check's own defaults
    validation = generate_demos(env, tasks, validation_seeds(suite.get("validation_seeds", 10), plan.demo))
    validation_prompts = list(dict.fromkeys(r["prompt"][0]["content"] for r in validation))
    sft_params = SFTParams(**sft_cfg)

    def check(adapter: Path):  # the DAG's SFT gate measure, on the same validation slice of the demo band
        return validate_policy(LMPolicy(*load_policy(base, adapter), env=env), validation, env.parse,
                               sft_stage.validation_max_new_tokens or env.max_new_tokens)

    def train_round(r: int, previous: Path | None):
        res = train_sft(base, demos, work / f"sft_r{r}", sft_params, init_adapter_dir=previous)
        return res.adapter_dir, res

    def report_round(rd):
        if rd.validation:
            print(round_message(rd, sft_params.until_expert_match), flush=True)

    with clock.stage("sft"):  # rounds of max_steps until the held-out expert match is reached, as in the DAG
        if args.sft_adapter:  # a finished SFT stage of an earlier run: the rest of the loop on top of it
            sft_rounds = [Round(TrainResult(Path(args.sft_adapter), {}, len(demos), []), None)]
        else:
            sft_rounds = train_until_ready(train_round, check, sft_params.until_expert_match, sft_params.max_rounds, on_round=report_round)
        sft = sft_rounds[-1].result
    with clock.stage("sft_validation"):
        # The DAG's blocking SFT gate; here it is reported, not enforced. A reused SFT stage was
        # measured by the run that trained it; it is not measured again here.
        val = sft_rounds[-1].validation or (None if args.sft_adapter else check(sft.adapter_dir))
        if val is None:
            sft_validation = {"passed": None, "message": "not re-measured: the SFT stage is reused (--sft-adapter)"}
        else:
            passed, message = val.verdict(gate_cfg.min_valid_fraction, gate_cfg.min_expert_match)
            sft_validation = {"passed": passed, "message": message, "valid_fraction": round(val.valid_fraction, 4),
                              "expert_match": round(val.expert_match, 4), "states": val.num_states, "rounds": len(sft_rounds),
                              "round_expert_match": [round(rd.validation.expert_match, 4) for rd in sft_rounds if rd.validation]}
            print(message, flush=True)

    current, current_name = sft.adapter_dir, "sft"
    # The control gets DPO's budget: the same steps (or epochs) on the same chosen side, plus the
    # steps DPO's own chosen-side SFT stage takes (chosen_sft_steps) when it has one and counts steps.
    extra = dpo_cfg.get("chosen_sft_steps", 0) if dpo_cfg["max_steps"] else 0
    rft_params = sft_params_like(DPOParams(**dpo_cfg), max_steps=dpo_cfg["max_steps"] + extra,
                                 num_train_epochs=dpo_cfg["num_train_epochs"], min_steps=dpo_cfg["min_steps"])
    rounds, first_pairs, first_episodes = [], None, None
    arm_stats: dict[str, dict] = {}  # the expert-chosen arms' pair counts
    eval_eps: dict[str, list[dict]] = {}

    def evaluate(name: str, adapter: Path | None, policy=None) -> list[dict]:
        if policy is None:
            m, tok = load_policy(base, adapter)
            policy = LMPolicy(m, tok, env)
        eps = _act(clock, f"eval:{name}", policy, env, tasks, list(plan.eval), 1, _sampling(eval_cfg, True, env), max_steps,
                   eval_cfg["num_envs"] or None)
        eval_eps[name] = eps
        return eps

    evaluate("sft", sft.adapter_dir)
    rft_current = sft.adapter_dir
    for r in range(1, args.rounds + 1):
        m, tok = load_policy(base, current)
        episodes = _act(clock, f"rollouts_r{r}:{current_name}", LMPolicy(m, tok, env), env, tasks, list(plan.rollout),
                        roll_cfg["samples_per_seed"], _sampling(roll_cfg, False, env), max_steps)
        if roll_cfg["expert_starts"]:  # as rollout_trajectories does: after the training seeds, before the validation ones
            with clock.stage(f"expert_starts_r{r}"):
                episodes += expert_start_episodes(LMPolicy(m, tok, env), env, episodes, roll_cfg["samples_per_seed"],
                                                  _sampling(roll_cfg, False, env), max_steps, policy_name=current_name)
        atomic_write_jsonl(work / f"rollouts_r{r}.jsonl", episodes)  # kept for diffing reruns and offline probes
        held_eps = []
        if plan.pair_validation:  # as rollout_trajectories does: the validation seeds after the training ones
            held_eps = _act(clock, f"rollouts_val_r{r}:{current_name}", LMPolicy(m, tok, env), env, tasks, list(plan.pair_validation),
                            roll_cfg["samples_per_seed"], _sampling(roll_cfg, False, env), max_steps)
        # As preference_pairs does: training pairs from the training seeds, held-out ones apart.
        train_pairs, held_out = train_and_validation_pairs(
            episodes + [{**e, "split": "validation"} for e in held_eps],
            lambda eps: build_preference_pairs(eps, pair_params, weights, parse=env.parse), pair_cfg.validation_fraction)
        stats = {**pair_yield(episodes, train_pairs), "expert_start_episodes": expert_start_count(episodes)}
        if first_pairs is None:
            first_pairs, first_episodes = train_pairs, episodes
        if train_pairs.empty:
            rounds.append({"round": r, **stats, "decision": "no pairs"})
            break
        with clock.stage(f"dpo_r{r}"):
            dpo = train_dpo(base, current, to_dpo_records(train_pairs), work / f"dpo_r{r}", DPOParams(**dpo_cfg), anchor=demos)
        with clock.stage(f"dpo_gates_r{r}"):  # the DAG's blocking dpo_adapter checks; reported here, not enforced
            loaded = load_policy_and_reference(base, dpo.adapter_dir, current)
            acc = preference_accuracy(base, dpo.adapter_dir, current, to_dpo_records(held_out), loaded=loaded)
            kl = kl_to_reference(base, dpo.adapter_dir, current, validation_prompts[: gate_cfgs["max_prompts"]],
                                 gate_cfgs["max_new_tokens"] or env.max_new_tokens, loaded=loaded)
            del loaded
            gates = {"preference_accuracy": round(acc.accuracy, 4), "validation_pairs": acc.num_pairs,
                     "preference_accuracy_passed": acc.verdict(gate_cfgs["min_preference_accuracy"])[0],
                     "kl_per_token": round(kl.kl_per_token, 4), "kl_passed": kl.verdict(gate_cfgs["max_kl"])[0]}
            print(f"gates r{r}: {gates}", flush=True)
        if "rft" in arms:
            # The control sees the same rollouts round by round: it continues its own previous round
            # on this round's chosen actions with DPO's data, steps, lr and batch; only the loss differs.
            with clock.stage(f"rft_r{r}"):
                # With DPO's demo anchor on, the control also sees the demos: the same data, another loss.
                rft_data = rft_records(train_pairs) + (demos if dpo_cfg.get("anchor_weight", 0) > 0 else [])
                rft_current = train_sft(base, rft_data, work / f"rft_r{r}", rft_params, init_adapter_dir=rft_current).adapter_dir
        name = f"dpo_r{r}"
        evaluate(name, dpo.adapter_dir)
        prev = np.array([e["success"] for e in eval_eps[current_name]], float)
        new = np.array([e["success"] for e in eval_eps[name]], float)
        strata = [e["task"] for e in eval_eps[name]]
        diff, lo, hi = paired_bootstrap_diff(prev, new, strata=strata, seed=args.seed)
        verdict = decide(diff, lo, hi)
        # A round is promoted unless it is shown worse than the policy it started from.
        promoted = verdict != "keep previous"
        rounds.append({"round": r, **stats, "dpo_gates": gates, "dpo_metrics": {k: round(v, 4) for k, v in dpo.metrics.items()},
                       "tasks": _per_task(eval_eps[name], tasks),
                       "mean_success": round(float(new.mean()), 4), "vs_previous_points": round(100 * diff, 1),
                       "ci_points": [round(100 * lo, 1), round(100 * hi, 1)], "decision": verdict, "promoted": promoted})
        if "rft" in arms:
            # Round by round against the control trained on the same rollouts: after round 2 the
            # control has also learned from the DPO policy's rollouts, so only this pairing is like for like.
            rft_eps = evaluate(f"rft_r{r}", rft_current)
            d, lo, hi = _paired_diff(rft_eps, eval_eps[name], args.seed)
            rounds[-1].update(rft_tasks=_per_task(rft_eps, tasks), rft_mean_success=round(float(np.mean([e["success"] for e in rft_eps])), 4),
                              dpo_minus_rft_points=round(100 * d, 1), dpo_minus_rft_ci_points=[round(100 * lo, 1), round(100 * hi, 1)])
            eval_eps["rft"] = rft_eps  # the control's last round, for the summary
        if promoted:
            current, current_name = dpo.adapter_dir, name
    if "eto" in arms and first_episodes is not None:
        # ETO-style peer method on round 1's rollouts: the expert's action where the SFT policy failed.
        with clock.stage("arm:eto"):
            fails = {}
            for e in first_episodes:
                if not e["success"] and not e["env_error"]:
                    fails.setdefault(e["task"], set()).add(int(e["seed"]))
            eto = build_eto_pairs(first_episodes, expert_paths(env, {t: sorted(v) for t, v in fails.items()}), env.parse,
                                  pair_params.max_pairs_per_prompt)
            arm_stats["eto"] = {"pairs": int(len(eto))}
            if not eto.empty:
                res = train_dpo(base, sft.adapter_dir, to_dpo_records(eto), work / "arm_eto", DPOParams(**dpo_cfg), anchor=demos)
        if not eto.empty:
            evaluate("arm:eto", res.adapter_dir)
    if "fallback" in arms and first_pairs is not None:
        # Round 1's environment-feedback pairs plus ETO pairs at the seeds no rollout solved: the
        # expert is asked only where the policy's own successes give no chosen side.
        with clock.stage("arm:fallback"):
            mixed, counts = with_expert_fallback(first_pairs, first_episodes, env, pair_params.max_pairs_per_prompt)
            arm_stats["fallback"] = {"pairs": int(len(mixed)), **counts}
            if not mixed.empty:
                res = train_dpo(base, sft.adapter_dir, to_dpo_records(mixed), work / "arm_fallback", DPOParams(**dpo_cfg), anchor=demos)
        if not mixed.empty:
            evaluate("arm:fallback", res.adapter_dir)
    if "backplay" in arms and first_pairs is not None:
        # Round 1's pairs plus the pairs of episodes the SFT policy plays from the expert's states at
        # the seeds no rollout solved (eto.expert_start_episodes): the chosen side stays the policy's.
        m, tok = load_policy(base, sft.adapter_dir)
        with clock.stage("rollouts:backplay"):
            starts = expert_start_episodes(LMPolicy(m, tok, env), env, first_episodes, roll_cfg["samples_per_seed"],
                                           _sampling(roll_cfg, False, env), max_steps, policy_name="sft")
            atomic_write_jsonl(work / "rollouts_backplay.jsonl", starts)
        del m, tok
        with clock.stage("arm:backplay"):
            mixed = merge_pairs(first_pairs, build_preference_pairs(starts, pair_params, weights, parse=env.parse))
            arm_stats["backplay"] = {"pairs": int(len(mixed)), "expert_start_pairs": int(len(mixed) - len(first_pairs)),
                                     "episodes": len(starts), "successes": sum(bool(e["success"]) for e in starts),
                                     "seeds": len({(e["task"], e["seed"]) for e in starts})}
            print(f"backplay: {arm_stats['backplay']}", flush=True)
            if not mixed.empty:
                res = train_dpo(base, sft.adapter_dir, to_dpo_records(mixed), work / "arm_backplay", DPOParams(**dpo_cfg), anchor=demos)
        if not mixed.empty:
            evaluate("arm:backplay", res.adapter_dir)
    if "zero" in arms:
        # Zero demos: the base model (an untrained LoRA) explores with every action the page offers;
        # its successes become chosen and DPO trains from it against its frozen copy (the base).
        zero = init_adapter(base, work / "zero_start", SFTParams(**sft_cfg))
        base_eps = evaluate("base", zero)
        m, tok = load_policy(base, zero)
        zero_roll = _act(clock, "rollouts_zero:base", LMPolicy(m, tok, env), env, tasks, list(plan.rollout), roll_cfg["samples_per_seed"],
                         replace(_sampling(roll_cfg, False, env), strategy="candidates"), max_steps)
        zero_pairs = build_preference_pairs(zero_roll, pair_params, weights, parse=env.parse)
        zero_stats = {"base_mean": round(float(np.mean([e["success"] for e in base_eps])), 4), **pair_yield(zero_roll, zero_pairs)}
        if not zero_pairs.empty:
            with clock.stage("dpo_zero"):
                # No demos to anchor to: the zero-demo arm trains on its own successes only.
                zres = train_dpo(base, zero, to_dpo_records(zero_pairs), work / "dpo_zero", DPOParams(**{**dpo_cfg, "anchor_weight": 0.0}))
            evaluate("zero_dpo", zres.adapter_dir)
    objective_arms = [a for a in arms if a not in ("rft", "none", "eto", "fallback", "backplay", "zero")]
    if objective_arms and first_pairs is not None and not first_pairs.empty:
        # Other preference objectives on round 1's rollouts, from the same SFT adapter and with DPO's
        # hyperparameters: TRL DPO losses on the same pairs, or KTO on unpaired success/failure steps.
        for arm in objective_arms:
            out_dir = work / f"arm_{arm.replace('+', '_')}"
            with clock.stage(f"arm:{arm}"):
                if arm == "kto":
                    res = train_kto(base, sft.adapter_dir, to_kto_records(first_episodes, env.parse if pair_params.rejected_must_parse else None, pair_params.shortest_chosen),
                                    out_dir, DPOParams(**dpo_cfg))
                else:
                    res = train_dpo(base, sft.adapter_dir, to_dpo_records(first_pairs), out_dir,
                                    DPOParams(**{**dpo_cfg, "loss_type": arm.split("+")}), anchor=demos)
            evaluate(f"arm:{arm}", res.adapter_dir)
    evaluate("random", None, policy=RandomPolicy(env))

    final = current_name if current_name != "sft" else ("dpo_r1" if "dpo_r1" in eval_eps else "sft")
    frame = pd.DataFrame([{**e, "policy": ("dpo" if p == final else p)} for p, eps in eval_eps.items()
                          for e in eps if p in ("sft", "rft", "random", final)])
    frame = frame[~frame["env_error"]]
    if final == "sft":  # --rounds 0: SFT (and the random baseline) only; its rows, labelled "dpo" above, are SFT's too
        frame = pd.concat([frame, frame[frame["policy"] == "dpo"].assign(policy="sft")])
    report = build_report(frame[["policy", "task", "seed", "success"]], baseline="sft", candidate="dpo", seed=args.seed)
    out = {"command": " ".join(shlex.quote(a) for a in sys.argv), "environment": env.name, "preset": args.preset, "seed": args.seed, "task_suite": tasks,
           "model": model_name, "sft_adapter_reused": args.sft_adapter or None, "tasks": {}, "rounds": rounds, "final_policy": final, "wall_seconds": clock.wall,
           "generation": clock.tokens, "packages": package_versions(), "python": platform.python_version(),
           "precision": "bfloat16" if bf16_is_native() else "float32", "cpu_threads": torch.get_num_threads(),
           "seeds": {"demo": [plan.demo[0], plan.demo[-1]], "rollout": [plan.rollout[0], plan.rollout[-1]],
                     "eval": [plan.eval[0], plan.eval[-1]],
                     "pair_validation": [plan.pair_validation[0], plan.pair_validation[-1]] if plan.pair_validation else []}}
    out["dpo_config"] = dpo_cfg  # the preset's, with any --dpo overrides
    out["sft_config"] = sft_cfg  # the preset's, with any --sft overrides
    out["rollout_config"] = roll_cfg  # the preset's, with any --rollouts overrides
    out["constrained"] = {"rollouts": roll_cfg["constrained"], "evaluation": eval_cfg["constrained"]}
    out["eval_num_envs"] = eval_cfg["num_envs"]  # 0: the family's own loop
    for t in tasks:
        row = {p: round(report.table.loc[t, f"{p}_rate"], 4) for p in ("sft", "dpo", "rft", "random") if f"{p}_rate" in report.table}
        row["n"] = int(report.table.loc[t, "sft_n"])
        row["dpo_minus_sft_points"] = round(report.table.loc[t, "diff_points"], 1)
        out["tasks"][t] = row
    for p in ("sft", "dpo", "rft", "random"):
        if f"{p}_rate" in report.table:
            out[f"mean_{p}"] = round(float(report.table.loc["mean", f"{p}_rate"]), 4)
    if final == "sft":  # the "dpo" column above is SFT itself: drop it and the comparison
        for row in out["tasks"].values():
            row.pop("dpo"), row.pop("dpo_minus_sft_points")
        out.pop("mean_dpo")
    else:
        out["dpo_minus_sft_points"] = round(report.summary["dpo_minus_sft_points"], 1)
        out["diff_ci_low_points"] = round(report.summary["diff_ci_low_points"], 1)
        out["diff_ci_high_points"] = round(report.summary["diff_ci_high_points"], 1)
        out["decision"] = report.decision
    if "rft" in eval_eps:
        d, lo, hi = _paired_diff(eval_eps["rft"], eval_eps[final], args.seed)
        out.update(dpo_minus_rft_points=round(100 * d, 1), dpo_minus_rft_ci_low_points=round(100 * lo, 1),
                   dpo_minus_rft_ci_high_points=round(100 * hi, 1), dpo_beats_rft=decide(d, lo, hi))
    out["sft_validation"] = sft_validation
    for arm, stats in arm_stats.items():  # expert-chosen arms, against the run's DPO on the same episodes
        out[arm] = stats
        if f"arm:{arm}" in eval_eps:
            d, lo, hi = _paired_diff(eval_eps[f"arm:{arm}"], eval_eps[final], args.seed)
            out[arm].update(mean=round(float(np.mean([e["success"] for e in eval_eps[f"arm:{arm}"]])), 4),
                            tasks=_per_task(eval_eps[f"arm:{arm}"], tasks), **{f"dpo_minus_{arm}_points": round(100 * d, 1)},
                            ci_points=[round(100 * lo, 1), round(100 * hi, 1)])
    if "zero" in arms:
        out["zero"] = zero_stats
        if "zero_dpo" in eval_eps:
            d, lo, hi = _paired_diff(eval_eps["base"], eval_eps["zero_dpo"], args.seed)
            out["zero"].update(dpo_mean=round(float(np.mean([e["success"] for e in eval_eps["zero_dpo"]])), 4),
                               tasks=_per_task(eval_eps["zero_dpo"], tasks), dpo_minus_base_points=round(100 * d, 1),
                               ci_points=[round(100 * lo, 1), round(100 * hi, 1)])
    # Per-episode success of every evaluated policy ("task:seed" -> 0/1, browser faults left out), so
    # benchmarks/suites.py can pool paired differences over training seeds and suites.
    named = {"sft": "sft", "dpo": final, "rft": "rft", "random": "random", "eto": "arm:eto", "fallback": "arm:fallback", "backplay": "arm:backplay", "base": "base", "zero_dpo": "zero_dpo"}
    if final == "sft":
        named.pop("dpo")
    out["eval_success"] = {k: {f"{e['task']}:{e['seed']}": int(e["success"]) for e in eval_eps[v] if not e["env_error"]}
                           for k, v in named.items() if v in eval_eps}
    for arm in objective_arms:
        eps = [e for e in eval_eps.get(f"arm:{arm}", []) if not e["env_error"]]
        if not eps:
            continue
        entry = out.setdefault("arms", {})[arm] = {"tasks": _per_task(eps, tasks), "mean": round(float(np.mean([e["success"] for e in eps])), 4)}
        # The arm against SFT (`ci_points`), the run's DPO and the RFT control, each paired on the same episodes.
        for key, other in (("minus_sft", "sft"), ("minus_dpo", final), ("minus_rft", "rft")):
            if other in eval_eps:
                d, lo, hi = _paired_diff(eval_eps[other], eps, args.seed)
                entry[f"{key}_points"] = round(100 * d, 1)
                entry["ci_points" if key == "minus_sft" else f"{key}_ci_points"] = [round(100 * lo, 1), round(100 * hi, 1)]
    if first_pairs is not None:
        out["pairs"] = int(len(first_pairs))
        out["pair_yield"] = rounds[0].get("pair_yield") if rounds else None
        out["pairs_sha256"] = hashlib.sha256(first_pairs.to_json(orient="records").encode()).hexdigest()
    out["wall_seconds"]["total"] = round(sum(v for k, v in clock.wall.items()), 1)
    # What the Dagster DAG runs for one round (demos -> SFT -> rollouts -> pairs -> DPO -> evaluation
    # of SFT and DPO), without the controls and baselines only the benchmark adds.
    out["wall_seconds"]["loop"] = round(sum(clock.wall.get(k, 0.0) for k in LOOP_STAGES), 1)
    out["report_markdown"] = report.markdown if final != "sft" else None
    return out


def print_table(res: dict) -> None:
    pkgs = res["packages"]
    print(f"\ncommand: {res['command']}\npreset {res['preset']}, seed {res['seed']}, model {res['model']}, seeds {res['seeds']}, "
          f"{res['precision']} on {res['cpu_threads']} threads\n"
          + ", ".join(f"{k} {pkgs[k]}" for k in ("torch", "transformers", "trl", "peft", "miniwob") if k in pkgs))
    pols = [p for p in ("sft", "dpo", "rft", "random") if f"mean_{p}" in res]
    compared = "dpo_minus_sft_points" in res
    print(f"\n{'task':<14}" + "".join(f"{p:>9}" for p in pols) + (f"{'DPO-SFT':>9}" if compared else "") + f"{'n':>5}")
    for t, row in res["tasks"].items():
        print(f"{t:<14}" + "".join(f"{row[p]:>9.0%}" for p in pols) + (f"{row['dpo_minus_sft_points']:>+9.1f}" if compared else "") + f"{row['n']:>5}")
    print(f"{'mean':<14}" + "".join(f"{res['mean_' + p]:>9.0%}" for p in pols) + (f"{res['dpo_minus_sft_points']:>+9.1f}" if compared else ""))
    if compared:
        print(f"\nDPO - SFT: {res['dpo_minus_sft_points']:+.1f} points, 95% CI [{res['diff_ci_low_points']:+.1f}, "
              f"{res['diff_ci_high_points']:+.1f}] -> {res['decision']}")
    if "dpo_minus_rft_points" in res:
        print(f"DPO - RFT: {res['dpo_minus_rft_points']:+.1f} points, 95% CI [{res['dpo_minus_rft_ci_low_points']:+.1f}, "
              f"{res['dpo_minus_rft_ci_high_points']:+.1f}] -> {res['dpo_beats_rft']}")
    print(f"pairs: {res.get('pairs')}  pair yield: {res.get('pair_yield')}")
    for r in res["rounds"]:
        if "mean_success" not in r:
            print(f"round {r['round']}: {r['pairs']} pairs -> {r['decision']}")
            continue
        per_task = ", ".join(f"{t} {v:.0%}" for t, v in r["tasks"].items())
        print(f"round {r['round']}: {r['pairs']} pairs, mean {r['mean_success']:.1%} ({per_task}); "
              f"vs previous {r['vs_previous_points']:+.1f} {r['ci_points']} -> {r['decision']}")
        if "rft_mean_success" in r:
            print(f"         RFT control {r['rft_mean_success']:.1%}; DPO - RFT {r['dpo_minus_rft_points']:+.1f} {r['dpo_minus_rft_ci_points']}")
    if res.get("sft_validation", {}).get("passed") is not None:
        v = res["sft_validation"]
        print(f"SFT gate: {'pass' if v['passed'] else 'FAIL'} ({v['valid_fraction']:.0%} valid, {v['expert_match']:.0%} expert match, {v['states']} states)")
    if res.get("eto", {}).get("mean") is not None:
        e = res["eto"]
        print(f"ETO arm (expert chosen, {e['pairs']} pairs): mean {e['mean']:.0%}; DPO - ETO {e['dpo_minus_eto_points']:+.1f} {e['ci_points']}")
    if res.get("fallback", {}).get("mean") is not None:
        e = res["fallback"]
        print(f"fallback arm (DPO pairs + {e['expert_pairs']} expert pairs at {e['unsolved_seeds']} unsolved seeds): "
              f"mean {e['mean']:.0%}; DPO - fallback {e['dpo_minus_fallback_points']:+.1f} {e['ci_points']}")
    if res.get("backplay", {}).get("mean") is not None:
        e = res["backplay"]
        print(f"backplay arm (DPO pairs + {e['expert_start_pairs']} pairs from {e['episodes']} episodes at the expert's states of "
              f"{e['seeds']} unsolved seeds, {e['successes']} successes): mean {e['mean']:.0%}; DPO - backplay "
              f"{e['dpo_minus_backplay_points']:+.1f} {e['ci_points']}; per task {e['tasks']}")
    if res.get("zero", {}).get("dpo_mean") is not None:
        z = res["zero"]
        print(f"zero-demo arm: base {z['base_mean']:.0%} -> DPO {z['dpo_mean']:.0%} ({z['pairs']} pairs); "
              f"{z['dpo_minus_base_points']:+.1f} {z['ci_points']}")
    for arm, row in res.get("arms", {}).items():
        print(f"arm {arm}: mean {row['mean']:.0%}, minus SFT {row['minus_sft_points']:+.1f} {row['ci_points']}"
              + "".join(f", minus {name} {row[f'minus_{key}_points']:+.1f} {row[f'minus_{key}_ci_points']}"
                        for key, name in (("dpo", "DPO"), ("rft", "RFT")) if f"minus_{key}_points" in row))
    print("wall seconds: " + ", ".join(f"{k} {v}" for k, v in res["wall_seconds"].items()))
    print("generation: " + ", ".join(f"{k} {v['tokens_per_second']} tok/s" for k, v in res["generation"].items()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default", help="dpo_assets.presets name (tiny, default)")
    ap.add_argument("--model", default="", help="override the preset's base model (preset name, path or HF id)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="on-policy rounds of rollouts -> pairs -> DPO; 0 = SFT and its evaluation only")
    ap.add_argument("--arms", default="rft", help="comma-separated arms on the same rollouts: rft (SFT on chosen), none, eto "
                    "(DPO on expert-chosen / policy-failed pairs), fallback (DPO's pairs plus ETO pairs at seeds no "
                    "rollout solved), backplay (DPO's pairs plus pairs of the SFT policy's episodes from the expert's states at those seeds), zero (DPO from the base model with zero demos, candidate "
                    "exploration), kto "
                    "(unpaired success/failure steps of round 1), or a TRL DPO loss_type list joined by + (e.g. ipo, "
                    "sigmoid, sigmoid+sft) trained on round 1's pairs")
    ap.add_argument("--env", default="miniwob", help="environment family: miniwob, tooluse, sql, or package.module:Class")
    ap.add_argument("--tasks", default="", help="override the preset's task suite (comma-separated task names of the family; "
                    "empty = the preset's suite for miniwob, the family's default suite otherwise)")
    ap.add_argument("--eval-seeds", type=int, default=0, help="override held-out seeds per task")
    ap.add_argument("--demo-seeds", type=int, default=0, help="override expert demos per task (what the SFT gate asks for when it fails)")
    ap.add_argument("--rollout-seeds", type=int, default=0, help="override rollout seeds per task (the rollouts' cost is per task: "
                    "a large suite may need fewer)")
    ap.add_argument("--pair-validation-seeds", type=int, default=0, help="override the held-out pairs' rollout seeds per task "
                    "(what the preference-accuracy gate reads)")
    ap.add_argument("--eval-offset", type=int, default=0,
                    help="start the held-out seeds this far into the eval band (a range no tuning has looked at)")
    ap.add_argument("--sft-adapter", default="", help="skip SFT: start from this adapter (an earlier run's SFT stage, trained "
                    "with the same preset, suite and seed; its wall time is not in this run's)")
    add_dpo_argument(ap)
    add_sft_argument(ap)
    add_rollouts_argument(ap)
    decoding = ap.add_mutually_exclusive_group()  # neither: the preset's (Sampling.constrained's default: held)
    decoding.add_argument("--constrained", action="store_true", help="rollouts and evaluation decode held to the state's actions "
                          "(Sampling.constrained), whatever the preset says")
    decoding.add_argument("--free", action="store_true", help="rollouts and evaluation decode freely, whatever the preset says")
    add_num_envs_argument(ap)
    ap.add_argument("--workdir", default="", help="where adapters go (default: a temp dir)")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    res = run(args)
    print_table(res)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return res


if __name__ == "__main__":
    main()
