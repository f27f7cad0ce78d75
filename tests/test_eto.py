"""ETO-style pairs on real MiniWoB++ enter-text: the expert's action where the policy left its path."""

from dpo_driver.eto import build_eto_pairs, expert_fallback_pairs, expert_paths, unsolved_seeds
from dpo_driver.policy import Sampling
from dpo_driver.rollouts import run_episodes
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
