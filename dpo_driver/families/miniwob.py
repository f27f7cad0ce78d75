"""MiniWoB++ as an environment family: real pages in headless Chromium (dpo_driver.env), observed
as listed elements (observation.py), acted on in the kind + text language (actions.py), solved by
scripted experts that read MiniWoB's task `fields` (experts.py).
"""

from __future__ import annotations

from typing import ClassVar

from dpo_driver.actions import ACTION_REGEX, answer_space, candidate_actions, parse_action, verbs_for
from dpo_driver.constrained import AnswerSpace
from dpo_driver.env import WebEnv, find_browser
from dpo_driver.environment import Environment, Parsed, Session, Transition
from dpo_driver.experts import expert_action
from dpo_driver.observation import Observation, render_prompt

# Single-step clicks plus one multi-step task (enter-text: type, then click Submit). click-tab is
# supported but not default: five demos already solve it (100%), so it cannot show improvement.
DEFAULT_TASKS = ("click-button", "click-link", "click-widget", "enter-text")
# Every task whose scripted expert solves >= 95% of demo seeds (benchmarks/experts.py, 100
# seeds each), with its step limit: the expert's longest episode there plus slack, so a policy
# gets room for one or two detours but a looping one is cut off (slack: max(2, longest // 2)).
# use-autocomplete has an expert but is not supported: 84%, suggestions sometimes render late.
STEP_LIMITS = {
    "click-button": 3, "click-link": 3, "click-tab": 3, "click-widget": 3, "enter-text": 4,
    "enter-text-dynamic": 4, "enter-text-2": 4, "enter-date": 4, "enter-time": 4, "enter-password": 5,
    "click-option": 4, "click-test": 3, "click-test-2": 3, "click-test-transfer": 3,
    "unicode-test": 3, "click-button-sequence": 4, "click-checkboxes": 9,
    "click-checkboxes-large": 19, "click-checkboxes-transfer": 6, "click-collapsible": 4,
    "click-collapsible-2": 6, "click-dialog": 3, "click-dialog-2": 3, "click-tab-2": 6,
    "click-tab-2-easy": 3, "click-tab-2-medium": 4, "click-tab-2-hard": 10, "focus-text": 3,
    "focus-text-2": 3, "login-user": 5, "login-user-popup": 7, "form-sequence-2": 5,
    "choose-list": 4, "click-scroll-list": 5, "navigate-tree": 7, "social-media": 4,
    "social-media-all": 13, "social-media-some": 13, "search-engine": 6,
}
SUPPORTED_TASKS = tuple(STEP_LIMITS)

# Tasks whose observation listing stays exactly as published (no `#k` ordinals): the default
# suite's SFT/DPO result was measured on these prompts. click-button pages often hold two
# empty textboxes or two same-named buttons that the task never needs told apart.
FROZEN_LISTING_TASKS = DEFAULT_TASKS



def check_tasks(tasks: list[str] | tuple[str, ...]) -> list[str]:
    """Validate task names; raise naming the bad one and the supported set."""
    if not tasks:
        raise ValueError("task suite is empty: name at least one MiniWoB++ task, e.g. click-button")
    for t in tasks:
        if t not in SUPPORTED_TASKS:
            raise ValueError(
                f"unknown task {t!r}: supported tasks are {', '.join(SUPPORTED_TASKS)} "
                "(each needs a scripted expert for golden demos)"
            )
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task suite lists a task twice: {list(tasks)}")
    return list(tasks)


def max_steps_for(task: str) -> int:
    """Steps an episode of `task` may take before it is cut off as a failure."""
    if task not in STEP_LIMITS:
        raise ValueError(f"no step limit for unsupported task {task!r}")
    return STEP_LIMITS[task]


class MiniWoBSession(Session):
    """One task in one browser; the prompt carries the page and the actions taken so far."""

    def __init__(self, task: str, chrome_binary: str, chromedriver: str):
        self.task = task
        self.web = WebEnv(task, chrome_binary, chromedriver)
        self._obs: Observation | None = None
        self._fields: dict[str, str] = {}  # the task's spec (MiniWoB `fields`), fixed for the episode
        self._history: list[str] = []

    def reset(self, seed: int) -> tuple[Observation, str]:
        self._obs, self._fields = self.web.reset(seed)
        self._history = []
        return self._obs, render_prompt(self._obs)

    def step(self, completion: str) -> Transition:
        action = parse_action(completion)
        r = self.web.step(action)
        info = {"raw_reward": r.raw_reward}
        if r.done:
            return Transition(reward=r.reward, done=True, success=r.raw_reward >= 1.0, valid=r.valid, info=info)
        self._history.append(action.render())
        self._obs = r.observation
        return Transition(reward=r.reward, done=False, success=False, valid=True,
                          prompt=render_prompt(self._obs, self._history), observation=self._obs, info=info)

    def expert(self) -> str:
        return expert_action(self.task, self._fields, self._obs, self._history).render()

    def close(self) -> None:
        self.web.close()


class MiniWoB(Environment):
    name = "miniwob"
    tasks: ClassVar[tuple[str, ...]] = SUPPORTED_TASKS
    default_tasks: ClassVar[tuple[str, ...]] = DEFAULT_TASKS
    has_expert = True
    action_regex = ACTION_REGEX
    reward_weight = 0.0  # MiniWoB's reward decays with wall-clock time: same-seed reruns would pick different pairs

    def __init__(self, chrome_binary: str = "", chromedriver: str = ""):
        # Found now, so a missing browser fails before any stage writes output.
        self.chrome_binary, self.chromedriver = find_browser(chrome_binary or None, chromedriver or None)

    def open(self, task: str) -> MiniWoBSession:
        return MiniWoBSession(task, self.chrome_binary, self.chromedriver)

    @staticmethod  # no browser needed: pairs and gates parse without one
    def parse(completion: str) -> Parsed:
        action = parse_action(completion)
        if action is None:
            return Parsed(None, f"{completion.strip()[:60]!r} is not an action; expected e.g. click button \"okay\" or type textbox \"hello\"")
        return Parsed(action.render())

    def max_steps(self, task: str) -> int:
        return max_steps_for(task)

    def prefixes(self, observation: Observation) -> tuple[str, ...]:
        return verbs_for(observation.elements)

    def candidates(self, observation: Observation) -> list[str]:
        return [a.render() for a in candidate_actions(observation.utterance, observation.elements)]

    def answer_space(self, observation: Observation) -> AnswerSpace:
        return answer_space(observation.elements)

    def suite(self, tasks):
        return check_tasks(list(tasks or self.default_tasks))
