"""The environment interface: the only thing the generic loop (demos, rollouts, pairs, gates,
evaluation, report) talks to.

A *family* (`Environment`) declares its tasks, per-task step limits, how completions parse, and
optionally an expert and candidate actions. `open(task)` gives a `Session`: one task, reused across
items; `reset(seed)` builds the item for that seed and returns its first observation and prompt
text; `step(completion)` applies the model's raw text and returns a `Transition`. Items are named
by integer seeds, and seeds live in disjoint demo / rollout / evaluation bands (dpo_driver.tasks),
so a family that derives each item deterministically from its seed inherits the split.

The conventions follow gymnasium's (`reset(seed=...)`, `step -> reward, done`, `close`), with text
in and text out; `GymnasiumEnvironment` adapts a text `gymnasium.Env`. Built-in families and user
classes are chosen by name (`load_environment("miniwob")`, `load_environment("pkg.mod:Class")`).
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from dpo_driver.constrained import AnswerSpace


class EnvCrashed(RuntimeError):
    """The environment's backend (a browser, a server) died mid-episode: an infrastructure fault,
    not a policy failure. The episode is recorded as crashed and never used as a rejected sample."""


@dataclass(frozen=True)
class Parsed:
    """A completion as the family reads it: the canonical action text, or why there is none."""

    action: str | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.action is not None


@dataclass
class Transition:
    """What one step did. `reward` is the family's graded reward for the episode (final when
    `done`); `success` is the family's success criterion; `valid` = the completion parsed and could
    be applied. Until `done`, `prompt`/`observation` describe the next state."""

    reward: float
    done: bool
    success: bool
    valid: bool
    prompt: str | None = None
    observation: Any = None
    info: dict = field(default_factory=dict)


class Session(ABC):
    """One task of a family; `reset(seed)` starts an episode on that seed's item."""

    task: str

    @abstractmethod
    def reset(self, seed: int) -> tuple[Any, str]:
        """(observation, prompt) of the item's first state."""

    @abstractmethod
    def step(self, completion: str) -> Transition:
        """Apply the model's raw completion. A malformed one ends the episode: valid=False, done=True."""

    def expert(self) -> str:
        """The expert's completion for the current state; ValueError when it sees no way on."""
        raise NotImplementedError(f"{type(self).__name__} has no expert: give demos (sft_adapter demos_path)")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Environment(ABC):
    """A family of tasks. Subclasses set the class attributes and implement `open`, `parse`."""

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]  # every supported task
    default_tasks: ClassVar[tuple[str, ...]] = ()  # the suite used when none is configured (empty = all)
    has_expert: ClassVar[bool] = False  # Session.expert() works: golden demos can be generated
    # What the format gate requires of every chosen/rejected completion (a Python regex, full match);
    # it must accept exactly what `parse` accepts, so families derive it from their one grammar.
    action_regex: ClassVar[str] = r"(?s).+"
    # The episode score's weight on the graded reward (pairs.ScoreWeights.reward) when the pairs
    # config leaves it unset: MiniWoB's reward decays with wall-clock time (0), SQL's is partial credit (1).
    reward_weight: ClassVar[float] = 0.0
    max_new_tokens: ClassVar[int] = 24  # answer length the family needs when a config leaves it unset
    multiline_answers: ClassVar[bool] = False  # an answer is the whole completion, not its first line
    # Episodes that may run at once, each in its own session, answered by one batched generate per
    # step (dpo_driver.batched). 0 = one session per task, one episode at a time (MiniWoB: browsers).
    batch_sessions: ClassVar[int] = 0

    @abstractmethod
    def open(self, task: str) -> Session:
        """A session on `task` (already validated by `check_tasks`)."""

    @abstractmethod
    def parse(self, completion: str) -> Parsed:
        """The canonical action of a completion, or the reason it is malformed."""

    def max_steps(self, task: str) -> int:
        return 1

    def prefixes(self, observation: Any) -> tuple[str, ...]:
        """Answer starts that exploration forces, one sample group each (MiniWoB: the verbs a page
        allows). Empty = plain sampling."""
        return ()

    def candidates(self, observation: Any) -> list[str]:
        """Every action worth trying in this state (exploration, and the random baseline)."""
        return []

    def answer_space(self, observation: Any) -> AnswerSpace | None:
        """The answers this state accepts, for constrained decoding (Sampling.constrained); None =
        free decoding. It should accept exactly what `parse` accepts and the state can act on."""
        return None

    def decontamination_text(self, prompt: str) -> str:
        """The part of a prompt that decontamination compares with held-out prompts."""
        return prompt

    def suite(self, tasks: list[str] | tuple[str, ...] | None) -> list[str]:
        """The tasks to run: `tasks` validated, or the family's default suite when empty."""
        tasks = list(tasks or self.default_tasks or self.tasks)
        for t in tasks:
            if t not in self.tasks:
                raise ValueError(f"unknown {self.name} task {t!r}: supported tasks are {', '.join(self.tasks)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task suite lists a task twice: {tasks}")
        return tasks

    def describe(self) -> dict:
        return {"family": self.name, "class": f"{type(self).__module__}:{type(self).__qualname__}"}


# Built-in families by name; anything else is `package.module:Class`.
BUILTIN = {
    "miniwob": "dpo_driver.families.miniwob:MiniWoB",
    "tooluse": "dpo_driver.families.tooluse:ToolUse",
    "sql": "dpo_driver.families.sql:TextToSQL",
}
REQUIRED = ("open", "parse")


def environment_class(spec: str) -> type[Environment]:
    """The class `spec` names (a built-in family or `package.module:Class`), checked for the interface."""
    path = BUILTIN.get(spec, spec)
    if ":" not in path:
        raise ValueError(f"unknown environment {spec!r}: use a built-in family ({', '.join(BUILTIN)}) or 'package.module:Class'")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"environment {spec!r}: cannot import module {module_name!r} ({e})") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"environment {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not inspect.isclass(cls):
        raise ValueError(f"environment {spec!r}: {attr!r} is not a class")
    missing = [m for m in REQUIRED if not callable(getattr(cls, m, None)) or getattr(getattr(cls, m), "__isabstractmethod__", False)]
    missing += [a for a in ("name", "tasks") if not hasattr(cls, a)]
    if missing:
        raise ValueError(f"environment {spec!r}: class {cls.__name__} lacks {', '.join(missing)} of the Environment interface "
                         f"(dpo_driver.environment.Environment)")
    return cls


def load_environment(spec: str = "miniwob", **options) -> Environment:
    """An instance of the family `spec` names, built with `options` (e.g. MiniWoB's browser paths)."""
    cls = environment_class(spec)
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"environment {spec!r}: options {sorted(options)} do not fit {cls.__name__}: {e}") from e


class _GymSession(Session):
    def __init__(self, env_fn, task: str, prompt_of):
        self.task, self._env, self._prompt_of = task, env_fn(task), prompt_of

    def reset(self, seed: int):
        obs, _ = self._env.reset(seed=seed)
        return obs, self._prompt_of(obs)

    def step(self, completion: str) -> Transition:
        obs, reward, terminated, truncated, info = self._env.step(completion)
        done = bool(terminated or truncated)
        return Transition(reward=float(reward), done=done, success=bool(info.get("success", reward >= 1.0)) if done else False,
                          valid=bool(info.get("valid", True)), prompt=None if done else self._prompt_of(obs),
                          observation=None if done else obs, info=dict(info))

    def close(self):
        self._env.close()


class GymnasiumEnvironment(Environment):
    """Adapter for a text-in/text-out `gymnasium.Env`: observations are (or render to) the prompt,
    actions are the completion string; `info["success"]` and `info["valid"]` are read when present
    (else success = reward >= 1, valid = True). Subclass and set `make(task)`; parse accepts any text."""

    name = "gymnasium"
    tasks: ClassVar[tuple[str, ...]] = ()

    def make(self, task: str):
        raise NotImplementedError

    def prompt_of(self, observation) -> str:
        return str(observation)

    def open(self, task: str) -> Session:
        return _GymSession(self.make, task, self.prompt_of)

    def parse(self, completion: str) -> Parsed:
        text = completion.strip()
        return Parsed(text) if text else Parsed(None, "empty completion")
