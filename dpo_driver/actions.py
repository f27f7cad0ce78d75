"""The agent's action language: one line per step, parsed by code and mapped to a MiniWoB ref.

The policy names an element by its kind and visible text (`click button "okay"`) rather than
by a numeric ref or list index: a probe on this machine found kind+text answers far more
reliable for a 135M model than indices (0.68 vs 0.47 mean success), and they stay readable in
pair data. Code maps the text back to the element.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dpo_driver.observation import Element

VERBS = ("click", "type")
KINDS = ("button", "link", "tab", "textbox", "textarea", "checkbox", "radio")
TEXT_KINDS = ("textbox", "textarea")  # the only kinds `type` can target
# The whole grammar as one regex, shared with the data-quality gates.
ACTION_REGEX = r'^(click|type) (button|link|tab|textbox|textarea|checkbox|radio) "([^"\n]*)"$'
_ACTION_RE = re.compile(ACTION_REGEX)


@dataclass(frozen=True)
class Action:
    verb: str  # "click" or "type"
    kind: str  # element kind, one of KINDS
    text: str  # click: the element's visible text; type: the text to type

    def render(self) -> str:
        return f'{self.verb} {self.kind} "{self.text}"'


def parse_action(output: str) -> Action | None:
    """First line of a model output as an Action, or None when it is not in the grammar."""
    line = output.strip().splitlines()[0].strip() if output.strip() else ""
    m = _ACTION_RE.match(line)
    if not m:
        return None
    return Action(verb=m.group(1), kind=m.group(2), text=m.group(3))


def resolve_target(action: Action, elements: list[Element]) -> Element | None:
    """The element an action refers to, or None when nothing on the page matches.

    `click` matches kind and text exactly, falling back to a case-insensitive match (pages
    such as click-link hold both "eget" and "Eget", and only one is right); `type` targets the
    first text field of that kind, since its text is what gets typed. `type button "Submit"`
    names no target: MiniWoB would focus (click) the button and so submit the form, and a policy
    must not be rewarded for an action that only works through that side effect.
    """
    candidates = [e for e in elements if e.kind == action.kind]
    if action.verb == "type":
        return candidates[0] if candidates and action.kind in TEXT_KINDS else None
    for norm in (_fold, lambda s: _fold(s).casefold()):
        want = norm(action.text)
        match = next((e for e in candidates if norm(e.text) == want), None)
        if match is not None:
            return match
    return None


def _fold(s: str) -> str:
    return " ".join(s.split())


def candidate_actions(utterance: str, elements: list[Element] | tuple[Element, ...]) -> list[Action]:
    """Every action a state offers, in page order: `click` on each listed element, and `type` of
    each quoted string of the task into each text field (typing needs a text; the task's quoted
    strings are the only ones a page hints at). Exploration plays these where sampling finds no
    success; the list never depends on which task the page belongs to."""
    quoted = [q for q in utterance.split('"')[1::2] if q and "\n" not in q] or [""]
    out: list[Action] = []
    for e in elements:
        if e.kind in TEXT_KINDS:
            out += [Action("type", e.kind, q) for q in quoted]
        else:
            out.append(Action("click", e.kind, e.text))
    return list(dict.fromkeys(out))
