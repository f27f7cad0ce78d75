"""The tooluse family: items per seed, the expert, rewards, the grammar and its regex."""

import json
import re

import pytest

from dpo_driver.environment import load_environment
from dpo_driver.families.tooluse import ACTION_REGEX, TOOLS_LINE, ToolUse, build_item

ENV = ToolUse()


def act(tool: str, thought: str = "I will try.", **args) -> str:
    return f"Thought: {thought}\nAction: " + json.dumps({"tool": tool, "args": args})


def episode(task: str, seed: int, completions: list[str]):
    """Play `completions` on (task, seed); the transitions."""
    s = ENV.open(task)
    s.reset(seed)
    return [s.step(c) for c in completions]


def test_load_environment_and_interface():
    env = load_environment("tooluse")
    assert isinstance(env, ToolUse) and env.name == "tooluse" and env.has_expert and env.multiline_answers
    assert set(env.default_tasks) == set(env.tasks) and len(env.tasks) >= 4
    assert env.suite(None) == list(env.default_tasks)
    assert all(env.max_steps(t) >= 3 for t in env.tasks)


@pytest.mark.parametrize("task", ENV.tasks)
def test_expert_solves_every_seed(task):
    s = ENV.open(task)
    for seed in range(50):
        obs, prompt = s.reset(seed)
        for step in range(ENV.max_steps(task)):
            completion = s.expert()
            assert ENV.parse(completion).action == completion  # the expert writes the canonical form
            assert re.fullmatch(ACTION_REGEX, completion)
            assert completion in ENV.candidates(obs)  # exploration can find the way too
            assert len(ENV.candidates(obs)) > 1
            t = s.step(completion)
            assert t.valid
            if t.done:
                break
            assert t.reward == 0.0 and t.prompt.startswith(TOOLS_LINE)
            obs = t.observation
        assert t.done and t.success and t.reward == 1.0, (task, seed, step)


@pytest.mark.parametrize("task", ENV.tasks)
def test_items_are_deterministic_and_differ_across_seeds(task):
    prompts = [ENV.open(task).reset(seed)[1] for seed in range(20)]
    assert prompts == [ENV.open(task).reset(seed)[1] for seed in range(20)]
    assert len(set(prompts)) >= 18
    assert build_item(task, 5).gold not in prompts[5].split("\n", 1)[1]  # no answer in the prompt (past the tools line)


def test_seed_derivation_is_pinned():
    # random.Random(f"{task}:{seed}") hashes the string with SHA-512: the same items on every run and machine
    assert build_item("calculator", 0).question == "Add 207 and 88."


def test_rewards_right_wrong_and_tool_errors():
    call = act("calculator", a=207, op="+", b=88)
    right, = episode("calculator", 0, [call, act("final_answer", answer=" 295 ")])[1:]
    assert (right.reward, right.done, right.success, right.valid) == (1.0, True, True, True)
    first, wrong = episode("calculator", 0, [call, act("final_answer", answer="296")])
    assert (first.reward, first.done, first.valid) == (0.0, False, True) and "Result: 295" in first.prompt
    assert (wrong.reward, wrong.done, wrong.success, wrong.valid) == (0.0, True, False, True)
    # schema-valid calls with wrong values are valid steps: the tool answers (wrongly, or with an error)
    for completion, result in [(act("calculator", a=207, op="-", b=88), "119"),
                               (act("calculator", a=1, op="/", b=0), "error: division by zero"),
                               (act("calculator", a=10**400, op="/", b=3), "error: number too large"),
                               (act("date", date="2025-01-01", days=10**12), "error: date out of range"),
                               (act("lookup", entity="Nowhere", field="country"), "error: no entry for Nowhere"),
                               (act("date", date="2025-02-30", days=1), "error: invalid date 2025-02-30")]:
        t, = episode("calculator", 0, [completion])
        assert (t.valid, t.done, t.reward, t.info["result"]) == (True, False, 0.0, result)
    # the expert steps past a detour
    s = ENV.open("calculator")
    s.reset(0)
    s.step(act("calculator", a=88, op="+", b=207))
    assert json.loads(s.expert().split("Action: ")[1])["args"] == {"a": 207, "op": "+", "b": 88}


MALFORMED = [
    "The answer is 295.",  # no Thought/Action at all
    "Thought: I know it.",  # no Action line
    'Action: {"tool":"final_answer","args":{"answer":"295"}}',  # no Thought
    'Thought: \nAction: {"tool":"final_answer","args":{"answer":"295"}}',  # empty thought
    'Thought: x\nAction: {"tool":"final_answer","args":{"answer":"295"}}\nResult: 295',  # trailing text
    'Thought: x\nAction: {"tool":"final_answer",\n"args":{"answer":"295"}}',  # JSON over two lines
    'Thought: x\nAction: final_answer(295)',  # not JSON
]
MALFORMED_JSON_OR_SCHEMA = [
    'Thought: x\nAction: {"tool":"final_answer","args":{"answer":"295"}',  # unbalanced braces ...
    'Thought: x\nAction: {"tool":"final_answer","args":{"answer":"295",}}',  # trailing comma
    "Thought: x\nAction: {'tool':'final_answer','args':{'answer':'295'}}",  # single quotes
    act("search", query="295"),  # unknown tool
    act("calculator", a="207", op="+", b=88),  # a string for an int
    act("calculator", a=207.0, op="+", b=88),  # a float for an int
    act("calculator", a=207, op="^", b=88),  # no such operator
    act("calculator", a=207, b=88),  # missing argument
    act("lookup", entity="X", field="mayor"),  # no such field
    act("date", date="15/11/2020", days=3),  # not YYYY-MM-DD
    act("final_answer", answer=295),  # the answer is a string
    act("final_answer", answer="295", confidence=1),  # an invented argument
    'Thought: x\nAction: {"tool":"final_answer"}',  # no args
    'Thought: x\nAction: {"tool":"final_answer","args":{"answer":"295"},"extra":1}',
]


@pytest.mark.parametrize("completion", MALFORMED + MALFORMED_JSON_OR_SCHEMA)
def test_malformed_answers_end_the_episode_invalid(completion):
    t, = episode("calculator", 0, [completion])
    assert (t.reward, t.done, t.success, t.valid) == (-1.0, True, False, False) and t.info["error"]
    assert not ENV.parse(completion).ok and ENV.parse(completion).error


def test_action_regex_agrees_with_parse():
    valid = [act("final_answer", answer="295"), "  " + act("calculator", a=1, op="*", b=2) + "\n",
             'Thought: swapped keys, spaces\nAction: { "args" : { "b": 88, "op": "+", "a": 207 }, "tool": "calculator" }']
    for c in valid:
        p = ENV.parse(c)
        assert p.ok and re.fullmatch(ACTION_REGEX, c.strip()) and re.fullmatch(ACTION_REGEX, p.action)
    for c in MALFORMED:
        assert not ENV.parse(c).ok and not re.fullmatch(ACTION_REGEX, c.strip()), c
    # the regex is the text-level shape; JSON validity and the tool schemas are parse's alone
    for c in MALFORMED_JSON_OR_SCHEMA:
        assert re.fullmatch(ACTION_REGEX, c) and not ENV.parse(c).ok, c


def test_parse_is_canonical():
    expert = "Thought: I need to compute 207 + 88.\nAction: " + '{"tool":"calculator","args":{"a":207,"op":"+","b":88}}'
    shuffled = 'Thought: I need to compute 207 + 88. \nAction: {"args": {"b": 88, "op": "+", "a": 207}, "tool": "calculator"}'
    assert ENV.parse(shuffled).action == ENV.parse(expert).action == expert


def test_decontamination_text_is_the_item():
    _, prompt = ENV.open("lookup").reset(3)
    assert ENV.decontamination_text(prompt) == f"Question: {build_item('lookup', 3).question}"


def test_max_new_tokens_fits_the_expert():
    from dpo_driver.model import default_cache_dir

    path = default_cache_dir() / "smollm2-135m" / "tokenizer.json"
    if not path.is_file():
        pytest.skip("smollm2-135m tokenizer not built on this machine")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    longest = 0
    for task in ENV.tasks:
        s = ENV.open(task)
        for seed in range(30):
            s.reset(seed)
            while True:
                completion = s.expert()
                longest = max(longest, len(tok.encode(completion).ids))
                if s.step(completion).done:
                    break
    assert longest + 4 <= ToolUse.max_new_tokens  # room for the end-of-turn token and a little more
