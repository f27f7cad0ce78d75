"""Constrained decoding (Sampling.constrained): every answer is one the state accepts, free text stays free."""

import pytest

from dpo_driver.actions import answer_space, parse_action, resolve_target
from dpo_driver.constrained import AnswerSpace, Slot
from dpo_driver.observation import Element, Observation, render_prompt
from dpo_driver.policy import LMPolicy, Sampling
from dpo_driver.rollouts import run_episodes

PAGE = (Element(1, "button", "确定"), Element(2, "button", "ÖK"), Element(3, "link", "eget", 1), Element(4, "link", "eget", 2),
        Element(5, "option", "Blue"), Element(6, "button", 'say "hi"'), Element(7, "textbox", "", 1), Element(8, "textbox", "", 2))
BUTTONS = tuple(e for e in PAGE if e.kind in ("button", "link", "option"))  # no text field: every answer is a fixed one


def acts_on_page(answer: str, elements) -> bool:
    action = parse_action(answer)
    return action is not None and resolve_target(action, list(elements)) is not None


def test_answer_space_is_the_grammar_on_this_page():
    space = answer_space(PAGE)
    assert set(space.fixed) == {'click button "确定"', 'click button "ÖK"', 'click link "eget" #1', 'click link "eget" #2',
                                'select option "Blue"', 'click textbox "" #1', 'click textbox "" #2'}  # a quoted label cannot be spelled
    assert space.slots == (Slot('type textbox "', suffixes=("", " #1", " #2")),)
    for answer in ['click button "确定"', 'type textbox "any text at all"', 'type textbox "" #2', 'select option "Blue"']:
        assert space.accepts(answer) and acts_on_page(answer, PAGE), answer
    for answer in ['click button ÖK', 'click tab "3"', 'type textbox "a" #3', 'type button "ÖK"', 'click option "Blue"',
                   'click button "确定" ', 'type textbox "a"b"']:
        assert not space.accepts(answer), answer


@pytest.mark.parametrize("strategy", ["sample", "verbs"])
def test_a_random_model_answers_only_actions_the_page_accepts(policy, strategy):
    """Random weights write garbage freely; held to the page, every answer is one of its actions,
    the forced verb (strategy "verbs") included, and the samples still differ."""
    obs = [Observation('Click "确定".', BUTTONS)] * 2
    prompts = [render_prompt(o) for o in obs]
    free = policy.propose(prompts, obs, 8, Sampling(temperature=1.0, max_new_tokens=24, strategy=strategy, constrained=False), seed=0)
    held = policy.propose(prompts, obs, 8, Sampling(temperature=1.0, max_new_tokens=24, strategy=strategy, constrained=True), seed=0)
    flat_free, flat_held = sum(free, []), sum(held, [])
    assert not any(acts_on_page(a, BUTTONS) for a in flat_free)  # the constraint is what makes them actions
    assert len(flat_held) == 16 and all(acts_on_page(a, BUTTONS) for a in flat_held), flat_held
    assert len(set(flat_held)) > 2 and any("确定" in a or "ÖK" in a for a in flat_held)  # labels spelled in byte fragments are reachable


def test_free_text_stays_free_inside_the_quotes(policy):
    obs = [Observation('Type "hello".', PAGE)]
    held = policy.propose([render_prompt(obs[0])], obs, 16, Sampling(temperature=1.0, max_new_tokens=48, constrained=True), seed=1)[0]
    space = answer_space(PAGE)
    typed = [a for a in held if a.startswith('type textbox "')]
    assert typed, held
    for a in held:  # accepted, or a typed text the token budget cut before its closing quote
        assert space.accepts(a) or (a in typed and '"' not in a[len('type textbox "'):] and "\n" not in a), a


def test_greedy_is_unchanged_when_the_free_answer_is_accepted(policy):
    """The mask only removes tokens: where the policy's own greedy answer is in the space, it is the answer."""
    obs = Observation('Click "ok".', BUTTONS)
    chat = policy._chat(render_prompt(obs))
    raw = policy._generate([chat], 1, Sampling(temperature=0.0, max_new_tokens=6), 0)[0]
    assert raw and "\ufffd" not in raw
    got = policy._generate([chat], 1, Sampling(temperature=0.0, max_new_tokens=8), 0, spaces=[AnswerSpace((raw, raw + "x"))])[0]
    assert got in (raw, raw + "x")  # the policy's path, then its choice between ending and the one longer answer


def test_constrained_episodes_in_miniwob_never_end_on_a_malformed_answer(policy, miniwob):
    """Real pages, greedy random model: free, it never writes an action; held, every step is one."""
    def play(constrained):
        return run_episodes(policy, miniwob, ["click-button"], [0, 1], 1, Sampling(temperature=0.0, max_new_tokens=24, constrained=constrained),
                            None, policy_name="p")
    free, held = play(False), play(True)
    assert all(e["invalid"] for e in free)
    assert not any(e["invalid"] for e in held) and all(st["valid"] for e in held for st in e["steps"])


def test_tool_use_answers_are_a_thought_then_a_schema_valid_call_in_sight(policy):
    """Tool use: the thought is free (one non-blank line), the call is one of the calls on the arguments in sight."""
    from dpo_driver.families.tooluse import ToolUse

    env = ToolUse()
    obs, prompt = env.open("lookup-calc").reset(0)
    space = env.answer_space(obs)
    expert = env.candidates(obs)[0]
    assert space.accepts(expert) and not space.accepts("Thought:  x\n" + expert.split("\n")[1]) and not space.accepts(expert + " ")
    tool_policy = LMPolicy(policy.model, policy.tokenizer, env)
    held = tool_policy.propose([prompt], [obs], 8, Sampling(temperature=1.0, max_new_tokens=32, constrained=True), seed=0)[0]
    assert all(a.startswith("Thought: ") and not a[len("Thought: "):][:1].isspace() for a in held), held  # thoughts, cut by the budget
    head = "Thought: I look it up.\n"  # past the thought, the call must be one in sight, whole and valid
    calls = tool_policy._generate([tool_policy._chat(prompt) + head], 8, Sampling(temperature=1.0, max_new_tokens=64), 0, [space], [head])
    assert all(space.accepts(head + c) and env.parse(head + c).action for c in calls), calls
    assert len(set(calls)) > 1


def test_a_prefix_ending_in_a_space_is_left_the_way_the_tokenizer_spells_it(policy):
    """A BPE spells "Thought: I" as "Thought", ":", " I": after "Thought:" the mask must allow " I" (the
    prefix's space and the free text's first letter in one token), or the policy is pushed off its own
    spelling (measured: tool-use thoughts became bare numbers and success fell, 36% -> 30%)."""
    from dpo_driver.constrained import AnswerConstraint, Vocab

    tok = policy.tokenizer
    vocab = Vocab(tok, len(tok))
    space = AnswerSpace(slots=(Slot("Thought: ", close="\n", banned="\n", suffixes=("Action: x",), nonblank=True),))
    mask = AnswerConstraint(vocab, [space], [""], 1, (tok.eos_token_id,))._allowed(0, space, b"Thought:")
    allowed = {vocab.bytes[i] for i in mask.nonzero().flatten().tolist()}
    assert b" I" in allowed and b" " in allowed  # across the boundary, or the space alone
    assert b"  " not in allowed and b" \n" not in allowed and b":" not in allowed  # a blank thought, an empty one, off the prefix
    ids = tok("Thought: I know.\nAction: x", add_special_tokens=False)["input_ids"]
    assert space.accepts(tok.decode(ids))
    c = AnswerConstraint(vocab, [space], [""], 1, (tok.eos_token_id,))
    for k in range(len(ids)):  # the tokenizer's own spelling of an accepted answer is never masked
        assert c._allowed(0, space, vocab.spell(ids[:k]))[ids[k]], tok.convert_ids_to_tokens(ids[k:k + 1])
