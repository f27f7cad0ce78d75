"""The agent's action language: one line per step, parsed by code and mapped to a MiniWoB ref.

The policy names an element by its kind and visible text (`click button "okay"`) rather than
by a numeric ref or list index: a probe on this machine found kind+text answers far more
reliable for a 135M model than indices (0.68 vs 0.47 mean success), and they stay readable in
pair data. Code maps the text back to the element. Where kind + text is ambiguous, an ordinal
`#k` (the k-th element of that kind, as the observation lists it) picks one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dpo_driver.constrained import AnswerSpace, Slot
from dpo_driver.observation import Element

VERBS = ("click", "type", "select")
KINDS = ("button", "link", "tab", "textbox", "textarea", "checkbox", "radio",
         "dropdown", "option", "section", "item", "folder", "file", "icon")
TEXT_KINDS = ("textbox", "textarea")  # the only kinds `type` can target
SELECT_KINDS = ("option",)  # the only kind `select` can target; clicking an <option> selects nothing
# The whole grammar as one regex, shared with the data-quality gates.
ACTION_REGEX = rf'^({"|".join(VERBS)}) ({"|".join(KINDS)}) "([^"\n]*)"(?: #([1-9][0-9]?))?$'
_ACTION_RE = re.compile(ACTION_REGEX)


@dataclass(frozen=True)
class Action:
    verb: str  # one of VERBS
    kind: str  # element kind, one of KINDS
    text: str  # click/select: the element's visible text; type: the text to type
    nth: int | None = None  # k-th element of this kind (1-based), where kind + text is ambiguous

    def render(self) -> str:
        return f'{self.verb} {self.kind} "{self.text}"' + (f" #{self.nth}" if self.nth else "")


def parse_action(output: str) -> Action | None:
    """First line of a model output as an Action, or None when it is not in the grammar."""
    line = output.strip().splitlines()[0].strip() if output.strip() else ""
    m = _ACTION_RE.match(line)
    if not m:
        return None
    return Action(verb=m.group(1), kind=m.group(2), text=m.group(3), nth=int(m.group(4)) if m.group(4) else None)


def verbs_for(elements: list[Element] | tuple[Element, ...]) -> tuple[str, ...]:
    """The verbs that can act on a page: `type` needs a text field, `select` an option."""
    kinds = {e.kind for e in elements}
    return tuple(v for v in VERBS if v == "click" or (v == "type" and kinds & set(TEXT_KINDS))
                 or (v == "select" and kinds & set(SELECT_KINDS)))


def resolve_target(action: Action, elements: list[Element]) -> Element | None:
    """The element an action refers to, or None when nothing on the page matches.

    `click` matches kind and text exactly, falling back to a case-insensitive match (pages
    such as click-link hold both "eget" and "Eget", and only one is right); `type` targets the
    first text field of that kind, since its text is what gets typed. `#k` narrows either to
    the k-th element of the kind (and a click's text must still match it). `type button
    "Submit"` names no target: MiniWoB would focus (click) the button and so submit the form,
    and a policy must not be rewarded for an action that only works through that side effect.
    Likewise only `select` acts on an option, and only on an option.
    """
    if (action.verb == "type" and action.kind not in TEXT_KINDS) or (action.verb == "select") != (action.kind in SELECT_KINDS):
        return None
    candidates = [e for e in elements if e.kind == action.kind]
    if action.nth is not None:
        candidates = candidates[action.nth - 1 : action.nth]
    if action.verb == "type":
        return candidates[0] if candidates else None
    for norm in (_fold, lambda s: _fold(s).casefold()):
        want = norm(action.text)
        match = next((e for e in candidates if norm(e.text) == want), None)
        if match is not None:
            return match
    return None


def _fold(s: str) -> str:
    return " ".join(s.split())


def candidate_actions(utterance: str, elements: list[Element] | tuple[Element, ...]) -> list[Action]:
    """Every action a state offers, in page order: `click` on each listed element but options,
    `select` of each option, and `type` of each quoted string of the task into each text field (typing
    needs a text; the task's quoted strings are the only ones a page hints at). Elements listed
    with an ordinal are named with it. Exploration plays these where sampling finds no
    success; the list never depends on which task the page belongs to."""
    quoted = [q for q in utterance.split('"')[1::2] if q and "\n" not in q] or [""]
    out: list[Action] = []
    for e in elements:
        if e.kind in TEXT_KINDS:  # clicking a field focuses it: the answer of focus-text, click-widget
            out += [Action("click", e.kind, e.text, e.nth)] + [Action("type", e.kind, q, e.nth) for q in quoted]
        elif e.kind in SELECT_KINDS:
            out.append(Action("select", e.kind, e.text, e.nth))
        else:
            out.append(Action("click", e.kind, e.text, e.nth))
    return list(dict.fromkeys(out))


def answer_space(elements: list[Element] | tuple[Element, ...]) -> AnswerSpace:
    """The answers that act on this page, for constrained decoding: each click and select of
    `candidate_actions` the grammar can spell, and `type` of any text into each text field kind."""
    fixed = [a.render() for a in candidate_actions("", elements) if a.verb != "type"]
    slots = [Slot(f'type {kind} "', suffixes=("",) + tuple(f" #{e.nth}" for e in elements if e.kind == kind and e.nth))
             for kind in TEXT_KINDS if any(e.kind == kind for e in elements)]
    return AnswerSpace(tuple(a for a in fixed if parse_action(a) is not None), tuple(slots))
