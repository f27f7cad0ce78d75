"""The `verbs` rollout strategy on real MiniWoB++ enter-text: distinct first actions are played out
greedily, and the second state of every success is branched, so pairs form at step 1 as well."""

from dpo_driver.actions import parse_action
from dpo_driver.observation import render_prompt
from dpo_driver.pairs import PairParams, ScoreWeights, build_preference_pairs
from dpo_driver.policy import Sampling
from dpo_driver.rollouts import run_episodes
from dpo_driver.tasks import seeds_for


class ScriptedPolicy:
    """Stands in for the LM so the test pins the control flow: at the empty form it proposes
    Submit, a duplicate, and typing the target; after typing, it re-types (wrong) or submits."""

    def __init__(self, detour: bool = False):
        self.calls = []
        self.detour = detour  # at the empty form, also propose focusing the field first (a wasted step)

    def propose(self, prompts, observations, k, sampling, seed):
        self.calls.append((len(prompts), k, sampling.temperature))
        outs = []
        for prompt, obs in zip(prompts, observations):
            target = obs.utterance.split('"')[1]
            typed = obs.elements[0].text != ""
            assert prompt.startswith(render_prompt(obs).split("\nNext action:")[0])  # the prompt is of this page state
            if k == 1:  # greedy continuation: submit once something is typed, else type
                outs.append(['click button "Submit"' if typed else f'type textbox "{target}"'])
            elif typed:
                outs.append(['click button "Submit"', f'type textbox "{target}"', 'click textbox "x"'])
            elif self.detour:
                outs.append(['click textbox ""', f'type textbox "{target}"', 'click button "Submit"'])
            else:
                outs.append(['click button "Submit"', 'click button "Submit"', f'type textbox "{target}"'])
        return outs


def test_verbs_strategy_branches_successes_and_yields_step_one_pairs(miniwob):
    seed = seeds_for("rollout", 1)
    policy = ScriptedPolicy()
    eps = run_episodes(policy, miniwob, ["enter-text"], seed, 3, Sampling(temperature=1.0, strategy="verbs"), max_steps=3, policy_name="p")
    roots = [e for e in eps if e.get("branch_step") is None]
    assert [e["steps"][0]["output"] for e in roots] == ['click button "Submit"', f'type textbox "{roots[1]["steps"][0]["output"].split(chr(34))[1]}"']
    assert [e["success"] for e in roots] == [False, True]  # the duplicate Submit was played once; typing then submitting wins
    branches = [e for e in eps if e.get("branch_step") == 1]
    # At the typed state the successful action is not replayed; the two others are, prefix first.
    assert [e["steps"][1]["output"] for e in branches] == [roots[1]["steps"][0]["output"], 'click textbox "x"']
    assert all(e["branch_of"] == roots[1]["episode_id"] and e["steps"][0]["output"] == roots[1]["steps"][0]["output"] for e in branches)
    assert len({e["episode_id"] for e in eps}) == len(eps)
    assert all(t == 0.0 for n, k, t in policy.calls if k == 1)  # continuations are greedy
    pairs = build_preference_pairs(eps, PairParams(), ScoreWeights(), parse=miniwob.parse)
    assert sorted(pairs["step"]) == [0, 1, 1]
    assert set(pairs.loc[pairs.step == 1, "chosen"]) == {'click button "Submit"'}


def test_only_the_shortest_successes_are_branched(miniwob):
    """Focusing the field first also succeeds (click, type, Submit: 3 steps), but typing directly
    takes 2: only the 2-step success is branched, so no pairs form at states of the detour."""
    policy = ScriptedPolicy(detour=True)
    eps = run_episodes(policy, miniwob, ["enter-text"], seeds_for("rollout", 1), 3, Sampling(temperature=1.0, strategy="verbs"),
                       max_steps=4, policy_name="p")
    roots = {e["steps"][0]["output"]: e for e in eps if e.get("branch_step") is None}
    detour, direct = roots['click textbox ""'], next(e for o, e in roots.items() if o.startswith("type"))
    assert (detour["success"], detour["num_steps"], direct["success"], direct["num_steps"]) == (True, 3, True, 2)
    branches = [e for e in eps if "branch_of" in e]
    assert branches and {e["branch_of"] for e in branches} == {direct["episode_id"]}
    pairs = build_preference_pairs(eps, PairParams(), ScoreWeights(), parse=miniwob.parse)
    assert 'click textbox ""' not in set(pairs["chosen"])


def test_candidates_strategy_finds_successes_an_untrained_model_never_samples(tmp_path, monkeypatch, miniwob):
    """A random ~1M-parameter model decoding freely never writes a working action; with `candidates` every action
    the page offers is played too, so successes (and pairs whose chosen is the right click) exist."""
    from dpo_driver.policy import LMPolicy
    from dpo_driver.training import load_policy

    monkeypatch.setenv("DPO_DRIVER_CACHE", str(tmp_path / "cache"))
    policy = LMPolicy(*load_policy("tiny-random"), env=miniwob)
    seeds = seeds_for("rollout", 3)
    sampled = run_episodes(policy, miniwob, ["click-button"], seeds, 2, Sampling(temperature=1.0, max_new_tokens=8, strategy="verbs", constrained=False),
                           max_steps=2, policy_name="p")
    assert not any(e["success"] for e in sampled)
    eps = run_episodes(policy, miniwob, ["click-button"], seeds, 2, Sampling(temperature=1.0, max_new_tokens=8, strategy="candidates", constrained=False),
                       max_steps=2, policy_name="p")
    assert {e["seed"] for e in eps if e["success"]} == set(seeds)  # every page's right button was played
    pairs = build_preference_pairs(eps, PairParams(), ScoreWeights(), parse=miniwob.parse)
    assert set(pairs["seed"]) == set(seeds)
    for _, row in pairs.iterrows():
        target = row["prompt"].split('"')[1]  # 'Task: Click on the "X" button.'
        assert row["chosen"] == f'click button "{target}"' and parse_action(row["rejected"]) is not None
