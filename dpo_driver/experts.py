"""Scripted expert policies: they produce the golden demonstrations on training seeds.

Each expert reads the task's structured `fields` (what MiniWoB says the goal is) and the
parsed elements, and answers in the same action language the model learns.
"""

from __future__ import annotations

from dpo_driver.actions import Action
from dpo_driver.observation import Observation

_WIDGET_KIND = {"button": "button", "radio": "radio", "checkbox": "checkbox", "text": "textbox", "textarea": "textarea"}


def expert_action(task: str, fields: dict[str, str], obs: Observation, history: list[str]) -> Action:
    """The expert's next action, or ValueError when the page offers no way to do the task."""
    target = fields.get("target", "")
    if task == "click-button":
        return Action("click", "button", target)
    if task == "click-link":
        return Action("click", "link", target)
    if task == "click-tab":
        return Action("click", "tab", f"Tab #{target}")
    if task == "click-widget":
        kind = _WIDGET_KIND[target]
        first = next((e for e in obs.elements if e.kind == kind), None)
        if first is None:
            raise ValueError(f"click-widget: no {kind} on the page")
        return Action("click", kind, first.text)
    if task == "enter-text":
        return Action("type", "textbox", target) if not history else Action("click", "button", "Submit")
    if task == "click-option":
        return Action("click", "radio", target) if not history else Action("click", "button", "Submit")
    raise ValueError(f"no scripted expert for task {task!r}")
