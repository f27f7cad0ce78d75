"""Run a policy in real MiniWoB++ episodes and record every step.

Per task, the first observation of every seed is collected first and the K samples for all
of them come from batched generate() calls (one prefill per prompt, K continuations); the
episodes are then replayed from a fresh reset of the same seed. MiniWoB pages are
deterministic per seed, so the replayed page is the one the samples were drawn for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from dpo_driver.actions import parse_action
from dpo_driver.env import EnvCrashed, WebEnv
from dpo_driver.observation import render_prompt
from dpo_driver.policy import Sampling
from dpo_driver.tasks import max_steps_for

MAX_CONSECUTIVE_CRASHES = 3
# Browsers stepped together in greedy evaluation; 0 = the one-browser loop. Lockstep episodes wait
# for their batch while MiniWoB's episode clock runs, so slow generation times them out (lockstep.py).
DEFAULT_NUM_ENVS = 0


@dataclass
class EpisodeSpec:
    task: str
    seed: int
    sample: int


def _record(policy_name: str, spec: EpisodeSpec, **fields) -> dict:
    """One episode row: identity first, then what happened."""
    return {"episode_id": f"{policy_name}:{spec.task}:{spec.seed}:{spec.sample}", "policy": policy_name,
            "task": spec.task, "seed": spec.seed, "sample": spec.sample, **fields}


def _play(env: WebEnv, policy, spec: EpisodeSpec, forced: list[str], sampling: Sampling, max_steps: int, policy_name: str,
          **extra) -> dict:
    """Reset the seed and act: the outputs in `forced` first (a replayed prefix, then the proposed
    action), the policy after them."""
    t0 = time.perf_counter()
    obs, _ = env.reset(spec.seed)
    history: list[str] = []
    steps: list[dict] = []
    result = None
    for step in range(max_steps):
        if step < len(forced):
            output = forced[step]
        else:
            output = policy.propose([render_prompt(obs, history)], [obs], 1, sampling, seed=spec.seed * 131 + spec.sample * 7 + step)[0][0]
        prompt = render_prompt(obs, history)
        action = parse_action(output)
        ts = time.perf_counter()
        result = env.step(action)
        steps.append(
            {
                "step": step,
                "prompt": prompt,
                "output": output,
                "action": action.render() if action else None,
                "valid": result.valid,
                "reward": result.reward,
                "done": result.done,
                "seconds": round(time.perf_counter() - ts, 4),
            }
        )
        if result.done:
            break
        history.append(action.render())
        obs = result.observation
    done = bool(result and result.done)
    return _record(
        policy_name, spec,
        success=bool(done and result.raw_reward >= 1.0),
        reward=float(result.reward) if done else 0.0,
        raw_reward=float(result.raw_reward) if done else 0.0,
        truncated=not done,
        invalid=any(not s["valid"] for s in steps),
        env_error=False,
        error=None,
        num_steps=len(steps),
        steps=steps,
        wall_seconds=round(time.perf_counter() - t0, 4),
        **extra,
    )


def _crashed(policy_name: str, spec: EpisodeSpec, err: Exception) -> dict:
    # A browser fault, not a policy failure: never used as a rejected sample.
    return _record(policy_name, spec, success=False, reward=None, raw_reward=None, truncated=False, invalid=False,
                   env_error=True, error=str(err)[:500], num_steps=0, steps=[], wall_seconds=0.0)


def _distinct(outputs: list[str]) -> list[str]:
    """Outputs in order, each answer (up to surrounding whitespace) once."""
    first: dict[str, str] = {}
    for o in outputs:
        first.setdefault(o.strip(), o)
    return list(first.values())


def run_episodes(
    policy,
    tasks: list[str],
    seeds: list[int],
    samples_per_seed: int,
    sampling: Sampling,
    max_steps: int | None = None,
    policy_name: str = "policy",
    chrome_binary: str | None = None,
    chromedriver: str | None = None,
    on_progress: Callable[[dict], None] | None = None,
    num_envs: int = DEFAULT_NUM_ENVS,
) -> list[dict]:
    """K episodes per (task, seed); returns one record per episode, steps included.

    `max_steps` cuts every episode off after that many steps; None (or 0) = each task's own limit
    (tasks.max_steps_for: the expert's longest episode plus slack).

    With `num_envs` > 0, greedy evaluation (temperature <= 0, one sample per seed) runs on that
    many browsers in lockstep, one batched generate per step (lockstep.py, which says why 0, the
    one-browser loop below, is the default; benchmarks/throughput.py compares the two).

    With an exploring strategy ("verbs", "candidates") the K first actions are sampled per verb (see
    LMPolicy._propose_per_verb), each distinct one played out greedily; then every later state of
    a successful episode is branched the same way (prefix replayed, K samples there, greedy after),
    so multi-step tasks get siblings that diverge at step 1, 2, ... and not only at step 0.
    Branch episodes carry `branch_of` (the successful episode) and `branch_step`.
    """
    if samples_per_seed < 1:
        raise ValueError("samples_per_seed must be >= 1")
    if num_envs and sampling.temperature <= 0 and samples_per_seed == 1:
        from dpo_driver.lockstep import run_lockstep  # imported here: lockstep builds on this module's _play

        return run_lockstep(policy, tasks, seeds, sampling, max_steps, policy_name, chrome_binary, chromedriver, on_progress, num_envs)
    branching = sampling.explores
    after_first = replace(sampling, temperature=0.0, strategy="sample") if branching else sampling
    episodes: list[dict] = []
    total = len(tasks) * len(seeds) * samples_per_seed
    t_start = time.perf_counter()
    for task in tasks:
        with WebEnv(task, chrome_binary, chromedriver) as env:
            crashes = 0

            task_steps = max_steps or max_steps_for(task)

            def play(spec: EpisodeSpec, forced: list[str], **extra) -> dict:
                nonlocal crashes
                try:
                    ep = _play(env, policy, spec, forced, after_first, task_steps, policy_name, **extra)
                    crashes = 0
                except EnvCrashed as e:
                    crashes += 1
                    if crashes >= MAX_CONSECUTIVE_CRASHES:
                        raise EnvCrashed(f"{task}: browser crashed {crashes} times in a row; last: {e}") from e
                    ep = _crashed(policy_name, spec, e)
                episodes.append(ep)
                if on_progress:
                    done = len(episodes)
                    elapsed = time.perf_counter() - t_start
                    on_progress({"done": done, "total": max(total, done), "task": task, "episodes_per_second": done / elapsed if elapsed else 0.0,
                                 "success_so_far": sum(e["success"] for e in episodes) / done})
                return ep

            observations, prompts, live_seeds = [], [], []
            for seed in seeds:
                try:
                    obs, _ = env.reset(seed)
                except EnvCrashed as e:
                    crashes += 1
                    if crashes >= MAX_CONSECUTIVE_CRASHES:
                        raise
                    episodes += [_crashed(policy_name, EpisodeSpec(task, seed, k), e) for k in range(samples_per_seed)]
                    continue
                crashes = 0
                observations.append(obs)
                prompts.append(render_prompt(obs))
                live_seeds.append(seed)
            firsts = policy.propose(prompts, observations, samples_per_seed, sampling, seed=live_seeds[0] if live_seeds else 0)
            for seed, outs in zip(live_seeds, firsts):
                roots = [play(EpisodeSpec(task, seed, k), [out]) for k, out in enumerate(_distinct(outs) if branching else outs)]
                if branching:
                    _branch_successes(env, policy, roots, play, task, seed, samples_per_seed, sampling)
    return episodes


def _branch_successes(env: WebEnv, policy, roots: list[dict], play, task: str, seed: int, k: int, sampling: Sampling) -> None:
    """Branch K distinct actions at every later state of each shortest successful episode
    (fewest steps first).

    A success that takes more steps than one already found wasted some (on click-button, typing
    into a stray text field before the right click); its later states are off the path a good
    policy takes, and branching them recursively made 123 of 193 pairs in one run. enter-text's
    shortest success (type, then Submit) is still branched at its second state.
    """
    queue, branched, sample = [e for e in roots if e["success"]], set(), len(roots)
    shortest = min((e["num_steps"] for e in queue), default=0)
    while queue:
        queue.sort(key=lambda e: e["num_steps"])
        ep = queue.pop(0)
        if ep["num_steps"] > shortest:
            continue
        for t in range(1, ep["num_steps"]):
            prompt = ep["steps"][t]["prompt"]
            if prompt in branched:
                continue
            branched.add(prompt)
            prefix = [s["output"] for s in ep["steps"][:t]]
            try:
                obs = _replay(env, seed, prefix)
            except EnvCrashed:
                continue  # the next play() call re-opens the browser and counts crashes
            taken = ep["steps"][t]["output"].strip()
            for out in _distinct(policy.propose([prompt], [obs], k, sampling, seed=seed * 131 + t)[0]):
                if out.strip() == taken:
                    continue  # that branch is `ep` itself
                child = play(EpisodeSpec(task, seed, sample), prefix + [out], branch_of=ep["episode_id"], branch_step=t)
                sample += 1
                if child["success"]:
                    shortest = min(shortest, child["num_steps"])
                    queue.append(child)


def _replay(env: WebEnv, seed: int, outputs: list[str]):
    obs, _ = env.reset(seed)
    for out in outputs:
        obs = env.step(parse_action(out)).observation
    return obs


def first_prompts(tasks: list[str], seeds: list[int], chrome_binary: str | None = None, chromedriver: str | None = None) -> dict[tuple[str, int], str]:
    """The step-0 prompt of every (task, seed): what decontamination compares training pairs against."""
    prompts = {}
    for task in tasks:
        with WebEnv(task, chrome_binary, chromedriver) as env:
            for seed in seeds:
                obs, _ = env.reset(seed)
                prompts[(task, seed)] = render_prompt(obs)
    return prompts
