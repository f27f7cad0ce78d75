import numpy as np
import pytest

from dpo_driver.actions import Action, parse_action, resolve_target
from dpo_driver.observation import Element, Observation, parse_observation, render_prompt


def _dom(*rows):
    return [{"ref": r, "tag": t, "text": x, "classes": c, "value": v, "flags": np.zeros(4)} for r, t, x, c, v in rows]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('click button "okay"', Action("click", "button", "okay")),
        ('  click link "Eget"\nmore text', Action("click", "link", "Eget")),
        ('type textbox "Myron"', Action("type", "textbox", "Myron")),
        ('click tab "Tab #3"', Action("click", "tab", "Tab #3")),
        ('click radio ""', Action("click", "radio", "")),
        ("click button okay", None),  # text must be quoted
        ('press button "okay"', None),  # unknown verb
        ('click widget "okay"', None),  # unknown kind
        ('click button "okay" now', None),  # trailing junk
        ("", None),
        ("   ", None),
    ],
)
def test_parse_action(text, expected):
    assert parse_action(text) == expected


def test_render_round_trips():
    a = Action("type", "textbox", "hello world")
    assert parse_action(a.render()) == a


ELEMENTS = [Element(5, "link", "eget"), Element(6, "link", "Eget"), Element(7, "button", "Submit"), Element(8, "textbox", "")]


@pytest.mark.parametrize(
    "action, ref",
    [
        (Action("click", "link", "Eget"), 6),  # exact match wins over the case-folded one
        (Action("click", "link", "eget"), 5),
        (Action("click", "link", "EGET"), 5),  # case-insensitive fallback
        (Action("click", "button", "submit"), 7),
        (Action("type", "textbox", "anything"), 8),
        (Action("click", "button", "Cancel"), None),
        (Action("click", "tab", "Submit"), None),  # right text, wrong kind
        (Action("type", "textarea", "x"), None),
        (Action("type", "button", "Submit"), None),  # typing needs a text field, not a click side effect
    ],
)
def test_resolve_target(action, ref):
    target = resolve_target(action, ELEMENTS)
    assert (target.ref if target else None) == ref


def test_parse_observation_keeps_actionable_elements_with_labels():
    obs = parse_observation(
        {
            "utterance": 'Select "nd7" and click Submit.',
            "dom_elements": _dom(
                (2, "div", "", "", ""),
                (4, "span", "blandit", "alink", ""),
                (-1, "t", "long filler text", "", ""),
                (6, "a", "Tab #1", "ui-tabs-anchor", ""),
                (10, "input_radio", "", "", ""),
                (-2, "t", "nd7", "", ""),
                (15, "input_text", "", "tt", 'typed "value"'),
                (16, "button", "Submit", "secondary-action", ""),
            ),
        }
    )
    assert obs.elements == (
        Element(4, "link", "blandit"),
        Element(6, "tab", "Tab #1"),
        Element(10, "radio", "nd7"),
        Element(15, "textbox", "typed 'value'"),  # quotes are rewritten so the action grammar stays parseable
        Element(16, "button", "Submit"),
    )


def test_render_prompt_lists_elements_and_history():
    obs = Observation('Enter "Myron" and press Submit.', (Element(5, "textbox", ""), Element(6, "button", "Submit")))
    assert render_prompt(obs) == (
        'Task: Enter "Myron" and press Submit.\nElements:\n1. textbox ""\n2. button "Submit"\nNext action:'
    )
    with_history = render_prompt(obs, ['type textbox "Myron"'])
    assert with_history.endswith('Done so far:\n- type textbox "Myron"\nNext action:')
