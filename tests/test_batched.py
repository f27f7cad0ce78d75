"""Families without a browser play many episodes per generate call (dpo_driver.batched): the same
episodes as the one-at-a-time loop, in the same order."""

import hashlib

from dpo_driver.families.tooluse import ToolUse
from dpo_driver.policy import Sampling
from dpo_driver.rollouts import run_episodes
from dpo_driver.tasks import seeds_for


class HashPolicy:
    """Deterministic per prompt: one of the state's candidate actions, picked by the prompt's hash."""

    def __init__(self, env):
        self.env, self.calls = env, 0

    def propose(self, prompts, observations, k, sampling, seed):
        self.calls += 1
        outs = []
        for prompt, obs in zip(prompts, observations):
            cands = self.env.candidates(obs)
            outs.append([cands[(int(hashlib.sha1(f"{prompt}{j}".encode()).hexdigest(), 16)) % len(cands)] for j in range(k)])
        return outs


def _played(eps):
    return [(e["episode_id"], [s["output"] for s in e["steps"]], e["success"], e.get("branch_of")) for e in eps]


def test_batched_greedy_matches_one_at_a_time():
    env = ToolUse()
    tasks, seeds = ["calculator", "lookup-calc"], seeds_for("eval", 6)
    one, batched = HashPolicy(env), HashPolicy(env)
    a = run_episodes(one, env, tasks, seeds, 1, Sampling(temperature=0.0), num_envs=0)
    b = run_episodes(batched, env, tasks, seeds, 1, Sampling(temperature=0.0))
    assert _played(a) == _played(b) and len(a) == 12
    assert batched.calls < one.calls / 3  # one propose per step for all live episodes


def test_batched_exploration_branches_successes():
    env = ToolUse()
    eps = run_episodes(HashPolicy(env), env, ["calculator", "lookup"], seeds_for("rollout", 8), 6,
                       Sampling(temperature=1.0, strategy="candidates"), policy_name="p")
    assert {e["seed"] for e in eps} == set(seeds_for("rollout", 8))
    assert any(e["success"] for e in eps) and not all(e["success"] for e in eps)
    branches = [e for e in eps if e.get("branch_of")]
    assert branches and all(e["branch_step"] >= 1 for e in branches)
    parents = {e["episode_id"]: e for e in eps}
    for b in branches:  # a branch replays its successful parent's prefix, then diverges
        parent = parents[b["branch_of"]]
        t = b["branch_step"]
        assert parent["success"] and [s["output"] for s in b["steps"][:t]] == [s["output"] for s in parent["steps"][:t]]
        assert b["steps"][t]["output"].strip() != parent["steps"][t]["output"].strip()
    assert len({e["episode_id"] for e in eps}) == len(eps)
