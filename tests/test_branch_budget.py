"""Branching successes stays bounded on a task where any order succeeds (click-checkboxes-large's
shape): every branch that picks the items in another order is a new success with new states."""

import pytest

from dpo_driver.environment import Environment, Parsed, Session, Transition
from dpo_driver.policy import Sampling
from dpo_driver.rollouts import branch_budget, run_episodes

ITEMS = "abcde"


class PickSession(Session):
    """Pick every item once, in any order; a repeated or unknown item fails the episode."""

    def __init__(self, task: str):
        self.task = task

    def reset(self, seed: int):
        self.picked = []
        return tuple(self.picked), self._prompt()

    def _prompt(self) -> str:
        return f"Pick {', '.join(ITEMS)} in any order. Picked so far: {''.join(self.picked)}"

    def step(self, completion: str) -> Transition:
        item = completion.strip()
        if item not in ITEMS or len(item) != 1 or item in self.picked:
            return Transition(reward=0.0, done=True, success=False, valid=True)
        self.picked.append(item)
        done = len(self.picked) == len(ITEMS)
        return Transition(reward=float(done), done=done, success=done, valid=True, prompt=self._prompt(), observation=tuple(self.picked))


class Pick(Environment):
    name = "pick"
    tasks = ("pick",)

    def __init__(self, batch: int = 0):
        self.batch_sessions = batch

    def open(self, task: str) -> Session:
        return PickSession(task)

    @staticmethod
    def parse(completion: str) -> Parsed:
        return Parsed(completion.strip())

    def max_steps(self, task: str) -> int:
        return len(ITEMS) + 1


class EveryOrder:
    """Samples: every item not yet picked; greedy: the first of them. Every branch succeeds."""

    def propose(self, prompts, observations, k, sampling, seed):
        left = [[i for i in ITEMS if i not in obs] for obs in observations]
        return [(rest * k)[:k] if k > 1 else rest[:1] for rest in left]


@pytest.mark.parametrize("batch", [0, 4], ids=["sequential", "batched"])
def test_branching_is_capped_per_seed_where_any_order_succeeds(batch):
    env, k, seeds = Pick(batch), 3, [1000000, 1000001]
    eps = run_episodes(EveryOrder(), env, ["pick"], seeds, k, Sampling(temperature=1.0, strategy="verbs"), policy_name="p", num_envs=batch)
    cap = branch_budget(k, env.max_steps("pick"))
    for seed in seeds:
        mine = [e for e in eps if e["seed"] == seed]
        roots = [e for e in mine if e.get("branch_step") is None]
        assert len(roots) == k and all(e["success"] for e in mine)
        # 5! orders would all be played (and branched in turn) without the cap
        assert len(mine) - len(roots) == cap < 120
        assert len({e["episode_id"] for e in mine}) == len(mine)
