"""The broadened action language, and every supported task's scripted expert on real MiniWoB++."""

import pandas as pd
import pytest

from dpo_driver.actions import ACTION_REGEX, KINDS, VERBS, Action, candidate_actions, parse_action, resolve_target, verbs_for
from dpo_driver.demos import play_expert
from dpo_driver.env import WebEnv
from dpo_driver.experts import EXPERTS
from dpo_driver.observation import Element, parse_observation
from dpo_driver.families.miniwob import DEFAULT_TASKS, SUPPORTED_TASKS, MiniWoBSession, max_steps_for


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text, nth", [("okay", None), ("Zoom Out now", None), ("", 3), ("like @user", 12)])
def test_every_action_renders_and_parses_back(verb, kind, text, nth):
    action = Action(verb, kind, text, nth)
    assert parse_action(action.render()) == action
    # the quality gates match with pandas; they must agree with parse_action
    assert pd.Series([action.render()]).str.match(ACTION_REGEX).item()


@pytest.mark.parametrize(
    "text, expected",
    [
        ('click textbox "" #2', Action("click", "textbox", "", 2)),
        ('type textbox "-5" #3', Action("type", "textbox", "-5", 3)),
        ('select option "5ft 9in"', Action("select", "option", "5ft 9in")),
        ('click icon "share @annis" #12', Action("click", "icon", "share @annis", 12)),
        ('click textbox "" #0', None),  # ordinals count from 1
        ('click textbox "" #', None),
        ('click textbox "" 2', None),
        ('click textbox ""#2', None),
        ('press key "Enter"', None),
    ],
)
def test_ordinals_and_new_verbs_parse(text, expected):
    assert parse_action(text) == expected
    assert pd.Series([text]).str.match(ACTION_REGEX).item() == (expected is not None)


PAGE = [Element(1, "textbox", "", 1), Element(2, "textbox", "", 2), Element(3, "textbox", "Bob"), Element(4, "button", "OK", 1),
        Element(5, "button", "OK", 2), Element(6, "dropdown", "Alex"), Element(6, "option", "Alex"), Element(6, "option", "Bea")]


@pytest.mark.parametrize(
    "action, ref",
    [
        (Action("click", "textbox", "", 2), 2),
        (Action("click", "textbox", "", 3), None),  # the 3rd textbox holds "Bob": the text must still match
        (Action("click", "textbox", "Bob", 3), 3),
        (Action("type", "textbox", "hi", 2), 2),
        (Action("type", "textbox", "hi"), 1),  # no ordinal: the first field, as before
        (Action("type", "textbox", "hi", 4), None),
        (Action("click", "button", "OK", 2), 5),
        (Action("select", "option", "Bea"), 6),
        (Action("click", "option", "Bea"), None),  # clicking an <option> selects nothing
        (Action("select", "button", "OK"), None),
        (Action("click", "dropdown", "Alex"), 6),
    ],
)
def test_resolve_target_with_ordinals_and_select(action, ref):
    target = resolve_target(action, PAGE)
    assert (target.ref if target else None) == ref


def test_verbs_for_a_page():
    assert verbs_for(PAGE) == ("click", "type", "select")
    assert verbs_for([Element(1, "button", "OK")]) == ("click",)


def _dom(*rows):
    return [{"ref": r, "parent": p, "tag": t, "text": x, "classes": c, "value": ""} for r, p, t, x, c in rows]


def test_ordinals_only_where_kind_and_text_are_ambiguous():
    raw = {"utterance": "Focus into the 2nd input textbox.", "dom_elements": _dom(
        (1, 0, "body", "", ""), (2, 1, "input_text", "", ""), (3, 1, "input_text", "", ""),
        (4, 1, "button", "Submit", ""), (5, 1, "a", "x", ""), (6, 1, "a", "x", ""), (7, 1, "a", "y", ""))}
    assert [e.render() for e in parse_observation(raw).elements] == [
        'textbox "" #1', 'textbox "" #2', 'button "Submit"', 'link "x" #1', 'link "x" #2', 'link "y"']
    # the published default tasks keep their listing: no ordinals
    assert [e.render() for e in parse_observation(raw, ordinals=False).elements] == [
        'textbox ""', 'textbox ""', 'button "Submit"', 'link "x"', 'link "x"', 'link "y"']


def test_new_kinds_are_named_by_their_text():
    raw = {"utterance": "u", "dropdowns": {9: [("Alex", False), ("Bea", True)]}, "dom_elements": _dom(
        (1, 0, "body", "", ""),
        (2, 1, "h3", "Section #1", "ui-accordion-header ui-corner-top"),
        (3, 1, "span", "Briana", "folder"), (4, 1, "span", "Alan", "file"),
        (5, 1, "span", "@leo", "username"), (6, 1, "span", "", "like active"),
        (7, 1, "li", "", "ui-menu-item"), (8, 7, "div", "Angelica", "ui-menu-item-wrapper"),
        (9, 1, "select", "", ""),
        (10, 1, "button", "", "ui-dialog-titlebar-close"), (11, 10, "span", "", "ui-icon"), (-1, 10, "t", "Close", ""),
        (12, 1, "input_date", "", ""))}
    assert [e.render() for e in parse_observation(raw).elements] == [
        'section "Section #1"', 'folder "Briana"', 'file "Alan"', 'icon "like @leo"', 'item "Angelica"',
        'dropdown "Bea"', 'option "Alex"', 'option "Bea"', 'button "Close"', 'textbox ""']


def test_step_limits_cover_every_supported_task():
    assert set(DEFAULT_TASKS) <= set(SUPPORTED_TASKS) and set(SUPPORTED_TASKS) <= set(EXPERTS)
    assert all(max_steps_for(t) >= 1 for t in SUPPORTED_TASKS)
    with pytest.raises(ValueError, match="unsupported task"):
        max_steps_for("click-pie")


# Prompts and answers of the published default tasks, captured before the language grew: they
# must not change (the SFT 52% -> DPO 96% result was measured on them).
GOLDEN = {
    ("click-button", 0): [('Task: Click on the "okay" button.\nElements:\n1. button "okay"\n2. button "okay"\n3. textbox ""\n4. button "next"\nNext action:', 'click button "okay"')],
    ("click-button", 1): [('Task: Click on the "Ok" button.\nElements:\n1. button "Ok"\nNext action:', 'click button "Ok"')],
    ("click-link", 0): [('Task: Click on the link "Eget".\nElements:\n1. link "ridiculus"\n2. link "eget"\n3. link "malesuada"\n4. link "Eget"\n5. link "pretium"\nNext action:', 'click link "Eget"')],
    ("click-link", 1): [('Task: Click on the link "nam".\nElements:\n1. link "justo."\n2. link "nam"\n3. link "scelerisque"\nNext action:', 'click link "nam"')],
    ("click-widget", 0): [('Task: Click on a "textarea" widget.\nElements:\n1. radio "A"\n2. textbox "gHF2p"\n3. textarea "b"\n4. textarea "928qi"\n5. textarea "3"\nNext action:', 'click textarea "b"')],
    ("click-widget", 1): [('Task: Click on a "checkbox" widget.\nElements:\n1. radio "US"\n2. radio "GDK"\n3. checkbox "Hh8"\n4. checkbox "o"\n5. textarea "2uMiJ"\nNext action:', 'click checkbox "Hh8"')],
    ("enter-text", 0): [
        ('Task: Enter "Agustina" into the text field and press Submit.\nElements:\n1. textbox ""\n2. button "Submit"\nNext action:', 'type textbox "Agustina"'),
        ('Task: Enter "Agustina" into the text field and press Submit.\nElements:\n1. textbox "Agustina"\n2. button "Submit"\nDone so far:\n- type textbox "Agustina"\nNext action:', 'click button "Submit"'),
    ],
    ("enter-text", 1): [
        ('Task: Enter "Jerald" into the text field and press Submit.\nElements:\n1. textbox ""\n2. button "Submit"\nNext action:', 'type textbox "Jerald"'),
        ('Task: Enter "Jerald" into the text field and press Submit.\nElements:\n1. textbox "Jerald"\n2. button "Submit"\nDone so far:\n- type textbox "Jerald"\nNext action:', 'click button "Submit"'),
    ],
}


@pytest.mark.parametrize("task", SUPPORTED_TASKS)
def test_expert_solves_demo_seeds(task):
    """Each supported expert solves demo seeds 0-1 within the task's step limit; every action it
    takes (bar typing text the task does not quote) is one candidate_actions offers; the default
    tasks' prompts and answers are exactly the published ones."""
    with MiniWoBSession(task, None, None) as session:
        for seed in (0, 1):
            episode = play_expert(session, seed, max_steps_for(task))
            assert episode.solved, f"{task} seed {seed}: {episode.failure}"
            steps = [(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in episode.records]
            if task in DEFAULT_TASKS:
                assert steps == GOLDEN[(task, seed)]
            for obs, answer in episode.steps:
                action = parse_action(answer)
                if action.verb == "type" and f'"{action.text}"' not in obs.utterance:
                    continue  # e.g. enter-text-2 types the quoted word in upper case: no page offers that
                assert action in candidate_actions(obs.utterance, obs.elements), (task, seed, action)


def test_select_really_selects_an_option():
    with WebEnv("choose-list") as env:
        obs, fields = env.reset(3)
        option = next(e for e in obs.elements if e.kind == "option" and e.text == fields["target"])
        result = env.step(Action("select", "option", option.text, option.nth))
        dropdown = next(e for e in result.observation.elements if e.kind == "dropdown")
        assert dropdown.text == fields["target"]
        assert env.step(Action("click", "button", "Submit")).raw_reward == 1.0
