"""ETO-style pairs (Song et al., 2024, "Trial and Error"): the expert's action at a state the policy
failed from is chosen, the policy's action there is rejected.

A peer method for the benchmark: on the same rollouts, does pairing the policy's own successes with
its failures (dpo_driver.pairs) teach more than pairing an expert's action with its failures?
ETO needs an expert on the rollout seeds; environment-feedback pairs need none.

`expert_fallback_pairs` joins the two: ETO pairs only at the seeds where no rollout succeeded, the
blind spot of environment-feedback pairs (a task the policy never solves gives them nothing).

`expert_start_episodes` fills the same blind spot without an expert-chosen side (backplay: Resnick et
al., 2018; Salimans and Chen, 2018): at an unsolved seed the policy acts from the states of the
expert's episode, nearest the end first, so it finds successes of its own; its sampled actions there
pair with one another (pairs.build_preference_pairs groups episodes by their expert prefix).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

import pandas as pd

from dpo_driver.demos import play_expert
from dpo_driver.environment import EnvCrashed, Environment, Parsed
from dpo_driver.pairs import PAIR_COLUMNS, _training_episodes, merge_pairs, pair_id
from dpo_driver.policy import Sampling
from dpo_driver.rollouts import BranchBudget, CrashGuard, EpisodeSpec, _distinct, branch_budget, step_limit


def expert_paths(env: Environment, tasks_seeds: dict[str, list[int]]) -> dict:
    """{(task, seed): {state prompt: expert action}} along the expert's solved episode of each seed."""
    paths = {}
    for task, seeds in tasks_seeds.items():
        with env.open(task) as session:
            for seed in seeds:
                ep = play_expert(session, seed, env.max_steps(task))
                if ep.solved:
                    paths[(task, seed)] = {r["prompt"][0]["content"]: r["completion"][0]["content"] for r in ep.records}
    return paths


def build_eto_pairs(episodes: list[dict], paths: dict, parse: Callable[[str], Parsed], max_pairs_per_prompt: int = 2) -> pd.DataFrame:
    """One pair per failed episode, at its first step on the expert's path where it left that path.

    A failed episode that drifted off the expert's path without a different action at a shared
    state (which cannot happen on deterministic pages) gives no pair; rejected must parse, as in
    the environment-feedback pairs, so both methods train on well-formed rejections only.
    """
    rows, taken = {}, defaultdict(int)
    for ep in sorted(_training_episodes(episodes), key=lambda e: (e["task"], e["seed"], e["sample"])):
        path = paths.get((ep["task"], int(ep["seed"])))
        if ep["success"] or path is None:
            continue
        for st in ep["steps"]:
            expert = path.get(st["prompt"])
            if expert is None:
                break
            out = st["output"].strip()
            if out == expert:
                continue
            if parse(out).ok and taken[st["prompt"]] < max_pairs_per_prompt:
                pid = pair_id(st["prompt"], expert, out)
                if pid not in rows:
                    taken[st["prompt"]] += 1
                    rows[pid] = {"pair_id": pid, "task": ep["task"], "seed": int(ep["seed"]), "step": int(st["step"]),
                                 "prompt": st["prompt"], "chosen": expert, "rejected": out, "chosen_score": 1.0,
                                 "rejected_score": 0.0, "margin": 1.0, "chosen_episode": "expert", "rejected_episode": ep["episode_id"]}
            break
    return pd.DataFrame(list(rows.values()), columns=PAIR_COLUMNS)


def unsolved_seeds(episodes: list[dict]) -> dict[str, list[int]]:
    """{task: seeds} where no rollout sample succeeded (browser faults ignored): no chosen side there."""
    seen, solved = defaultdict(set), set()
    for ep in _training_episodes(episodes):
        seen[ep["task"]].add(int(ep["seed"]))
        if ep["success"]:
            solved.add((ep["task"], int(ep["seed"])))
    out = {t: sorted(s for s in seeds if (t, s) not in solved) for t, seeds in sorted(seen.items())}
    return {t: s for t, s in out.items() if s}


def expert_fallback_pairs(episodes: list[dict], env: Environment, parse: Callable[[str], Parsed],
                          max_pairs_per_prompt: int = 2, unsolved: dict[str, list[int]] | None = None) -> pd.DataFrame:
    """ETO pairs at the unsolved seeds only (`unsolved`: unsolved_seeds(episodes), when the caller has it);
    where some sample succeeded the policy's own success is the chosen side."""
    unsolved = unsolved_seeds(episodes) if unsolved is None else unsolved
    keep = [ep for ep in episodes if int(ep["seed"]) in unsolved.get(ep["task"], ())]
    return build_eto_pairs(keep, expert_paths(env, unsolved), parse, max_pairs_per_prompt)


def with_expert_fallback(pairs: pd.DataFrame, episodes: list[dict], env: Environment,
                         max_pairs_per_prompt: int = 2) -> tuple[pd.DataFrame, dict]:
    """`pairs` plus the expert's pairs at the unsolved seeds (those already in `pairs` not repeated), and counts."""
    if not env.has_expert:
        raise ValueError(f"expert fallback needs a family with an expert; {env.name!r} has none (Environment.has_expert)")
    unsolved = unsolved_seeds(episodes)
    expert = expert_fallback_pairs(episodes, env, env.parse, max_pairs_per_prompt, unsolved)
    mixed = merge_pairs(pairs, expert)
    return mixed, {"expert_pairs": int(len(mixed) - len(pairs)), "unsolved_seeds": sum(map(len, unsolved.values()))}


def expert_start_episodes(policy, env: Environment, episodes: list[dict], samples_per_seed: int, sampling: Sampling,
                          max_steps: int | None = None, policy_name: str = "policy") -> list[dict]:
    """Episodes that start from the expert's states at the training seeds no sample of `episodes` solved.

    Per unsolved seed, the expert's episode is replayed up to step t, for t from its last step back
    towards the first; there the policy proposes K actions (`sampling`; the distinct ones played
    out greedily, as in branching). The walk goes back while some proposal at t succeeds (the
    frontier of what the policy can finish), and stops at the first state none does, or after
    branch_budget(K, step limit) episodes. Each episode carries `expert_prefix` = t: its first t
    outputs are the expert's, so it pairs only with episodes of the same prefix, whose divergence
    lies after it (both sides the policy's own actions; no expert action is ever chosen or rejected).
    """
    if not env.has_expert:
        raise ValueError(f"expert starts need a family with an expert; {env.name!r} has none (Environment.has_expert)")
    train = [e for e in episodes if e.get("split", "train") == "train"]
    next_sample: dict[tuple[str, int], int] = defaultdict(int)
    for e in episodes:
        key = (e["task"], int(e["seed"]))
        next_sample[key] = max(next_sample[key], int(e["sample"]) + 1)
    greedy_after = replace(sampling, temperature=0.0, strategy="sample")
    out: list[dict] = []
    for task, seeds in unsolved_seeds(train).items():
        task_steps = step_limit(env, task, max_steps)
        with env.open(task) as session:
            crashes = CrashGuard(task)
            for seed in seeds:
                try:
                    expert = play_expert(session, seed, task_steps)
                except EnvCrashed as e:
                    crashes.failed(e)
                    continue
                if not expert.solved:
                    continue
                path = [answer for _, answer in expert.steps]
                sample, budget = next_sample[(task, seed)], BranchBudget(branch_budget(samples_per_seed, task_steps))
                for t in range(len(path) - 1, 0, -1):
                    prompt, obs = expert.records[t]["prompt"][0]["content"], expert.steps[t][0]
                    proposals = _distinct(policy.propose([prompt], [obs], samples_per_seed, sampling, seed=seed * 131 + t)[0])
                    wins = 0
                    for proposal in proposals:
                        if not budget:
                            break
                        ep = crashes.play(env, session, policy, EpisodeSpec(task, seed, sample), path[:t] + [proposal], greedy_after,
                                          task_steps, policy_name, expert_prefix=t)
                        out.append({**ep, "split": "train"})
                        sample += 1
                        budget.spend()
                        wins += bool(ep["success"])
                    if not wins or not budget:
                        break
    return out
