"""ETO-style pairs on real MiniWoB++ enter-text: the expert's action where the policy left its path."""

import pytest

from dpo_driver.eto import build_eto_pairs, expert_fallback_pairs, expert_paths, expert_start_episodes, unsolved_seeds
from dpo_driver.pairs import PairParams, ScoreWeights, build_preference_pairs
from dpo_driver.policy import Sampling
from dpo_driver.rollouts import collect_rollouts, run_episodes
from dpo_driver.tasks import seeds_for


class SubmitFirst:
    """Submits the empty form (fails at step 0), or types the wrong text then submits (fails at step 1)."""

    def __init__(self, typo: bool):
        self.typo = typo

    def propose(self, prompts, observations, k, sampling, seed):
        outs = []
        for obs in observations:
            typed = obs.elements[0].text != ""
            if self.typo:
                outs.append(['click button "Submit"' if typed else 'type textbox "nobody"'] * k)
            else:
                outs.append(['click button "Submit"'] * k)
        return outs


def test_eto_pairs_put_the_experts_action_against_the_first_divergent_failure(miniwob):
    seeds = seeds_for("rollout", 2)
    greedy = Sampling(temperature=0.0)
    eps = run_episodes(SubmitFirst(False), miniwob, ["enter-text"], seeds, 1, greedy, max_steps=3, num_envs=0) + \
        run_episodes(SubmitFirst(True), miniwob, ["enter-text"], seeds, 1, greedy, max_steps=3, num_envs=0, policy_name="typo")
    assert not any(e["success"] for e in eps)
    paths = expert_paths(miniwob, {"enter-text": seeds})
    assert set(paths) == {("enter-text", s) for s in seeds}
    pairs = build_eto_pairs(eps, paths, miniwob.parse)
    assert len(pairs) == 2 * len(seeds)
    for _, p in pairs.iterrows():
        assert p["step"] == 0 and p["chosen"].startswith('type textbox "') and p["chosen"] != p["rejected"]
        assert p["rejected"] in ('click button "Submit"', 'type textbox "nobody"')


def test_unsolved_seeds_are_those_where_no_sample_succeeded_and_browser_faults_do_not_count():
    def e(task, seed, sample, success, env_error=False):
        return {"episode_id": f"{task}-{seed}-{sample}", "task": task, "seed": seed, "sample": sample,
                "success": success, "env_error": env_error, "steps": []}
    a, b = seeds_for("rollout", 2)
    eps = [e("t1", a, 0, False), e("t1", a, 1, True), e("t1", b, 0, False), e("t2", a, 0, False),
           e("t2", b, 0, False), e("t2", b, 1, True, env_error=True)]
    assert unsolved_seeds(eps) == {"t1": [b], "t2": [a, b]}
    assert unsolved_seeds([e("t1", a, 0, True)]) == {}


def test_expert_fallback_pairs_only_where_no_rollout_succeeded(miniwob):
    seeds = seeds_for("rollout", 2)
    eps = run_episodes(SubmitFirst(False), miniwob, ["enter-text"], seeds, 1, Sampling(temperature=0.0), max_steps=3, num_envs=0)
    # Mark seed 0 solved (as if another sample had succeeded there): the expert is not asked on it.
    solved = {**eps[0], "episode_id": "solved", "sample": 1, "success": True}
    pairs = expert_fallback_pairs(eps + [solved], miniwob, miniwob.parse)
    assert list(pairs["seed"]) == [seeds[1]]
    assert pairs.iloc[0]["chosen"].startswith('type textbox "') and pairs.iloc[0]["rejected"] == 'click button "Submit"'


class Finisher:
    """Proposes `outs` (in order) at every state; greedy continuations take the first."""

    def __init__(self, *outs: str):
        self.outs = list(outs)

    def propose(self, prompts, observations, k, sampling, seed):
        return [self.outs[:k] for _ in prompts]


def test_expert_starts_pair_the_policys_own_actions_after_the_experts_prefix(miniwob):
    seeds = seeds_for("rollout", 2)
    eps = run_episodes(SubmitFirst(False), miniwob, ["enter-text"], seeds, 1, Sampling(temperature=0.0), max_steps=3, num_envs=0)
    solved = {**eps[0], "episode_id": "solved", "sample": 1, "success": True}  # seed 0 solved: no expert start there
    policy = Finisher('click button "Submit"', 'type textbox "nobody"')
    starts = expert_start_episodes(policy, miniwob, eps + [solved], 2, Sampling(temperature=1.0), max_steps=3)
    # enter-text's expert types, then submits: from its second state, submitting succeeds, retyping fails.
    assert [(e["seed"], e["expert_prefix"], e["sample"], e["success"]) for e in starts] == [(seeds[1], 1, 1, True), (seeds[1], 1, 2, False)]
    assert all(e["split"] == "train" and e["steps"][0]["output"].startswith('type textbox "') for e in starts)
    pairs = build_preference_pairs(eps + starts, PairParams(), ScoreWeights(), parse=miniwob.parse)
    # Only the pair after the prefix: the expert's typing at step 0 is neither chosen against the
    # policy's failed submit nor rejected.
    assert [(p["seed"], p["step"], p["chosen"], p["rejected"]) for _, p in pairs.iterrows()] == \
        [(seeds[1], 1, 'click button "Submit"', 'type textbox "nobody"')]


def test_expert_starts_walk_back_while_the_policy_still_finishes(miniwob):
    seeds = seeds_for("rollout", 1)
    never = [{"episode_id": "x", "task": "login-user", "seed": seeds[0], "sample": 0, "success": False, "env_error": False, "steps": []}]
    # login-user: type the username, the password, click Login. A policy that only clicks Login
    # finishes from the last state, not from the one before it: two states tried, then it stops.
    clicks = expert_start_episodes(Finisher('click button "Login"'), miniwob, never, 4, Sampling(), max_steps=5)
    assert [(e["expert_prefix"], e["success"]) for e in clicks] == [(2, True), (1, False)]
    # One that never finishes stops at the last state.
    typing = expert_start_episodes(Finisher('type textbox "nobody" #1'), miniwob, never, 4, Sampling(), max_steps=5)
    assert [(e["expert_prefix"], e["success"]) for e in typing] == [(2, False)]


def test_expert_starts_need_an_expert():
    miniwob_like = type("WithExpert", (), {"name": "miniwob", "has_expert": True})()

    class NoExpert:
        name, has_expert = "none", False

    with pytest.raises(ValueError, match="need a family with an expert; 'none' has none"):
        expert_start_episodes(Finisher("x"), NoExpert(), [], 2, Sampling())

    def no_model():
        raise AssertionError("the policy must not be loaded: the option is refused first")

    # The rollout stage refuses the option before any work: no expert, or logged traces in place of rollouts.
    with pytest.raises(ValueError, match="needs a family with an expert"):
        collect_rollouts(no_model, NoExpert(), ["t"], [0], 2, Sampling(), None, "sft", "adapter", expert_starts=True)
    with pytest.raises(ValueError, match="not logged traces"):
        collect_rollouts(no_model, miniwob_like, ["t"], [0], 2, Sampling(), None, "sft", "adapter", traces_path="t.jsonl", expert_starts=True)
