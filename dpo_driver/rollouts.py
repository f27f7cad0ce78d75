"""Run a policy in an environment family's episodes and record every step.

Per task, the first observation of every seed is collected first and the K samples for all
of them come from batched generate() calls (one prefill per prompt, K continuations); the
episodes are then replayed from a fresh reset of the same seed. Items are deterministic per
seed (MiniWoB pages, generated tool-use and SQL items), so the replayed state is the one the
samples were drawn for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dpo_driver.environment import EnvCrashed, Environment, Session
from dpo_driver.pairs import expert_start_count
from dpo_driver.policy import Sampling

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


def _episode(env: Environment, session: Session, spec: EpisodeSpec, forced: list[str], max_steps: int, policy_name: str,
             **extra) -> Generator[tuple[str, Any, int], str, dict]:
    """One episode as a generator: reset the seed and act, the outputs in `forced` first (a replayed
    prefix, then the proposed action); after them it yields (prompt, observation, sampling seed) and
    is sent the policy's output. Returns the episode record. _play drives one; batched.py many."""
    t0 = time.perf_counter()
    obs, prompt = session.reset(spec.seed)
    steps: list[dict] = []
    result = None
    for step in range(max_steps):
        output = forced[step] if step < len(forced) else (yield prompt, obs, spec.seed * 131 + spec.sample * 7 + step)
        ts = time.perf_counter()
        result = session.step(output)
        steps.append(
            {
                "step": step,
                "prompt": prompt,
                "output": output,
                "action": env.parse(output).action,
                "valid": result.valid,
                "reward": result.reward,
                "done": result.done,
                "seconds": round(time.perf_counter() - ts, 4),
            }
        )
        if result.done:
            break
        obs, prompt = result.observation, result.prompt
    done = bool(result and result.done)
    return _record(
        policy_name, spec,
        success=bool(done and result.success),
        reward=float(result.reward) if done else 0.0,
        raw_reward=float(result.info.get("raw_reward", result.reward)) if done else 0.0,
        truncated=not done,
        invalid=any(not s["valid"] for s in steps),
        env_error=False,
        error=None,
        num_steps=len(steps),
        steps=steps,
        wall_seconds=round(time.perf_counter() - t0, 4),
        **extra,
    )


def _play(env: Environment, session: Session, policy, spec: EpisodeSpec, forced: list[str], sampling: Sampling, max_steps: int,
          policy_name: str, **extra) -> dict:
    """One episode, the policy asked one prompt at a time."""
    episode = _episode(env, session, spec, forced, max_steps, policy_name, **extra)
    try:
        prompt, obs, seed = next(episode)
        while True:
            prompt, obs, seed = episode.send(policy.propose([prompt], [obs], 1, sampling, seed=seed)[0][0])
    except StopIteration as end:
        return end.value


def _crashed(policy_name: str, spec: EpisodeSpec, err: Exception, **extra) -> dict:
    # A browser fault, not a policy failure: never used as a rejected sample. `extra` (branch_of,
    # expert_prefix) is kept, so a crashed branch or expert start still counts as one.
    return _record(policy_name, spec, success=False, reward=None, raw_reward=None, truncated=False, invalid=False,
                   env_error=True, error=str(err)[:500], num_steps=0, steps=[], wall_seconds=0.0, **extra)


class CrashGuard:
    """Counts one browser session's consecutive crashes: a crashed episode is recorded as such
    (_crashed) and the run goes on, until MAX_CONSECUTIVE_CRASHES in a row stop it."""

    def __init__(self, task: str):
        self.task, self.count = task, 0

    def failed(self, err: EnvCrashed) -> None:
        self.count += 1
        if self.count >= MAX_CONSECUTIVE_CRASHES:
            raise EnvCrashed(f"{self.task}: browser crashed {self.count} times in a row; last: {err}") from err

    def ok(self) -> None:
        self.count = 0

    def play(self, env: Environment, session: Session, policy, spec: EpisodeSpec, forced: list[str], sampling: Sampling,
             max_steps: int, policy_name: str, **extra) -> dict:
        """_play, or the crashed episode's record."""
        try:
            ep = _play(env, session, policy, spec, forced, sampling, max_steps, policy_name, **extra)
        except EnvCrashed as e:
            self.failed(e)
            return _crashed(policy_name, spec, e, **extra)
        self.ok()
        return ep


def _distinct(outputs: list[str]) -> list[str]:
    """Outputs in order, each answer (up to surrounding whitespace) once."""
    first: dict[str, str] = {}
    for o in outputs:
        first.setdefault(o.strip(), o)
    return list(first.values())


def run_episodes(
    policy,
    env: Environment,
    tasks: list[str],
    seeds: list[int],
    samples_per_seed: int,
    sampling: Sampling,
    max_steps: int | None = None,
    policy_name: str = "policy",
    on_progress: Callable[[dict], None] | None = None,
    num_envs: int | None = None,
) -> list[dict]:
    """K episodes per (task, seed); returns one record per episode, steps included.

    `max_steps` cuts every episode off after that many steps; None (or 0) = each task's own limit
    (env.max_steps: MiniWoB's is the expert's longest episode plus slack).

    `num_envs` None = the family's `batch_sessions`: families without a browser play that many
    episodes at once, one batched generate per step (batched.py); MiniWoB (0) plays one at a time.
    With `num_envs` > 0 on MiniWoB, greedy evaluation (temperature <= 0, one sample per seed) runs on
    that many browsers in lockstep (lockstep.py, which says why 0, the one-browser loop below, is
    the default; benchmarks/throughput.py compares the two).

    With an exploring strategy ("verbs", "candidates") the K first actions are sampled per verb (see
    LMPolicy._propose_per_verb), each distinct one played out greedily; then every later state of
    a successful episode is branched the same way (prefix replayed, K samples there, greedy after),
    so multi-step tasks get siblings that diverge at step 1, 2, ... and not only at step 0.
    Branch episodes carry `branch_of` (the successful episode) and `branch_step`.
    """
    if samples_per_seed < 1:
        raise ValueError("samples_per_seed must be >= 1")
    if num_envs is None:
        num_envs = env.batch_sessions or DEFAULT_NUM_ENVS
    if num_envs and env.batch_sessions:
        from dpo_driver.batched import run_batched  # imported here: batched builds on this module's _episode

        return run_batched(policy, env, tasks, seeds, samples_per_seed, sampling, max_steps, policy_name, num_envs, on_progress)
    if num_envs and sampling.temperature <= 0 and samples_per_seed == 1:
        from dpo_driver.lockstep import run_lockstep  # imported here: lockstep builds on this module's _play

        return run_lockstep(policy, env, tasks, seeds, sampling, max_steps, policy_name, on_progress, num_envs)
    branching = sampling.explores
    after_first = replace(sampling, temperature=0.0, strategy="sample") if branching else sampling
    episodes: list[dict] = []
    total = len(tasks) * len(seeds) * samples_per_seed
    t_start = time.perf_counter()
    for task in tasks:
        with env.open(task) as session:
            crashes = CrashGuard(task)
            task_steps = step_limit(env, task, max_steps)

            def play(spec: EpisodeSpec, forced: list[str], **extra) -> dict:
                ep = crashes.play(env, session, policy, spec, forced, after_first, task_steps, policy_name, **extra)
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
                    obs, prompt = session.reset(seed)
                except EnvCrashed as e:
                    crashes.failed(e)
                    episodes += [_crashed(policy_name, EpisodeSpec(task, seed, k), e) for k in range(samples_per_seed)]
                    continue
                crashes.ok()
                observations.append(obs)
                prompts.append(prompt)
                live_seeds.append(seed)
            firsts = policy.propose(prompts, observations, samples_per_seed, sampling, seed=live_seeds[0] if live_seeds else 0)
            for seed, outs in zip(live_seeds, firsts):
                roots = [play(EpisodeSpec(task, seed, k), [out]) for k, out in enumerate(_distinct(outs) if branching else outs)]
                if branching:
                    _branch_successes(session, policy, roots, play, seed, samples_per_seed, sampling,
                                      BranchBudget(branch_budget(samples_per_seed, task_steps)))
    return episodes


def step_limit(env: Environment, task: str, max_steps: int | None) -> int:
    """An episode's step limit: `max_steps` when given, else the task's own (env.max_steps)."""
    return max_steps or env.max_steps(task)


def branch_budget(k: int, task_steps: int) -> int:
    """Most branch episodes per seed: K x the task's step limit (see _branch_successes)."""
    return k * task_steps


class BranchBudget:
    """The branch episodes one seed may still play, out of `cap` (branch_budget). False once spent:
    checked before a state is replayed (no child of it would be played) and before each child."""

    def __init__(self, cap: int):
        self.left = cap

    def __bool__(self) -> bool:
        return self.left > 0

    def spend(self) -> None:
        self.left -= 1


def _branch_successes(session: Session, policy, roots: list[dict], play, seed: int, k: int, sampling: Sampling,
                      budget: BranchBudget) -> None:
    """Branch K distinct actions at every later state of each shortest successful episode
    (fewest steps first), while `budget` lasts.

    A success that takes more steps than one already found wasted some (on click-button, typing
    into a stray text field before the right click); its later states are off the path a good
    policy takes, and branching them recursively made 123 of 193 pairs in one run. enter-text's
    shortest success (type, then Submit) is still branched at its second state.

    The cap (branch_budget: one success path branched in full takes fewer) bounds
    tasks where any order succeeds: on click-checkboxes-large every branch that ticks the named
    boxes in another order is a new success with new states, and one seed had played 1,070
    episodes, after 90 min of rollouts, when it was stopped.
    """
    queue, branched, sample = [e for e in roots if e["success"]], set(), len(roots)
    shortest = min((e["num_steps"] for e in queue), default=0)
    while queue:
        queue.sort(key=lambda e: e["num_steps"])
        ep = queue.pop(0)
        if ep["num_steps"] > shortest:
            continue
        for t in range(1, ep["num_steps"]):
            if not budget:
                return
            prompt = ep["steps"][t]["prompt"]
            if prompt in branched:
                continue
            branched.add(prompt)
            prefix = [s["output"] for s in ep["steps"][:t]]
            try:
                obs = _replay(session, seed, prefix)
            except EnvCrashed:
                continue  # the next play() call re-opens the browser and counts crashes
            taken = ep["steps"][t]["output"].strip()
            for out in _distinct(policy.propose([prompt], [obs], k, sampling, seed=seed * 131 + t)[0]):
                if out.strip() == taken:
                    continue  # that branch is `ep` itself
                if not budget:
                    return
                child = play(EpisodeSpec(session.task, seed, sample), prefix + [out], branch_of=ep["episode_id"], branch_step=t)
                sample += 1
                budget.spend()
                if child["success"]:
                    shortest = min(shortest, child["num_steps"])
                    queue.append(child)


def _replay(session: Session, seed: int, outputs: list[str]):
    obs, _ = session.reset(seed)
    for out in outputs:
        obs = session.step(out).observation
    return obs


def first_prompts(env: Environment, tasks: list[str], seeds: list[int]) -> dict[tuple[str, int], str]:
    """The step-0 prompt of every (task, seed): what decontamination compares training pairs against."""
    prompts = {}
    for task in tasks:
        with env.open(task) as session:
            for seed in seeds:
                prompts[(task, seed)] = session.reset(seed)[1]
    return prompts


def evaluate_arms(load_policy: Callable[[str], Any], adapters: dict[str, str], env: Environment, tasks: list[str], seeds: list[int],
                  sampling: Sampling, max_steps: int | None = None, retention_tasks: list[str] | None = None,
                  retention_policies: tuple[str, ...] = (), on_progress: Callable[[str], Callable[[dict], None] | None] = lambda _: None,
                  num_envs: int | None = None) -> tuple[list[dict], list[dict]]:
    """(suite episodes, retention episodes): each arm (name -> adapter folder) loaded once by
    `load_policy` and played greedily on every (task, seed); the arms in `retention_policies` also
    play `retention_tasks` with the same loaded model. `num_envs` as in run_episodes."""
    episodes, kept = [], []
    for name, adapter_dir in adapters.items():
        policy = load_policy(adapter_dir)
        episodes += run_episodes(policy, env, tasks, seeds, 1, sampling, max_steps, policy_name=name, on_progress=on_progress(f"eval {name}"),
                                 num_envs=num_envs)
        if retention_tasks and name in retention_policies:
            kept += run_episodes(policy, env, retention_tasks, seeds, 1, sampling, max_steps, policy_name=name,
                                 on_progress=on_progress(f"retention {name}"), num_envs=num_envs)
        del policy  # one model in memory at a time
    return episodes, kept


def collect_rollouts(load_policy: Callable[[], Any], env: Environment, tasks: list[str], seeds: list[int], samples_per_seed: int,
                     sampling: Sampling, max_steps: int | None, policy_name: str, adapter_dir: str, traces_path: str = "",
                     scrub_pii: bool = True, on_progress: Callable[[dict], None] | None = None,
                     validation_seeds: list[int] = (), expert_starts: bool = False) -> tuple[list[dict], dict]:
    """The rollout stage: (episodes, metrics). The episodes are a team's logged traces when
    `traces_path` is given (checked line by line; no model is loaded), else K samples per seed of
    `load_policy()`; PII is scrubbed before they are stored as training data, and each names the
    adapter that acted (DPO continues from, and refers to, that policy).

    `validation_seeds` are played the same way *after* the training seeds (so the training
    episodes are exactly those of a run without them) and marked `split` "validation": their pairs
    are held out of DPO (`dpo_gates.train_and_validation_pairs`). Logged traces are all "train".
    With `expert_starts`, the training seeds no sample solved are also played from the expert's
    states (eto.expert_start_episodes), between the training and the validation episodes.
    """
    from dpo_driver.pii import counts_metadata, scrub_records
    from dpo_driver.traces import load_trace_jsonl

    if expert_starts and (traces_path or not env.has_expert):
        raise ValueError("expert_starts plays the family's expert episodes with the policy: it needs a family with an expert "
                         f"({env.name!r}: {env.has_expert}) and sampled rollouts, not logged traces ({traces_path or 'none'})")
    stats = None
    if traces_path:
        episodes = [{**e, "split": "train"} for e in load_trace_jsonl(Path(traces_path), parse=env.parse)]
    else:
        policy = load_policy()
        episodes = []
        for split, split_seeds in (("train", list(seeds)), ("validation", list(validation_seeds))):
            if split_seeds:
                played = run_episodes(policy, env, tasks, split_seeds, samples_per_seed, sampling, max_steps, policy_name=policy_name,
                                      on_progress=on_progress)
                episodes += [{**e, "split": split} for e in played]
            if split == "train" and expert_starts:
                from dpo_driver.eto import expert_start_episodes  # imported here: eto builds on this module

                episodes += expert_start_episodes(policy, env, episodes, samples_per_seed, sampling, max_steps, policy_name)
        stats = policy.stats
    pii = {}
    if scrub_pii:
        episodes, found = scrub_records(episodes)
        pii = counts_metadata(found)
    for ep in episodes:
        ep["adapter_dir"] = adapter_dir
    ok = [e for e in episodes if not e["env_error"]]
    metrics = {"episodes": len(episodes), "validation_episodes": sum(e["split"] == "validation" for e in episodes),
               "expert_start_episodes": expert_start_count(episodes),
               "env_errors": len(episodes) - len(ok), "success_rate": sum(bool(e["success"]) for e in ok) / len(ok) if ok else float("nan"), **pii}
    if stats is not None:
        metrics.update(gen_seconds=stats.seconds, gen_new_tokens=stats.new_tokens, gen_tokens_per_second=stats.tokens_per_second)
    return episodes, metrics
