"""Scripted expert policies: they produce the golden demonstrations on training seeds.

Each expert reads the task's structured `fields` (what MiniWoB says the goal is), the parsed
elements and the history of its earlier actions, and answers in the same action language the
model learns. An expert is stateless: everything it needs to continue an episode is on the
page or in the history, so it can take over an episode midway (as exploration does).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from dpo_driver.actions import Action
from dpo_driver.observation import Element, Observation

_WIDGET_KIND = {"button": "button", "radio": "radio", "checkbox": "checkbox", "text": "textbox", "textarea": "textarea"}

Expert = Callable[[dict[str, str], Observation, list[str]], Action]


def _named(e: Element, verb: str = "click") -> Action:
    """The action that names element `e` the way the listing shows it."""
    return Action(verb, e.kind, e.text, e.nth)


def _nth(obs: Observation, kind: str, k: int) -> Element:
    """The k-th (1-based) listed element of a kind, named with its listed ordinal."""
    of_kind = [e for e in obs.elements if e.kind == kind]
    if not 1 <= k <= len(of_kind):
        raise ValueError(f"no {kind} #{k} on the page ({len(of_kind)} listed)")
    return of_kind[k - 1]


def _type_nth(obs: Observation, k: int, text: str, kind: str = "textbox") -> Action:
    e = _nth(obs, kind, k)
    return Action("type", kind, text, e.nth)


def _find(obs: Observation, kind: str, text: str) -> Element | None:
    return next((e for e in obs.elements if e.kind == kind and e.text == text), None)


def _click_text(obs: Observation, kind: str, text: str) -> Action:
    e = _find(obs, kind, text)
    if e is None:
        raise ValueError(f"no {kind} {text!r} on the page")
    return _named(e)


def _targets(fields: dict[str, str]) -> list[str]:
    return [v for k, v in fields.items() if k.startswith("target ")]


def _sequence(steps: list[Callable[[], Action]], history: list[str]) -> Action:
    """Play a fixed script: the step after the ones already taken."""
    if len(history) >= len(steps):
        raise ValueError(f"the script has {len(steps)} steps and all were played")
    return steps[len(history)]()


# ---- one expert per task -------------------------------------------------------------

def _click_widget(fields, obs, history):
    kind = _WIDGET_KIND[fields["target"]]
    first = next((e for e in obs.elements if e.kind == kind), None)
    if first is None:
        raise ValueError(f"click-widget: no {kind} on the page")
    return Action("click", kind, first.text)


def _type_then_submit(text_of: Callable[[dict[str, str]], str]) -> Expert:
    def expert(fields, obs, history):
        return _sequence([lambda: Action("type", "textbox", text_of(fields)), lambda: Action("click", "button", "Submit")], history)
    return expert


def _checkboxes(fields, obs, history):
    """Tick each target label, then Submit."""
    targets = _targets(fields)
    if len(history) < len(targets):
        return _click_text(obs, "checkbox", targets[len(history)])
    return Action("click", "button", "Submit")


def _scroll_list(fields, obs, history):
    targets = [t.strip() for t in fields["target"].split(",")]
    if len(history) < len(targets):
        return _named(_find_or_fail(obs, "option", targets[len(history)]), "select")
    return Action("click", "button", "Submit")


def _find_or_fail(obs, kind, text):
    e = _find(obs, kind, text)
    if e is None:
        raise ValueError(f"no {kind} {text!r} on the page")
    return e


def _explore_then_click(opener_kind: str, kind: str) -> Expert:
    """Open the containers (tabs, sections) one by one until the target shows, then click it."""
    def expert(fields, obs, history):
        target = _find(obs, kind, fields["target"])
        if target is not None:
            return _named(target)
        opened = set(history)
        for e in obs.elements:
            if e.kind == opener_kind and _named(e).render() not in opened:
                return _named(e)
        raise ValueError(f"{fields['target']!r} is in no {opener_kind}")
    return expert


def _collapsible(fields, obs, history):
    if not history:
        return _named(next(e for e in obs.elements if e.kind == "section"))
    return Action("click", "button", "Submit")


def _navigate_tree(fields, obs, history):
    """Open folders until the named node shows (it may itself be a folder), then click it."""
    target = fields["target"]
    for kind in ("file", "folder"):
        e = _find(obs, kind, target)
        if e is not None and _named(e).render() not in history:
            return _named(e)
    opened = set(history)
    for e in obs.elements:
        if e.kind == "folder" and _named(e).render() not in opened:
            return _named(e)
    raise ValueError(f"navigate-tree: {target!r} is in no folder")


def _focus_text_2(fields, obs, history):
    return _named(_nth(obs, "textbox", int(fields["target"])))


def _form_sequence_2(fields, obs, history):
    return _sequence([
        lambda: _named(_nth(obs, "radio", int(fields["radio target"]))),
        lambda: _type_nth(obs, int(fields["textbox target"]), fields["textbox text"]),
        lambda: Action("click", "button", "Submit"),
    ], history)


def _login(fields, obs, history):
    """Fill username and password, then submit; dismiss a popup (its Cancel) if one opens."""
    if _find(obs, "button", "Cancel") is not None:
        return Action("click", "button", "Cancel")
    user, password = _nth(obs, "textbox", 1), _nth(obs, "textbox", 2)
    if user.text != fields["username"]:
        return _type_nth(obs, 1, fields["username"])
    if password.text != fields["password"]:
        return _type_nth(obs, 2, fields["password"])
    return _named(next(e for e in obs.elements if e.kind == "button"))


def _enter_password(fields, obs, history):
    return _sequence([
        lambda: _type_nth(obs, 1, fields["target"]),
        lambda: _type_nth(obs, 2, fields["target"]),
        lambda: Action("click", "button", "Submit"),
    ], history)


def _choose_list(fields, obs, history):
    if not history:
        return _named(_find_or_fail(obs, "option", fields["target"]), "select")
    return Action("click", "button", "Submit")


def _social_media(fields, obs, history):
    """A reply/retweet/like is an icon of the post; the rest sit in its "more" menu."""
    user, button = fields["user"], fields["button"]
    icon = _find(obs, "icon", f"{button.lower()} {user}")
    if icon is not None:
        return _named(icon)
    item = next((e for e in obs.elements if e.kind == "item" and e.text in (button, f"{button} {user}")), None)
    if item is not None:
        return _named(item)
    return _named(_find_or_fail(obs, "icon", f"more {user}"))


def _social_media_many(all_posts: bool) -> Expert:
    def expert(fields, obs, history):
        icons = [e for e in obs.elements if e.kind == "icon" and e.text == f"{fields['button'].lower()} {fields['user']}"]
        want = len(icons) if all_posts else int(fields["amount"])
        if len(history) < want:
            return _named(icons[len(history)])
        return Action("click", "button", "Submit")
    return expert


def _use_autocomplete(fields, obs, history):
    if not history:
        return Action("type", "textbox", fields["start"])
    end = fields.get("end", "")  # some problems constrain only the start
    items = [e for e in obs.elements if e.kind == "item" and e.text.startswith(fields["start"]) and e.text.endswith(end)]
    if items and len(history) == 1:
        return _named(items[0])
    return Action("click", "button", "Submit")


def _search_engine(fields, obs, history):
    """Search, then page through the results (3 per page) to the rank-th one."""
    if not history:
        return Action("type", "textbox", fields["query"])
    if len(history) == 1:
        return Action("click", "button", "Search")
    rank = int(fields["rank"])
    page = (rank - 1) // 3 + 1
    if len(history) == 2 and page > 1:
        return _click_text(obs, "link", str(page))
    results = [e for e in obs.elements if e.kind == "link" and not re.fullmatch(r"\d+|<|>|Prev|Next|«|»", e.text)]
    return _named(results[(rank - 1) % 3])


EXPERTS: dict[str, Expert] = {
    "click-button": lambda f, o, h: Action("click", "button", f["target"]),
    "click-link": lambda f, o, h: Action("click", "link", f["target"]),
    "click-tab": lambda f, o, h: Action("click", "tab", f"Tab #{f['target']}"),
    "click-widget": _click_widget,
    "enter-text": _type_then_submit(lambda f: f["target"]),
    "enter-text-dynamic": _type_then_submit(lambda f: f["target"]),
    "enter-text-2": _type_then_submit(lambda f: f["text"].upper() if f["case"] == "upper" else f["text"].lower()),
    "enter-date": _type_then_submit(lambda f: f["target"]),
    # Chrome's time field waits for a second hour digit after a lone "1" (10-12?): pad it
    "enter-time": _type_then_submit(lambda f: f["target"].zfill(len("00:00PM"))),
    "enter-password": _enter_password,
    "click-option": lambda f, o, h: Action("click", "radio", f["target"]) if not h else Action("click", "button", "Submit"),
    "click-test": lambda f, o, h: _named(next(e for e in o.elements if e.kind == "button")),
    "click-test-2": lambda f, o, h: Action("click", "button", f["target"]),
    "click-test-transfer": lambda f, o, h: Action("click", "button", f["target"]),
    "unicode-test": lambda f, o, h: Action("click", "button", f["target"]),
    "click-button-sequence": lambda f, o, h: Action("click", "button", "ONE" if not h else "TWO"),
    "click-checkboxes": _checkboxes,
    "click-checkboxes-large": _checkboxes,
    "click-checkboxes-transfer": _checkboxes,
    "click-collapsible": _collapsible,
    "click-collapsible-2": _explore_then_click("section", "link"),
    "click-dialog": lambda f, o, h: Action("click", "button", "Close"),
    "click-dialog-2": lambda f, o, h: Action("click", "button", "Close" if f["target"] == "x" else f["target"]),
    "click-tab-2": _explore_then_click("tab", "link"),
    "click-tab-2-easy": _explore_then_click("tab", "link"),
    "click-tab-2-medium": _explore_then_click("tab", "link"),
    "click-tab-2-hard": _explore_then_click("tab", "link"),
    "focus-text": lambda f, o, h: _named(next(e for e in o.elements if e.kind == "textbox")),
    "focus-text-2": _focus_text_2,
    "login-user": _login,
    "login-user-popup": _login,
    "form-sequence-2": _form_sequence_2,
    "choose-list": _choose_list,
    "click-scroll-list": _scroll_list,
    "navigate-tree": _navigate_tree,
    "social-media": _social_media,
    "social-media-all": _social_media_many(all_posts=True),
    "social-media-some": _social_media_many(all_posts=False),
    "use-autocomplete": _use_autocomplete,
    "search-engine": _search_engine,
}


def expert_action(task: str, fields: dict[str, str], obs: Observation, history: list[str]) -> Action:
    """The expert's next action, or ValueError when the page offers no way to do the task."""
    if task not in EXPERTS:
        raise ValueError(f"no scripted expert for task {task!r}")
    return EXPERTS[task](fields, obs, history)
