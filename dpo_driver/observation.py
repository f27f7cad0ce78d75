"""MiniWoB observation -> the compact text prompt the policy reads.

Only actionable elements are listed, each as its kind and visible text. A probe found the raw
`[ref] tag text` DOM dump left a 135M model *below* a random-click baseline; the compact list
keeps prompts short (generation cost is most of rollout time) and the answer space small.

Elements that kind + text cannot tell apart (three empty textboxes in focus-text-2) carry an
ordinal `#k`: the k-th listed element of that kind, which is also how `type` picks one of
several text fields. Ordinals are shown only where they are needed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

MAX_TEXT_CHARS = 40  # long paragraphs are never click targets; trim them to keep prompts short
MAX_ELEMENTS = 60  # social-media pages list up to 10 posts x 4 icons, plus Submit
# What `type` can write into: every text-like <input> is a textbox (a date field takes typed
# digits like any other), so the model learns one kind for all of them.
_TEXTBOX_TAGS = {f"input_{t}" for t in ("text", "password", "date", "time", "number", "email", "search", "tel", "url")}
_ICON_CLASSES = ("reply", "retweet", "like", "share", "more")  # social-media post controls
_MENU_ITEM_CLASSES = ("share", "copy", "embed", "menu-user", "block-user", "report")  # a post's "more" menu


@dataclass(frozen=True)
class Element:
    ref: int  # MiniWoB's element ref, used to act; never shown to the model
    kind: str  # one of actions.KINDS
    text: str
    nth: int | None = None  # shown ordinal (k-th element of this kind), only where text is ambiguous

    def render(self) -> str:
        return f'{self.kind} "{self.text}"' + (f" #{self.nth}" if self.nth else "")


@dataclass(frozen=True)
class Observation:
    utterance: str
    elements: tuple[Element, ...]


def _kind(tag: str, classes: str) -> str | None:
    cls = classes.split()
    if tag == "button":
        return "button"
    if tag == "a":
        return "tab" if "ui-tabs-anchor" in cls else "link"
    if tag == "span":
        if "alink" in cls:
            return "link"
        if "folder" in cls or "file" in cls:  # navigate-tree nodes
            return "folder" if "folder" in cls else "file"
        if cls and cls[0] in _ICON_CLASSES:  # a clicked one gains "active"
            return "icon"
    if tag == "h3" and "ui-accordion-header" in cls:
        return "section"
    if tag == "li" and ("ui-menu-item" in cls or (cls and cls[0] in _MENU_ITEM_CLASSES)):
        return "item"  # jQuery UI menus, autocomplete suggestions, a post's "more" menu
    if tag == "option":
        return "option"
    if tag in _TEXTBOX_TAGS:
        return "textbox"
    return {"textarea": "textarea", "input_radio": "radio", "input_checkbox": "checkbox"}.get(tag)


def _clean(text: str) -> str:
    return " ".join(text.split()).replace('"', "'")[:MAX_TEXT_CHARS]


def parse_observation(obs: dict[str, Any], ordinals: bool = True) -> Observation:
    """Extract actionable elements from a MiniWoB `dom_elements` observation.

    Radio buttons and checkboxes carry no text of their own: their label is the text node
    (negative ref) that follows them in document order. A social-media icon is named by its
    action and the author of its post. A closed `<select>` hides its options from MiniWoB's DOM
    dump; `obs["dropdowns"]` (added by WebEnv: select ref -> (option text, selected) pairs) lists them, and they
    act through the select's ref. `ordinals=False` keeps the listing the published default
    tasks were trained and evaluated on (no `#k`).
    """
    dom = list(obs["dom_elements"])
    dropdowns: dict[int, list[tuple[str, bool]]] = obs.get("dropdowns", {})
    elements: list[Element] = []
    user = ""
    for i, e in enumerate(dom):
        tag, ref = str(e["tag"]), int(e["ref"])
        if tag == "span" and str(e.get("classes", "")) == "username":
            user = str(e.get("text", ""))
        if tag == "select" and ref in dropdowns:
            options = dropdowns[ref]
            elements.append(Element(ref, "dropdown", _clean(next((t for t, chosen in options if chosen), ""))))
            elements += [Element(ref, "option", _clean(t)) for t, _ in options]
            continue
        kind = _kind(tag, str(e.get("classes", "")))
        if kind is None:
            continue
        if kind in ("textbox", "textarea"):
            text = str(e.get("value", "") or "")
        elif kind in ("radio", "checkbox"):
            nxt = dom[i + 1] if i + 1 < len(dom) else None
            text = str(nxt["text"]) if nxt is not None and int(nxt["ref"]) < 0 else ""
        elif kind == "icon":
            text = f"{str(e['classes']).split()[0]} {user}"
        elif kind in ("button", "item") and not e.get("text"):
            # the text sits in children: a menu item's wrapper div, a dialog close button's
            # hidden "Close" label
            text = _descendant_text(dom, i)
        else:
            text = str(e.get("text", ""))
        elements.append(Element(ref=ref, kind=kind, text=_clean(text)))
    elements = elements[:MAX_ELEMENTS]
    if ordinals:
        elements = _with_ordinals(elements)
    return Observation(utterance=str(obs["utterance"]), elements=tuple(elements))


def _descendant_text(dom: list[dict[str, Any]], i: int) -> str:
    """The texts inside element i: the run of entries after it (document order) below it."""
    inside, texts = {int(dom[i]["ref"])}, []
    for d in dom[i + 1 :]:
        if d.get("parent") not in inside:
            break
        inside.add(int(d["ref"]))
        if d.get("text"):
            texts.append(str(d["text"]))
    return " ".join(texts)


def _with_ordinals(elements: list[Element]) -> list[Element]:
    """Number the elements kind + text cannot name: duplicates, and text fields whenever a kind
    has several (`type` addresses a field by position, its text being what gets typed)."""
    same_text = Counter((e.kind, e.text) for e in elements)
    per_kind = Counter(e.kind for e in elements)
    seen: Counter = Counter()
    out = []
    for e in elements:
        seen[e.kind] += 1
        ambiguous = same_text[(e.kind, e.text)] > 1 or (e.kind in ("textbox", "textarea") and per_kind[e.kind] > 1)
        out.append(Element(e.ref, e.kind, e.text, seen[e.kind]) if ambiguous else e)
    return out


def render_prompt(observation: Observation, history: list[str] | tuple[str, ...] = ()) -> str:
    """The user-message text for one step. `history` holds the rendered earlier actions."""
    lines = [f"Task: {observation.utterance}", "Elements:"]
    lines += [f"{i}. {e.render()}" for i, e in enumerate(observation.elements, 1)]
    if history:
        lines.append("Done so far:")
        lines += [f"- {a}" for a in history]
    lines.append("Next action:")
    return "\n".join(lines)
