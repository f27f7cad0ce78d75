import pandas as pd
import pytest

from dpo_driver.pairs import PAIR_COLUMNS, PairParams, ScoreWeights, build_preference_pairs, pair_yield, score_episode, to_dpo_records, to_kto_records
from dpo_driver.families.miniwob import MiniWoB
from dpo_driver.tasks import BAND

PARSE = MiniWoB.parse

SEED = BAND + 7  # a rollout-band seed


def ep(sample, success, outputs, prompts=None, seed=SEED, task="enter-text", invalid=False, env_error=False, reward=None):
    prompts = prompts or [f"P{i}" for i in range(len(outputs))]
    steps = [{"step": i, "prompt": p, "output": o, "action": o if not invalid else None} for i, (p, o) in enumerate(zip(prompts, outputs))]
    return {"episode_id": f"sft:{task}:{seed}:{sample}", "task": task, "seed": seed, "sample": sample, "success": success,
            "reward": reward if reward is not None else (0.8 if success else -1.0), "num_steps": len(steps), "invalid": invalid,
            "env_error": env_error, "steps": steps}


W = ScoreWeights()


def test_score_prefers_success_then_efficiency():
    fast = ep(0, True, ['type textbox "a"'], reward=0.9)
    slow = ep(1, True, ['type textbox "a"', 'click button "Submit"'], reward=0.5)
    fail = ep(2, False, ['click button "Submit"'])
    invalid = ep(3, False, ["blah"], invalid=True)
    assert score_episode(fast, W) > score_episode(slow, W) > score_episode(fail, W) > score_episode(invalid, W)


def test_pair_at_first_divergent_step_of_a_multistep_task():
    good = ep(0, True, ['type textbox "Myron"', 'click button "Submit"'], prompts=["P0", "P1"])
    bad = ep(1, False, ['type textbox "Myron"', 'click textbox "Myron"'], prompts=["P0", "P1"])
    pairs = build_preference_pairs([good, bad], PairParams(), W, parse=PARSE)
    assert list(pairs.columns) == PAIR_COLUMNS
    row = pairs.iloc[0]
    assert (row.step, row.prompt, row.chosen, row.rejected) == (1, "P1", 'click button "Submit"', 'click textbox "Myron"')
    assert row.margin == pytest.approx(row.chosen_score - row.rejected_score) and row.margin >= 0.5


def test_outputs_that_lead_to_the_same_state_are_not_the_divergence():
    """Tool use: two thoughts before the same call reach the same next state; the episodes part at
    the final answer, so the pair is there (not "calculate" over "compute" at step 0)."""
    from dpo_driver.families.tooluse import ToolUse

    call = '\nAction: {"tool":"calculator","args":{"a":2,"op":"+","b":3}}'
    answer = 'Thought: I know the answer.\nAction: {"tool":"final_answer","args":{"answer":"%s"}}'
    good = ep(0, True, ["Thought: I need to calculate 2 + 3." + call, answer % 5], prompts=["Q", "Q+R"], task="calculator")
    bad = ep(1, False, ["Thought: I need to compute 2 + 3." + call, answer % 6], prompts=["Q", "Q+R"], task="calculator")
    [row] = build_preference_pairs([good, bad], PairParams(), W, parse=ToolUse().parse).itertuples()
    assert (row.step, row.prompt, row.chosen, row.rejected) == (1, "Q+R", answer % 5, answer % 6)
    # Different next states, or one episode ending there: the step where they part is the pair.
    bad_call = ep(2, False, ["Thought: I need to compute 2 + 3." + call.replace('"b":3', '"b":4'), answer % 6],
                  prompts=["Q", "Q+R'"], task="calculator")
    ended = ep(3, False, [answer % 6], prompts=["Q"], task="calculator")
    rows = build_preference_pairs([good, bad_call, ended], PairParams(), W, parse=ToolUse().parse)
    assert sorted(zip(rows.step, rows.rejected)) == sorted([(0, bad_call["steps"][0]["output"]), (0, ended["steps"][0]["output"])])
    # Identical outputs and identical states all the way: no pair.
    assert build_preference_pairs([good, {**good, "episode_id": "x", "sample": 5, "success": False, "reward": -1.0}], PairParams(), W,
                                  parse=ToolUse().parse).empty


def test_no_pair_without_both_outcomes_or_from_crashes():
    wins = [ep(i, True, ['click button "a"']) for i in range(3)]
    crash = ep(9, False, ['click button "b"'], env_error=True)
    assert build_preference_pairs(wins + [crash], PairParams(), W, parse=PARSE).empty


def test_margin_filter_and_malformed_rejected():
    good = ep(0, True, ['click button "a"'], reward=0.0)
    bad = ep(1, False, ['click button "b"'], reward=0.0)
    assert len(build_preference_pairs([good, bad], PairParams(min_margin=0.5), W, parse=PARSE)) == 1
    assert build_preference_pairs([good, bad], PairParams(min_margin=5.0), W, parse=PARSE).empty
    garbage = ep(2, False, ["I think the answer is a"], invalid=True)
    assert build_preference_pairs([good, garbage], PairParams(rejected_must_parse=True), W, parse=PARSE).empty
    assert len(build_preference_pairs([good, garbage], PairParams(rejected_must_parse=False), W, parse=PARSE)) == 1


def test_dedup_and_cap_per_prompt():
    good = [ep(i, True, ['click button "a"']) for i in range(3)]
    bad = [ep(10 + i, False, ['click button "b"']) for i in range(3)] + [ep(20, False, ['click button "c"'])]
    pairs = build_preference_pairs(good + bad, PairParams(max_pairs_per_prompt=5), W, parse=PARSE)
    assert sorted(pairs["rejected"]) == ['click button "b"', 'click button "c"']  # 9 identical triples collapse to one
    assert pairs["pair_id"].is_unique
    assert len(build_preference_pairs(good + bad, PairParams(max_pairs_per_prompt=1), W, parse=PARSE)) == 1


def test_refuses_evaluation_seeds():
    with pytest.raises(ValueError, match="evaluation seed"):
        build_preference_pairs([ep(0, True, ['click button "a"'], seed=2 * BAND + 1)], PairParams(), W, parse=PARSE)


def test_deterministic_and_trl_format():
    eps = [ep(0, True, ['click button "a"']), ep(1, False, ['click button "b"']), ep(2, False, ['click button "c"'])]
    a = build_preference_pairs(eps, PairParams(), W, parse=PARSE)
    b = build_preference_pairs(list(reversed(eps)), PairParams(), W, parse=PARSE)
    pd.testing.assert_frame_equal(a, b)
    rec = to_dpo_records(a)[0]
    assert rec["prompt"][0]["role"] == "user" and rec["chosen"][0]["role"] == rec["rejected"][0]["role"] == "assistant"
    assert pair_yield(eps, a) == {"prompts": 1, "prompts_with_both": 1, "pair_yield": 1.0, "pairs": 2}


def test_wall_clock_reward_jitter_does_not_change_pairs_by_default():
    # MiniWoB's reward decays with browser wall time: a same-seed rerun gives the same actions
    # slightly different rewards. The default score must not let that reorder or rescore pairs.
    def run(rewards):
        wins = [ep(i, True, ['type textbox "a"', 'click button "Submit"'], prompts=["P0", "P1"], reward=r) for i, r in enumerate(rewards)]
        losses = [ep(10 + i, False, [o], prompts=["P0"]) for i, o in enumerate(['click button "Submit"', 'click textbox "a"'])]
        return build_preference_pairs(wins + losses, PairParams(max_pairs_per_prompt=1), W, parse=PARSE)

    first, second = run([0.91, 0.93]), run([0.93, 0.91])
    pd.testing.assert_frame_equal(first, second)
    weighted = ScoreWeights(reward=0.1)
    assert build_preference_pairs([ep(0, True, ["x"], reward=0.91), ep(1, True, ["x"], reward=0.93), ep(2, False, ['click button "b"'])],
                                  PairParams(max_pairs_per_prompt=1), weighted, parse=PARSE).iloc[0].chosen_episode.endswith(":1")


def test_kto_labels_success_steps_and_the_last_step_of_failures():
    win = ep(0, True, ['type textbox "a"', 'click button "Submit"'], prompts=["P0", "P1"])
    retype = ep(1, False, ['type textbox "a"', 'type textbox "a"'], prompts=["P0", "P1"])  # right first step, wrong second
    early = ep(2, False, ['click button "Submit"'], prompts=["P0"])
    garbage = ep(3, False, ["no idea"], prompts=["P0"], invalid=True)
    crash = ep(4, False, ['click textbox "a"'], prompts=["P0"], env_error=True)
    recs = to_kto_records([win, retype, early, garbage, crash, ep(5, True, ['type textbox "a"', 'click button "Submit"'], prompts=["P0", "P1"])], parse=PARSE)
    got = {(r["prompt"][0]["content"], r["completion"][0]["content"], r["label"]) for r in recs}
    assert got == {("P0", 'type textbox "a"', True), ("P1", 'click button "Submit"', True),
                   ("P1", 'type textbox "a"', False), ("P0", 'click button "Submit"', False)}
    assert len(recs) == 4  # duplicates collapse; the correct first step of `retype` is not blamed
    assert ("P0", "no idea", False) in {(r["prompt"][0]["content"], r["completion"][0]["content"], r["label"])
                                        for r in to_kto_records([win, garbage])}
    with pytest.raises(ValueError, match="evaluation seed"):
        to_kto_records([ep(0, True, ["x"], seed=2 * BAND + 1)])


def test_chosen_is_a_shortest_success_from_the_divergence_state():
    # click-button pages hold stray text fields: typing there first and clicking right after still
    # succeeds, but wastes a step. With a one-step success on the same page, it is never chosen.
    direct = ep(0, True, ['click button "ok"'], task="click-button")
    detour = ep(1, True, ['type textbox "ok"', 'click button "ok"'], prompts=["P0", "P1"], task="click-button")
    wrong = ep(2, False, ['click button "no"'], task="click-button")
    pairs = build_preference_pairs([direct, detour, wrong], PairParams(max_pairs_per_prompt=5), W, parse=PARSE)
    assert list(pairs["chosen"]) == ['click button "ok"']
    lenient = build_preference_pairs([direct, detour, wrong], PairParams(max_pairs_per_prompt=5, shortest_chosen=False), W, parse=PARSE)
    assert sorted(lenient["chosen"]) == ['click button "ok"', 'type textbox "ok"']
    # Without a shorter success the detour is the best known way, and stays eligible.
    assert list(build_preference_pairs([detour, wrong], PairParams(), W, parse=PARSE)["chosen"]) == ['type textbox "ok"']


def test_kto_desirable_steps_are_those_of_shortest_successes():
    direct = ep(0, True, ['click button "ok"'], task="click-button")
    detour = ep(1, True, ['type textbox "ok"', 'click button "ok"'], prompts=["P0", "P1"], task="click-button")
    wrong = ep(2, False, ['click button "no"'], task="click-button")
    labels = {(r["prompt"][0]["content"], r["completion"][0]["content"]): r["label"] for r in to_kto_records([direct, detour, wrong], parse=PARSE)}
    # The detour's first step is not desirable; its last step is (no shorter success from P1 exists).
    assert labels == {("P0", 'click button "ok"'): True, ("P1", 'click button "ok"'): True, ("P0", 'click button "no"'): False}
    assert ("P0", 'type textbox "ok"') in {(r["prompt"][0]["content"], r["completion"][0]["content"])
                                           for r in to_kto_records([direct, detour, wrong], parse=PARSE, shortest_only=False)}


def test_validation_seeds_give_held_out_pairs_without_taking_training_pairs():
    from dpo_driver.dpo_gates import train_and_validation_pairs
    from dpo_driver.tasks import VALIDATION_OFFSET

    def seed_pair(seed, prompt, split):
        return [{**ep(0, True, ['click button "a"'], prompts=[prompt], seed=seed), "split": split},
                {**ep(1, False, ['click button "b"'], prompts=[prompt], seed=seed), "split": split}]

    train_eps = [e for k in range(3) for e in seed_pair(BAND + k, f"train page {k}", "train")]
    val_eps = seed_pair(BAND + VALIDATION_OFFSET, "fresh page", "validation")
    val_eps += seed_pair(BAND + VALIDATION_OFFSET + 1, "train page 0", "validation")  # a page that recurs word for word

    def build(eps):
        return build_preference_pairs(eps, PairParams(), W, parse=PARSE)

    train, held = train_and_validation_pairs(train_eps + val_eps, build)
    # Exactly the pairs a run without validation seeds trains on: a small task gives up none.
    pd.testing.assert_frame_equal(train, build(train_eps))
    assert held.prompt.tolist() == ["fresh page"]  # the recurring page is dropped: every held-out prompt is unseen
    assert (held.seed >= BAND + VALIDATION_OFFSET).all()
    # Logged traces have no validation seeds: a share of the training pairs is held out instead.
    train, held = train_and_validation_pairs(train_eps, build, fraction=0.34)
    assert len(train) == 2 and len(held) == 1 and set(train.prompt).isdisjoint(held.prompt)
    train, held = train_and_validation_pairs(train_eps, build)
    assert len(train) == 3 and held.empty and list(held.columns) == PAIR_COLUMNS


def test_no_pair_where_the_failure_took_the_successes_action_in_another_order():
    # click-option: select "sZpM", then Submit. The failure clicked the right radio first and a wrong
    # one after; the success clicked the wrong one first and the right one after. At step 0 the
    # failure's action is the right one: no pair there.
    task, p0 = "click-option", "Select sZpM and click Submit."
    good = ep(0, True, ['click radio "58x"', 'click radio "sZpM"', 'click button "Submit"'], prompts=[p0, "after 58x", "after both"], task=task)
    swapped = ep(1, False, ['click radio "sZpM"', 'click radio "58x"', 'click button "Submit"'], prompts=[p0, "after sZpM", "after both'"],
                 task=task)
    submitted = ep(2, False, ['click button "Submit"'], prompts=[p0], task=task)  # ended there: it is the failure
    wrong = ep(3, False, ['click radio "1FC"', 'click button "Submit"'], prompts=[p0, "after 1FC"], task=task)  # never in the success
    pairs = build_preference_pairs([good, swapped, submitted, wrong], PairParams(max_pairs_per_prompt=5), W, parse=PARSE)
    assert sorted(pairs["rejected"]) == ['click button "Submit"', 'click radio "1FC"']
    lenient = build_preference_pairs([good, swapped, submitted, wrong], PairParams(max_pairs_per_prompt=5, skip_reordered=False), W, parse=PARSE)
    assert sorted(lenient["rejected"]) == ['click button "Submit"', 'click radio "1FC"', 'click radio "sZpM"']
