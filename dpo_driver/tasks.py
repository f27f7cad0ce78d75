"""The MiniWoB++ task suite and the three seed ranges (demos, rollouts, evaluation).

The ranges are disjoint *by construction*: each split owns a fixed band of seed values and a
split can never grow into the next band. `SeedPlan` asserts it anyway, so a config change can
never leak evaluation seeds into training data.
"""

from __future__ import annotations

from dataclasses import dataclass

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

BAND = 1_000_000  # seeds per split band
SPLIT_BANDS = {"demo": 0, "rollout": 1, "eval": 2}


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


def seeds_for(split: str, count: int, offset: int = 0) -> list[int]:
    """`count` seeds of one split, starting `offset` into that split's band."""
    if split not in SPLIT_BANDS:
        raise ValueError(f"unknown seed split {split!r}; expected one of {list(SPLIT_BANDS)}")
    if count < 0 or offset < 0 or offset + count > BAND:
        raise ValueError(f"{split} seeds: offset {offset} + count {count} must fit in [0, {BAND})")
    start = SPLIT_BANDS[split] * BAND + offset
    return list(range(start, start + count))


def split_of(seed: int) -> str:
    for name, band in SPLIT_BANDS.items():
        if band * BAND <= seed < (band + 1) * BAND:
            return name
    raise ValueError(f"seed {seed} belongs to no split band")


@dataclass(frozen=True)
class SeedPlan:
    demo: tuple[int, ...]
    rollout: tuple[int, ...]
    eval: tuple[int, ...]

    def __post_init__(self):
        sets = {"demo": set(self.demo), "rollout": set(self.rollout), "eval": set(self.eval)}
        assert not sets["eval"] & (sets["demo"] | sets["rollout"]), "evaluation seeds overlap training seeds"
        assert not sets["demo"] & sets["rollout"], "demo seeds overlap rollout seeds"

    @classmethod
    def build(cls, n_demo: int, n_rollout: int, n_eval: int, rollout_offset: int = 0,
              eval_offset: int = 0) -> "SeedPlan":
        # eval_offset gives a fresh held-out range, to confirm a preset tuned on the default one
        return cls(
            demo=tuple(seeds_for("demo", n_demo)),
            rollout=tuple(seeds_for("rollout", n_rollout, rollout_offset)),
            eval=tuple(seeds_for("eval", n_eval, eval_offset)),
        )
