"""MiniWoB observation -> the compact text prompt the policy reads.

Only actionable elements are listed, each as its kind and visible text. A probe found the raw
`[ref] tag text` DOM dump left a 135M model *below* a random-click baseline; the compact list
keeps prompts short (generation cost is most of rollout time) and the answer space small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_TEXT_CHARS = 40  # long paragraphs are never click targets; trim them to keep prompts short
MAX_ELEMENTS = 30


@dataclass(frozen=True)
class Element:
    ref: int  # MiniWoB's element ref, used to act; never shown to the model
    kind: str  # one of actions.KINDS
    text: str


@dataclass(frozen=True)
class Observation:
    utterance: str
    elements: tuple[Element, ...]


def _kind(tag: str, classes: str) -> str | None:
    if tag == "button":
        return "button"
    if tag == "a":
        return "tab" if "ui-tabs-anchor" in classes else "link"
    if tag == "span" and "alink" in classes.split():
        return "link"
    return {
        "input_text": "textbox",
        "input_password": "textbox",
        "textarea": "textarea",
        "input_radio": "radio",
        "input_checkbox": "checkbox",
    }.get(tag)


def parse_observation(obs: dict[str, Any]) -> Observation:
    """Extract actionable elements from a MiniWoB `dom_elements` observation.

    Radio buttons and checkboxes carry no text of their own: their label is the text node
    (negative ref) that follows them in document order.
    """
    dom = list(obs["dom_elements"])
    elements: list[Element] = []
    for i, e in enumerate(dom):
        kind = _kind(str(e["tag"]), str(e.get("classes", "")))
        if kind is None:
            continue
        if kind in ("textbox", "textarea"):
            text = str(e.get("value", "") or "")
        elif kind in ("radio", "checkbox"):
            nxt = dom[i + 1] if i + 1 < len(dom) else None
            text = str(nxt["text"]) if nxt is not None and int(nxt["ref"]) < 0 else ""
        else:
            text = str(e.get("text", ""))
        text = " ".join(text.split()).replace('"', "'")[:MAX_TEXT_CHARS]
        elements.append(Element(ref=int(e["ref"]), kind=kind, text=text))
    return Observation(utterance=str(obs["utterance"]), elements=tuple(elements[:MAX_ELEMENTS]))


def render_prompt(observation: Observation, history: list[str] | tuple[str, ...] = ()) -> str:
    """The user-message text for one step. `history` holds the rendered earlier actions."""
    lines = [f"Task: {observation.utterance}", "Elements:"]
    lines += [f'{i}. {e.kind} "{e.text}"' for i, e in enumerate(observation.elements, 1)]
    if history:
        lines.append("Done so far:")
        lines += [f"- {a}" for a in history]
    lines.append("Next action:")
    return "\n".join(lines)
