"""Episodes of families whose sessions are cheap (no browser), played many at a time: one
`policy.propose` call answers the current state of every live episode.

Tool-use and SQL answers are 30-70 tokens; asked one prompt at a time, a 135M model on two CPU
cores spends about a second per answer, and the rollouts of one round take half an hour. Each
episode gets its own session (`Environment.batch_sessions` says the family allows that), so up to
that many episodes advance together, in a fixed order: a run is deterministic for a fixed width.

The exploring strategies keep rollouts.run_episodes' semantics in waves: the K distinct first
actions of every seed are played out together; then the later states of each seed's shortest
successes are branched (K samples there, greedy after), all seeds' branches together, until no
new shortest success appears.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from dpo_driver.environment import EnvCrashed, Environment
from dpo_driver.policy import Sampling
from dpo_driver.rollouts import BranchBudget, EpisodeSpec, _crashed, _distinct, _episode, _replay, branch_budget, step_limit

Job = tuple[EpisodeSpec, list[str], dict]  # what to play, the forced outputs, extra record fields


def play_batched(env: Environment, policy, jobs: list[Job], sampling: Sampling, max_steps: int | None, policy_name: str,
                 width: int, on_episode: Callable[[dict], None] | None = None) -> list[dict]:
    """The episodes of `jobs`, in job order; at most `width` live at once."""
    results: list[dict | None] = [None] * len(jobs)
    queue = deque(enumerate(jobs))
    live: dict[int, tuple] = {}  # job index -> (episode generator, its pending request, session)

    def finish(i: int, record: dict, session) -> None:
        session.close()
        results[i] = record
        live.pop(i, None)
        if on_episode:
            on_episode(record)

    def advance(i: int, gen, session, output: str | None) -> None:
        try:
            request = next(gen) if output is None else gen.send(output)
            live[i] = (gen, request, session)
        except StopIteration as end:
            finish(i, end.value, session)
        except EnvCrashed as e:
            finish(i, _crashed(policy_name, jobs[i][0], e, **jobs[i][2]), session)

    while queue or live:
        while queue and len(live) < width:
            i, (spec, forced, extra) = queue.popleft()
            session = env.open(spec.task)
            advance(i, _episode(env, session, spec, forced, step_limit(env, spec.task, max_steps), policy_name, **extra), session, None)
        if not live:
            continue
        order = sorted(live)
        requests = [live[i][1] for i in order]
        outs = policy.propose([r[0] for r in requests], [r[1] for r in requests], 1, sampling, seed=requests[0][2])
        for i, out in zip(order, outs, strict=True):
            gen, _, session = live[i]
            advance(i, gen, session, out[0])
    return results


def run_batched(policy, env: Environment, tasks: list[str], seeds: list[int], samples_per_seed: int, sampling: Sampling,
                max_steps: int | None, policy_name: str, width: int,
                on_progress: Callable[[dict], None] | None = None) -> list[dict]:
    """rollouts.run_episodes for batch-capable families (same records, same strategies)."""
    episodes: list[dict] = []
    total = len(tasks) * len(seeds) * samples_per_seed
    t_start = time.perf_counter()

    def progress(ep: dict) -> None:
        episodes.append(ep)
        if on_progress:
            done, elapsed = len(episodes), time.perf_counter() - t_start
            on_progress({"done": done, "total": max(total, done), "task": ep["task"], "episodes_per_second": done / elapsed if elapsed else 0.0,
                         "success_so_far": sum(e["success"] for e in episodes) / done})

    branching = sampling.explores
    after_first = replace(sampling, temperature=0.0, strategy="sample") if branching else sampling

    def play(jobs: list[Job]) -> list[dict]:
        return play_batched(env, policy, jobs, after_first, max_steps, policy_name, width, progress)

    if sampling.temperature <= 0 and samples_per_seed == 1:  # greedy evaluation: every seed from scratch
        play([(EpisodeSpec(t, s, 0), [], {}) for t in tasks for s in seeds])
        return _in_order(episodes, tasks, seeds)
    for task in tasks:
        states = []
        for seed in seeds:
            with env.open(task) as session:
                states.append((seed, *session.reset(seed)))
        firsts = policy.propose([p for _, _, p in states], [o for _, o, _ in states], samples_per_seed, sampling,
                                seed=seeds[0] if seeds else 0)
        roots: dict[int, list[dict]] = {}
        jobs = [(EpisodeSpec(task, seed, k), [out], {}) for (seed, _, _), outs in zip(states, firsts)
                for k, out in enumerate(_distinct(outs) if branching else outs)]
        for ep in play(jobs):
            roots.setdefault(ep["seed"], []).append(ep)
        if branching:
            _branch_in_waves(env, policy, task, roots, play, samples_per_seed, sampling,
                             branch_budget(samples_per_seed, step_limit(env, task, max_steps)))
    return _in_order(episodes, tasks, seeds)


def _branch_in_waves(env: Environment, policy, task: str, roots: dict[int, list[dict]], play, k: int, sampling: Sampling,
                     max_branches: int) -> None:
    """rollouts._branch_successes for all seeds at once: each wave branches every not yet branched
    state of the shortest successes found so far, then plays all children together; at most
    `max_branches` children per seed."""
    found = {seed: list(eps) for seed, eps in roots.items()}
    branched: dict[int, set[str]] = {seed: set() for seed in found}
    next_sample = {seed: len(eps) for seed, eps in found.items()}
    budgets = {seed: BranchBudget(max_branches) for seed in found}
    while True:
        states = []  # (seed, successful episode, step t)
        for seed, eps in found.items():
            if not budgets[seed]:
                continue
            wins = [e for e in eps if e["success"]]
            shortest = min((e["num_steps"] for e in wins), default=0)
            for ep in sorted((e for e in wins if e["num_steps"] == shortest), key=lambda e: e["sample"]):
                for t in range(1, ep["num_steps"]):
                    prompt = ep["steps"][t]["prompt"]
                    if prompt not in branched[seed]:
                        branched[seed].add(prompt)
                        states.append((seed, ep, t))
        if not states:
            return
        observations = []
        for seed, ep, t in states:
            with env.open(task) as session:
                observations.append(_replay(session, seed, [s["output"] for s in ep["steps"][:t]]))
        proposals = policy.propose([ep["steps"][t]["prompt"] for _, ep, t in states], observations, k, sampling,
                                   seed=states[0][0] * 131 + states[0][2])
        jobs = []
        for (seed, ep, t), outs in zip(states, proposals):
            prefix, taken = [s["output"] for s in ep["steps"][:t]], ep["steps"][t]["output"].strip()
            for out in _distinct(outs):
                if not budgets[seed]:
                    break
                if out.strip() != taken:  # that branch is `ep` itself
                    jobs.append((EpisodeSpec(task, seed, next_sample[seed]), prefix + [out], {"branch_of": ep["episode_id"], "branch_step": t}))
                    next_sample[seed] += 1
                    budgets[seed].spend()
        for child in play(jobs):
            found[child["seed"]].append(child)


def _in_order(episodes: list[dict], tasks: list[str], seeds: list[int]) -> list[dict]:
    """Task, then seed, then sample order, as the one-session loop returns them."""
    rank = {(t, s): i for i, (t, s) in enumerate((t, s) for t in tasks for s in seeds)}
    return sorted(episodes, key=lambda e: (rank[(e["task"], e["seed"])], e["sample"]))
