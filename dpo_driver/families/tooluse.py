"""Tool use as an environment family: questions answered by calling tools, one JSON action a step.

Every answer is two lines, `Thought: <text>` then `Action: {"tool": ..., "args": {...}}` (the
"Thought -> Action" format of meta-agentic-dpo). Each tool's arguments are checked against a
strict pydantic schema: malformed JSON, an unknown tool or a wrong argument ends the episode as
invalid. A valid call runs the tool (pure Python, deterministic) and its result joins the history
in the next prompt; `final_answer` ends the episode, a success iff the answer equals the gold one.

Items are drawn offline from (task, seed). Each carries its own small lookup table, drawn from the
seed too, so a fact cannot be memorised across items: answers are copied from tool results (and
numbers from the question), which a 135M model can learn, rather than computed in its head.
A scripted solver, which follows the item's plan, is the expert.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from dataclasses import dataclass
from itertools import permutations
from typing import Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dpo_driver.constrained import AnswerSpace, Slot
from dpo_driver.environment import Environment, Parsed, Session, Transition

# --- the answer grammar: one definition, shared by parse, the format gate and the expert ---------

THOUGHT, ACTION = "Thought: ", "Action: "
# Text-level shape only (the gate's full match on a stripped completion): a non-empty one-line
# thought, then one line holding a JSON object. JSON validity and the tool schemas are parse's.
ACTION_REGEX = rf"\A{re.escape(THOUGHT)}(\S[^\n]*)\n{re.escape(ACTION)}(\{{[^\n]*\}})\Z"
_ACTION_RE = re.compile(ACTION_REGEX)
INSTRUCTION = "Answer with Thought: ... then Action: {json}."

# --- tools ---------------------------------------------------------------------------------------

FIELDS = ("population", "founded", "country", "festival")  # the lookup table's columns
FIELD_WORDS = {"population": "population", "founded": "founding year", "country": "country", "festival": "festival date"}
OPS = ("+", "-", "*", "/")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")  # not strftime: locale-free


class _Args(BaseModel):
    # strict: "28" is not 28, 3.0 is not 3; extra="forbid": an invented argument is a wrong call
    model_config = ConfigDict(strict=True, extra="forbid")


class CalculatorArgs(_Args):
    a: int
    op: Literal[OPS]
    b: int


class DateArgs(_Args):
    date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    days: int


class LookupArgs(_Args):
    entity: str
    field: Literal[FIELDS]


class AnswerArgs(_Args):
    answer: str


Table = dict[str, dict[str, str]]  # entity -> field -> value: the item's lookup data


def _calculate(x: CalculatorArgs, table: Table) -> str:
    if max(abs(x.a), abs(x.b)) > 10**15:  # keeps float division and str() of the result in range
        return "error: number too large"
    if x.op == "/":
        if x.b == 0:
            return "error: division by zero"
        return str(x.a // x.b) if x.a % x.b == 0 else str(round(x.a / x.b, 4))
    return str({"+": x.a + x.b, "-": x.a - x.b, "*": x.a * x.b}[x.op])


def _shift_date(x: DateArgs, table: Table) -> str:
    try:
        d = dt.date.fromisoformat(x.date) + dt.timedelta(days=x.days)
    except ValueError:
        return f"error: invalid date {x.date}"
    except OverflowError:
        return "error: date out of range"
    return f"{d.isoformat()} {WEEKDAYS[d.weekday()]}"


def _lookup(x: LookupArgs, table: Table) -> str:
    row = table.get(x.entity)
    return row[x.field] if row else f"error: no entry for {x.entity}"


@dataclass(frozen=True)
class Tool:
    args: type[_Args]
    run: Callable[[_Args, Table], str] | None  # None: final_answer, which ends the episode


TOOLS = {
    "calculator": Tool(CalculatorArgs, _calculate),
    "date": Tool(DateArgs, _shift_date),
    "lookup": Tool(LookupArgs, _lookup),
    "final_answer": Tool(AnswerArgs, None),
}
TOOLS_LINE = "Tools: " + "; ".join(f"{name}({', '.join(t.args.model_fields)})" for name, t in TOOLS.items())


@dataclass(frozen=True)
class Call:
    """A parsed, schema-valid answer."""

    thought: str
    tool: str
    args: _Args

    @property
    def action(self) -> str:
        # tool first, arguments in schema order, compact: the canonical form, and the expert's
        return json.dumps({"tool": self.tool, "args": self.args.model_dump()}, separators=(",", ":"), ensure_ascii=False)

    @property
    def text(self) -> str:
        return f"{THOUGHT}{self.thought}\n{ACTION}{self.action}"


def read(completion: str) -> Call | str:
    """The completion as a Call, or why it is malformed."""
    m = _ACTION_RE.match(completion.strip())
    if not m:
        return f"not in the format {THOUGHT.strip()} ... / {ACTION.strip()} {{json}} on two lines"
    try:
        obj = json.loads(m.group(2))
    except ValueError as e:
        return f"malformed JSON: {e}"
    if not isinstance(obj, dict) or set(obj) != {"tool", "args"} or not isinstance(obj["args"], dict):
        return 'the action must be {"tool": name, "args": {...}}'
    tool = TOOLS.get(obj["tool"]) if isinstance(obj["tool"], str) else None
    if tool is None:
        return f"unknown tool {obj['tool']!r}: tools are {', '.join(TOOLS)}"
    try:
        args = tool.args.model_validate(obj["args"])
    except ValidationError as e:
        return f"bad arguments for {obj['tool']}: " + "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    return Call(m.group(1).strip(), obj["tool"], args)


def thought_for(tool: str, args: dict) -> str:
    """The expert's thought before an action: short and templated, so that it can be imitated."""
    if tool == "calculator":
        return f"I need to compute {args['a']} {args['op']} {args['b']}."
    if tool == "date":
        return f"I need the date {abs(args['days'])} days {'after' if args['days'] >= 0 else 'before'} {args['date']}."
    if tool == "lookup":
        return f"I need the {FIELD_WORDS[args['field']]} of {args['entity']}."
    return "I know the answer."


def render(tool: str, args: dict) -> str:
    """An action as a completion in the grammar, thought included (validated, so always parseable)."""
    return Call(thought_for(tool, args), tool, TOOLS[tool].args.model_validate(args)).text


# --- items ---------------------------------------------------------------------------------------

_PREFIXES = ("Ar", "Bel", "Cor", "Dun", "El", "Fen", "Gal", "Hol", "Ist", "Jor", "Kel", "Lun",
             "Mor", "Nes", "Or", "Pel", "Quin", "Ros", "Sab", "Tam", "Ul", "Var", "Wen", "Yar")
_SUFFIXES = ("den", "mont", "wick", "ford", "holt", "mere", "vale", "stead", "by", "ton", "gate", "moor")
TOWNS = tuple(p + s for p in _PREFIXES for s in _SUFFIXES)  # fictional, 288 of them
COUNTRIES = ("Aldoria", "Brevia", "Corvania", "Dremor", "Estival", "Galmar", "Hestia", "Norrin")


@dataclass(frozen=True)
class Item:
    """One question, its gold answer, and the expert's plan (tool, args) to reach it. `numbers`,
    `dates`, `days` and `entities` are what the question mentions, for candidate actions."""

    question: str
    gold: str
    plan: tuple[tuple[str, dict], ...]
    table: Table
    numbers: tuple[int, ...] = ()
    dates: tuple[str, ...] = ()
    days: tuple[int, ...] = ()
    entities: tuple[str, ...] = ()


def _towns(rng: random.Random, k: int) -> tuple[list[str], Table]:
    names = rng.sample(TOWNS, k)
    table = {n: {"population": str(rng.randint(100, 9999)), "founded": str(rng.randint(1100, 1990)),
                 "country": rng.choice(COUNTRIES),
                 "festival": (dt.date(2025, 1, 1) + dt.timedelta(days=rng.randrange(365))).isoformat()}
             for n in names}
    return names, table


def _answer(gold: str) -> tuple[str, dict]:
    return "final_answer", {"answer": gold}


def _calculator_item(rng: random.Random) -> Item:
    op = rng.choice(OPS)
    b = rng.randint(2, 99)
    a = b * rng.randint(2, 99) if op == "/" else rng.randint(b + 1, 999)  # exact quotients, positive differences
    # The second phrasing of "-" names b first: the order must come from the meaning, not the position.
    phrasing = rng.choice({"+": ("What is {a} plus {b}?", "Add {a} and {b}."),
                           "-": ("What is {a} minus {b}?", "Subtract {b} from {a}."),
                           "*": ("What is {a} times {b}?", "Multiply {a} by {b}."),
                           "/": ("What is {a} divided by {b}?", "Divide {a} by {b}.")}[op])
    call = {"a": a, "op": op, "b": b}
    gold = _calculate(CalculatorArgs(**call), {})
    return Item(phrasing.format(a=a, b=b), gold, (("calculator", call), _answer(gold)), {}, numbers=(a, b))


def _date_question(rng: random.Random, n: int, start: str) -> tuple[str, str, int]:
    """(question asking for the weekday or the date n days after/before `start`, what it asks, signed days)."""
    after = rng.random() < 0.5
    want = rng.choice(("weekday", "date"))
    return f"What {want} is {n} days {'after' if after else 'before'} {start}?", want, n if after else -n


def _dated(result: str, want: str) -> str:
    day, weekday = result.split()
    return weekday if want == "weekday" else day


def _calendar_item(rng: random.Random) -> Item:
    start = (dt.date(2020, 1, 1) + dt.timedelta(days=rng.randrange(3653))).isoformat()
    n = rng.randint(2, 200)
    question, want, days = _date_question(rng, n, start)
    call = {"date": start, "days": days}
    gold = _dated(_shift_date(DateArgs(**call), {}), want)
    return Item(question, gold, (("date", call), _answer(gold)), {}, dates=(start,), days=(n, -n))


_FIELD_QUESTIONS = {"population": "What is the population of {e}?", "founded": "In what year was {e} founded?",
                    "country": "Which country is {e} in?", "festival": "On what date is the {e} festival?"}


def _lookup_item(rng: random.Random) -> Item:
    (e,), table = _towns(rng, 1)
    f = rng.choice(FIELDS)
    call = {"entity": e, "field": f}
    return Item(_FIELD_QUESTIONS[f].format(e=e), table[e][f], (("lookup", call), _answer(table[e][f])), table, entities=(e,))


def _lookup_calc_item(rng: random.Random) -> Item:
    """Two lookups, then the calculator on their results."""
    (a, b), table = _towns(rng, 2)
    kind = rng.choice(("more", "combined", "before"))
    f = "founded" if kind == "before" else "population"
    x, y = int(table[a][f]), int(table[b][f])
    if (kind == "more" and x <= y) or (kind == "before" and x >= y):  # the question names the larger (older) first
        a, b, x, y = b, a, y, x
    if x == y and kind != "combined":  # a tie has no "more" or "before": nudge the first town
        x += 1 if kind == "more" else -1
        table[a][f] = str(x)
    question, call = {
        "more": (f"How many more people live in {a} than in {b}?", {"a": x, "op": "-", "b": y}),
        "combined": (f"What is the combined population of {a} and {b}?", {"a": x, "op": "+", "b": y}),
        "before": (f"How many years before {b} was {a} founded?", {"a": y, "op": "-", "b": x}),
    }[kind]
    gold = _calculate(CalculatorArgs(**call), table)
    plan = (("lookup", {"entity": a, "field": f}), ("lookup", {"entity": b, "field": f}), ("calculator", call), _answer(gold))
    return Item(question, gold, plan, table, entities=(a, b))


def _lookup_date_item(rng: random.Random) -> Item:
    """A lookup (a town's festival date), then the date tool on its result."""
    (e,), table = _towns(rng, 1)
    n = rng.randint(2, 200)
    question, want, days = _date_question(rng, n, f"the {e} festival")
    call = {"date": table[e]["festival"], "days": days}
    gold = _dated(_shift_date(DateArgs(**call), table), want)
    return Item(question, gold, (("lookup", {"entity": e, "field": "festival"}), ("date", call), _answer(gold)),
                table, days=(n, -n), entities=(e,))


# task -> (item builder, step limit: the expert's episode length plus slack for one or two detours)
TASKS: dict[str, tuple[Callable[[random.Random], Item], int]] = {
    "calculator": (_calculator_item, 3),
    "calendar": (_calendar_item, 3),
    "lookup": (_lookup_item, 3),
    "lookup-calc": (_lookup_calc_item, 6),
    "lookup-date": (_lookup_date_item, 5),
}


def build_item(task: str, seed: int) -> Item:
    # a string seed is hashed with SHA-512 by random.Random: stable across runs (hash() is not)
    return TASKS[task][0](random.Random(f"{task}:{seed}"))


# --- sessions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """An observation: the item and the (action JSON, result) steps taken so far."""

    task: str
    seed: int
    item: Item
    history: tuple[tuple[str, str], ...] = ()


def prompt_of(state: State) -> str:
    steps = [f"{ACTION}{action}\nResult: {result}" for action, result in state.history]
    return "\n".join([TOOLS_LINE, f"Question: {state.item.question}", *steps, INSTRUCTION])


class ToolUseSession(Session):
    def __init__(self, task: str):
        self.task = task
        self._state: State | None = None
        self._done = True

    def reset(self, seed: int) -> tuple[State, str]:
        self._state, self._done = State(self.task, seed, build_item(self.task, seed)), False
        return self._state, prompt_of(self._state)

    def step(self, completion: str) -> Transition:
        if self._state is None or self._done:
            raise RuntimeError("step() needs an episode in progress: call reset(seed) first")
        call = read(completion)
        if isinstance(call, str):
            self._done = True
            return Transition(reward=-1.0, done=True, success=False, valid=False, info={"error": call})
        item = self._state.item
        if call.tool == "final_answer":
            self._done = True
            success = call.args.answer.strip() == item.gold
            return Transition(reward=1.0 if success else 0.0, done=True, success=success, valid=True,
                              info={"answer": call.args.answer, "gold": item.gold})
        result = TOOLS[call.tool].run(call.args, item.table)
        s = self._state
        self._state = State(s.task, s.seed, item, (*s.history, (call.action, result)))
        return Transition(reward=0.0, done=False, success=False, valid=True, prompt=prompt_of(self._state),
                          observation=self._state, info={"result": result})

    def expert(self) -> str:
        """The plan's first step not taken yet: detours (a wrong call) are skipped over, not undone."""
        if self._state is None or self._done:
            raise ValueError("no episode in progress")
        done = {action for action, _ in self._state.history}
        for tool, args in self._state.item.plan:
            completion = render(tool, args)
            if read(completion).action not in done:
                return completion
        raise ValueError("the plan is exhausted")  # unreachable: the plan ends in final_answer


class ToolUse(Environment):
    """Calculator, date and lookup tools; single-step and chained (lookup then calculator/date) tasks."""

    name = "tooluse"
    tasks: ClassVar[tuple[str, ...]] = tuple(TASKS)
    default_tasks: ClassVar[tuple[str, ...]] = tuple(TASKS)
    has_expert = True
    action_regex = ACTION_REGEX
    reward_weight = 0.0  # the reward is success (1), failure (0) or malformed (-1): the score's other terms say it already
    max_new_tokens = 64  # the longest expert answer is 56 SmolLM2 tokens (tests/test_tooluse.py)
    batch_sessions: ClassVar[int] = 32  # no browser: episodes run 32 at a time (dpo_driver.batched)
    multiline_answers = True  # Thought line + Action line; text after the Action line is malformed

    def open(self, task: str) -> ToolUseSession:
        return ToolUseSession(task)

    def parse(self, completion: str) -> Parsed:
        call = read(completion)
        return Parsed(None, call) if isinstance(call, str) else Parsed(call.text)

    def max_steps(self, task: str) -> int:
        return TASKS[task][1]

    def candidates(self, observation: State) -> list[str]:
        """Each tool on the arguments in sight (the question's numbers, dates, day counts and towns,
        and the results so far), and final_answer with each result or part of one. Calls already
        made are left out. The expert's next action is among them."""
        item, history = observation.item, observation.history
        results = [r for _, r in history if not r.startswith("error")]
        looked_up = [r for a, r in history if a.startswith('{"tool":"lookup"') and re.fullmatch(r"-?\d+", r)]
        numbers = [*item.numbers, *map(int, looked_up)]  # a calculator result is an answer, not an operand
        dates = [*item.dates, *(r.split()[0] for r in results if re.match(r"\d{4}-\d{2}-\d{2}", r))]
        answers = [*results, *(part for r in results if " " in r for part in r.split())]
        calls = [("calculator", {"a": a, "op": op, "b": b}) for a, b in permutations(dict.fromkeys(numbers), 2) for op in OPS]
        calls += [("date", {"date": d, "days": n}) for d in dict.fromkeys(dates) for n in item.days]
        calls += [("lookup", {"entity": e, "field": f}) for e in item.entities for f in FIELDS]
        calls += [("final_answer", {"answer": a}) for a in dict.fromkeys(answers)]
        done = {action for action, _ in history}
        out = [render(tool, args) for tool, args in calls]
        return [c for c in dict.fromkeys(out) if read(c).action not in done]

    def answer_space(self, observation: State) -> AnswerSpace:
        """A one-line thought of the policy's own, then one of `candidates`' calls: the JSON is always
        valid and schema-checked, the arguments are those in sight (the question's and the results')."""
        calls = tuple(dict.fromkeys(ACTION + read(c).action for c in self.candidates(observation)))
        return AnswerSpace(slots=(Slot(THOUGHT, close="\n", banned="\n", suffixes=calls, nonblank=True),))

    def decontamination_text(self, prompt: str) -> str:
        # the tool list and the instruction are in every prompt; the question and history are the item
        lines = prompt.split("\n")
        return "\n".join(line for line in lines if line not in (TOOLS_LINE, INSTRUCTION))
