"""ETO-style pairs on real MiniWoB++ enter-text: the expert's action where the policy left its path."""

from dpo_driver.eto import build_eto_pairs, expert_paths
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
