"""Text-to-SQL: one SELECT per question, graded by executing it against the gold query's result.

Questions come from templates at five levels (filter, join, aggregate, group, nested) over three
databases the project builds (sql_data). The reward follows the DB Bench pair recipe: an exact
result (as a multiset; in order only when the gold query orders at top level) is 1.0, a partial one
earns its overlap with the gold result (below 1), a query that fails to run -0.5, and text that is
no single read-only query -1.0. The pairs stage weighs this reward fully (reward_weight = 1), so
best-vs-worst pairs with a margin come out of the generic pair builder.

Model SQL runs on a read-only connection (`mode=ro`, `query_only`, an authorizer that allows only
reads) under a time and row guard, so a bad query can neither write nor hang the loop.
"""

from __future__ import annotations

import hashlib
import random
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from dpo_driver.tasks import split_of
from dpo_driver.environment import Environment, Parsed, Session, Transition
from dpo_driver.families.sql_data import SCHEMAS, Entity, Schema, database_path

REWARD_EXACT = 1.0
REWARD_ERROR = -0.5  # it parsed but did not run: worse than any result, better than no query
REWARD_MALFORMED = -1.0
PARTIAL_CAP = 0.9  # the right rows in the wrong order or column layout are still not a success
QUERY_SECONDS = 2.0  # per query; gold queries take milliseconds
MAX_ROWS = 10_000  # a result larger than this is a runaway (gold results are at most a few hundred rows)

# The completion grammar, once: one statement that starts as a query and names no write, with at
# most a trailing `;`. `;` is refused anywhere else (even in a string literal: a simple, exact rule).
_STARTS = (r"select\b", r"with\s+(?:recursive\s+)?\w+\s*(?:\([^)]*\)\s*)?as\s*\(")
_WRITES = ("insert", "update", "delete", r"replace\s+into", "create", "drop", "alter", "attach", "detach", "pragma", "vacuum", "reindex")
ACTION_REGEX = rf"(?is)\s*(?:{'|'.join(_STARTS)})(?!.*\b(?:{'|'.join(_WRITES)})\b)[^;]*(?:;\s*)?"
_ACTION = re.compile(ACTION_REGEX)
_QUOTED = r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\""
_ALLOWED_OPS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}

LEVELS = ("filter", "join", "aggregate", "group", "nested")
TASKS = tuple(f"sql-{level}" for level in LEVELS)
INSTRUCTION = "Answer with one SQLite query."


def canonical(text: str) -> str:
    """Strip, drop one trailing `;`, collapse whitespace outside quoted strings."""
    text = text.strip()
    text = text[:-1].rstrip() if text.endswith(";") else text
    return re.sub(rf"({_QUOTED})|\s+", lambda m: m.group(1) or " ", text)


def orders_at_top_level(sql: str) -> bool:
    """Whether the query's outermost SELECT has an ORDER BY (then row order is part of the answer)."""
    depth, flat = 0, []
    for ch in re.sub(_QUOTED, "''", sql):
        depth += ch == "("
        flat.append(ch if depth == 0 else " ")
        depth -= ch == ")"
    return re.search(r"\border\s+by\b", "".join(flat), re.I) is not None


class QueryError(Exception):
    pass


def _deny_writes(action, *_):
    return sqlite3.SQLITE_OK if action in _ALLOWED_OPS else sqlite3.SQLITE_DENY


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that can only read: read-only file, query_only, and an authorizer allowing reads alone."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(_deny_writes)
    return conn


def run_query(conn: sqlite3.Connection, sql: str, seconds: float = QUERY_SECONDS, max_rows: int = MAX_ROWS) -> list[tuple]:
    """The query's rows, or QueryError (SQL error, over time, over `max_rows` rows)."""
    deadline = time.monotonic() + seconds
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)  # nonzero aborts the query
    try:
        rows = conn.execute(sql).fetchmany(max_rows + 1)
    except sqlite3.OperationalError as e:
        raise QueryError(f"stopped after {seconds:g}s" if str(e) == "interrupted" else str(e)) from e
    except (sqlite3.Error, ValueError, OverflowError) as e:
        raise QueryError(str(e)) from e
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > max_rows:
        raise QueryError(f"more than {max_rows} rows")
    return rows


def _value(v):
    """Compare numbers by value: AVG's 42.0 equals COUNT's 42; float noise below 1e-4 is ignored."""
    if isinstance(v, float):
        v = round(v, 4)
        return int(v) if v.is_integer() else v
    return v


def _f1(gold: Counter, got: Counter) -> float:
    hit = sum((gold & got).values())
    return 0.0 if not hit else 2 * hit / (sum(gold.values()) + sum(got.values()))


def overlap(gold: list[tuple], got: list[tuple]) -> float:
    """Partial credit in [0, 1]: each gold column is paired with the returned column whose values
    overlap it most; the score is the rows' multiset F1 on the paired columns times the column F1,
    so extra or missing columns cost as much as extra or missing rows."""
    if not gold or not got:
        return 0.0
    gcols = [Counter(r[i] for r in gold) for i in range(len(gold[0]))]
    pcols = [Counter(r[j] for r in got) for j in range(len(got[0]))]
    scored = sorted(((-_f1(g, p), i, j) for i, g in enumerate(gcols) for j, p in enumerate(pcols)))
    used_g, used_p, pairs = set(), set(), []
    for neg, i, j in scored:
        if neg < 0 and i not in used_g and j not in used_p:
            used_g.add(i)
            used_p.add(j)
            pairs.append((i, j))
    if not pairs:
        return 0.0
    pairs.sort()
    rows = _f1(Counter(tuple(r[i] for i, _ in pairs) for r in gold), Counter(tuple(r[j] for _, j in pairs) for r in got))
    return rows * 2 * len(pairs) / (len(gcols) + len(pcols))


def grade(gold: list[tuple], got: list[tuple], ordered: bool) -> float:
    """REWARD_EXACT for the gold result (in gold's order when `ordered`), else capped overlap."""
    gold = [tuple(map(_value, r)) for r in gold]
    got = [tuple(map(_value, r)) for r in got]
    if (gold == got) if ordered else (Counter(gold) == Counter(got)):
        return REWARD_EXACT
    return min(PARTIAL_CAP, overlap(gold, got))


@dataclass(frozen=True)
class Item:
    """One question: the observation of a single-step episode."""

    task: str
    seed: int
    db: str
    question: str
    gold: str
    ordered: bool
    candidates: tuple[str, ...]  # exploration: the gold among plausible wrong queries

    @property
    def prompt(self) -> str:
        return "\n".join([f"Database {self.db}:", *SCHEMAS[self.db].lines(), f"Question: {self.question}", INSTRUCTION])


# ---- question templates: each returns (question, gold SQL, wrong variants) ----
# Gold style, kept uniform so a small model can imitate it: uppercase keywords, single-quoted
# strings, table aliases (the schema's initials) only where tables are joined, joins written
# link-first from entity a to entity b.

class _Retry(Exception):
    """The draw gave a degenerate item; the next draw from the same generator is used."""


def _lit(v) -> str:
    return "'" + v.replace("'", "''") + "'" if isinstance(v, str) else str(v)


def _words(col: str) -> str:
    return col.replace("_", " ")


class _Draw:
    """Random choices for one item, with values read from its database."""

    def __init__(self, rng: random.Random, s: Schema, conn: sqlite3.Connection):
        self.rng, self.s, self.conn = rng, s, conn

    def values(self, table: str, col: str, where: str = "") -> list:
        return [r[0] for r in self.conn.execute(f"SELECT DISTINCT {col} FROM {table} {where} ORDER BY {col}")]

    def value(self, table: str, col: str, where: str = ""):
        return self.rng.choice(self.values(table, col, where))

    def entity(self) -> Entity:
        return self.rng.choice((self.s.a, self.s.b))

    def threshold(self, e: Entity, where: str = ""):
        """A round-ish cut inside the column's range, so both sides of it hold rows."""
        vals = self.values(e.table, e.num, where)
        v = vals[self.rng.randrange(len(vals) // 5, max(len(vals) // 5 + 1, len(vals) * 4 // 5))]
        return int(v) if isinstance(v, float) else v

    def join(self) -> str:
        a, b, lk = self.s.a, self.s.b, self.s.link
        return (f"FROM {a.table} {a.alias} JOIN {lk.table} {lk.alias} ON {lk.alias}.{lk.a_fk} = {a.alias}.id "
                f"JOIN {b.table} {b.alias} ON {b.alias}.id = {lk.alias}.{lk.b_fk}")

    def link_join(self, e: Entity) -> str:
        lk = self.s.link
        fk = lk.a_fk if e is self.s.a else lk.b_fk
        return f"FROM {lk.table} {lk.alias} JOIN {e.table} {e.alias} ON {e.alias}.id = {lk.alias}.{fk}"


def _names(e: Entity) -> str:
    return f"{e.name}s"


def _filter(d: _Draw):
    e, kind = d.entity(), d.rng.randrange(3)
    head = f"SELECT {e.name} FROM {e.table} WHERE "
    v, other = d.value(e.table, e.cat), d.value(e.table, e.cat)
    if kind == 0:
        q = f"List the {_names(e)} of {e.table} whose {_words(e.cat)} is {_lit(v)}."
        gold = f"{head}{e.cat} = {_lit(v)}"
        wrong = [f"{head}{e.cat} = {_lit(other)}", f"{head}{e.cat} != {_lit(v)}", gold.replace(f"SELECT {e.name}", "SELECT *")]
        return q, gold, wrong
    op, word = d.rng.choice(((">", "greater than"), ("<", "less than")))
    flip = "<" if op == ">" else ">"
    if kind == 1:
        x = d.threshold(e)
        q = f"List the {_names(e)} of {e.table} with {_words(e.num)} {word} {x}."
        gold = f"{head}{e.num} {op} {x}"
        return q, gold, [f"{head}{e.num} {flip} {x}", f"{head}{e.num} {op}= {x}", f"SELECT * FROM {e.table} WHERE {e.num} {op} {x}"]
    x = d.threshold(e, f"WHERE {e.cat} = {_lit(v)}")
    q = f"List the {_names(e)} of {e.table} whose {_words(e.cat)} is {_lit(v)} and {_words(e.num)} is {word} {x}."
    gold = f"{head}{e.cat} = {_lit(v)} AND {e.num} {op} {x}"
    return q, gold, [f"{head}{e.cat} = {_lit(v)} OR {e.num} {op} {x}", f"{head}{e.cat} = {_lit(v)}",
                     f"{head}{e.cat} = {_lit(v)} AND {e.num} {flip} {x}"]


def _join(d: _Draw):
    s = d.s
    target, side = (s.a, s.b) if d.rng.random() < 0.5 else (s.b, s.a)
    sel = f"SELECT DISTINCT {target.alias}.{target.name} {d.join()} WHERE "
    if d.rng.random() < 0.5:
        linked = f"WHERE id IN (SELECT {s.link.a_fk if side is s.a else s.link.b_fk} FROM {s.link.table})"
        v, col = d.value(side.table, side.name, linked), side.name
        where_words = f"the {side.singular} {_lit(v)}"
    else:
        v, col = d.value(side.table, side.cat), side.cat
        where_words = f"{side.table} with {_words(side.cat)} {_lit(v)}"
    if target is s.a:
        q = f"List the {_names(target)} of {target.table} who {s.verb} {where_words}."
    else:
        q = f"List the {_names(target)} of {target.table} {s.passive} by {where_words}."
    gold = f"{sel}{side.alias}.{col} = {_lit(v)}"
    wrong = [gold.replace("SELECT DISTINCT", "SELECT"), gold.replace(f"{target.alias}.{target.name}", f"{side.alias}.{side.name}", 1),
             f"SELECT {target.name} FROM {target.table}"]
    return q, gold, wrong


_AGGS = {"AVG": "average", "MAX": "highest", "MIN": "lowest", "SUM": "total"}


def _aggregate(d: _Draw):
    s, kind = d.s, d.rng.randrange(3)
    if kind == 0:
        e = d.entity()
        v = d.value(e.table, e.cat)
        gold = f"SELECT COUNT(*) FROM {e.table} WHERE {e.cat} = {_lit(v)}"
        return (f"How many {e.table} have {_words(e.cat)} {_lit(v)}?", gold,
                [f"SELECT COUNT(*) FROM {e.table}", f"SELECT COUNT({e.name}) FROM {e.table} WHERE {e.cat} != {_lit(v)}"])
    if kind == 1:
        e = d.entity()
        v = d.value(e.table, e.cat)
        fn = d.rng.choice(("AVG", "MAX", "MIN"))
        gold = f"SELECT {fn}({e.num}) FROM {e.table} WHERE {e.cat} = {_lit(v)}"
        other = d.rng.choice([f for f in ("AVG", "MAX", "MIN", "SUM") if f != fn])
        return (f"What is the {_AGGS[fn]} {_words(e.num)} of {e.table} whose {_words(e.cat)} is {_lit(v)}?", gold,
                [gold.replace(fn, other, 1), f"SELECT {fn}({e.num}) FROM {e.table}"])
    e, lk = d.entity(), s.link
    fk = lk.a_fk if e is s.a else lk.b_fk
    v = d.value(e.table, e.name, f"WHERE id IN (SELECT {fk} FROM {lk.table})")
    fn = d.rng.choice(("SUM", "AVG", "MAX"))
    gold = f"SELECT {fn}({lk.alias}.{lk.measure}) {d.link_join(e)} WHERE {e.alias}.{e.name} = {_lit(v)}"
    return (f"What is the {_AGGS[fn]} {_words(lk.measure)} of {lk.table} of the {e.singular} {_lit(v)}?", gold,
            [gold.replace(f"{fn}(", "COUNT(", 1), f"SELECT {fn}({lk.measure}) FROM {lk.table}"])


def _group(d: _Draw):
    s, kind = d.s, d.rng.randrange(5)
    e = d.entity()
    if kind == 0:
        x = d.threshold(e)
        gold = f"SELECT {e.cat}, COUNT(*) FROM {e.table} WHERE {e.num} > {x} GROUP BY {e.cat}"
        return (f"For each {_words(e.cat)}, give the number of {e.table} with {_words(e.num)} greater than {x}.", gold,
                [gold.replace(f" WHERE {e.num} > {x}", ""), gold.replace(">", "<", 1), f"SELECT {e.cat}, COUNT(*) FROM {e.table}"])
    if kind == 1:
        fn = d.rng.choice(("AVG", "MAX", "MIN"))
        gold = f"SELECT {e.cat}, {fn}({e.num}) FROM {e.table} GROUP BY {e.cat}"
        return (f"For each {_words(e.cat)}, give the {_AGGS[fn]} {_words(e.num)} of {e.table}.", gold,
                [gold.replace(f"{fn}(", "SUM(", 1), f"SELECT {fn}({e.num}) FROM {e.table}"])
    if kind == 2:
        counts = sorted(r[0] for r in d.conn.execute(f"SELECT COUNT(*) FROM {e.table} GROUP BY {e.cat}"))
        n = counts[d.rng.randrange(len(counts) - 1)]  # below the largest count: some group passes
        gold = f"SELECT {e.cat} FROM {e.table} GROUP BY {e.cat} HAVING COUNT(*) > {n}"
        return (f"Which {_words(e.cat)} values have more than {n} {e.table}?", gold,
                [gold.replace(">", "<"), f"SELECT {e.cat} FROM {e.table} WHERE {e.num} > {n}"])
    if kind == 3:
        lk, fn = s.link, d.rng.choice(("SUM", "AVG"))
        gold = f"SELECT {e.alias}.{e.cat}, {fn}({lk.alias}.{lk.measure}) {d.link_join(e)} GROUP BY {e.alias}.{e.cat}"
        return (f"For each {_words(e.cat)} of {e.table}, give the {_AGGS[fn]} {_words(lk.measure)} of their {lk.table}.", gold,
                [gold.replace(f"{fn}(", "COUNT(", 1), f"SELECT {e.cat}, COUNT(*) FROM {e.table} GROUP BY {e.cat}"])
    k = d.rng.randint(2, 4)
    counts = [r[0] for r in d.conn.execute(f"SELECT COUNT(*) AS n FROM {e.table} GROUP BY {e.cat} ORDER BY n DESC")]
    if len(set(counts[: k + 1])) < k + 1:
        raise _Retry  # a tie inside the top k (or at the cut) makes the ordered answer ambiguous
    gold = f"SELECT {e.cat}, COUNT(*) FROM {e.table} GROUP BY {e.cat} ORDER BY COUNT(*) DESC LIMIT {k}"
    return (f"List the {k} {_words(e.cat)} values with the most {e.table} and their counts, most first.", gold,
            [gold.replace("DESC", "ASC"), gold.replace(" ORDER BY COUNT(*) DESC", "")])


def _nested(d: _Draw):
    s, kind = d.s, d.rng.randrange(4)
    e = d.entity()
    if kind == 0:
        v = d.value(e.table, e.cat)
        op, word = d.rng.choice(((">", "above"), ("<", "below")))
        gold = f"SELECT {e.name} FROM {e.table} WHERE {e.cat} = {_lit(v)} AND {e.num} {op} (SELECT AVG({e.num}) FROM {e.table})"
        return (f"List the {_names(e)} of {e.table} with {_words(e.cat)} {_lit(v)} and {_words(e.num)} {word} "
                f"the average {_words(e.num)} of all {e.table}.", gold,
                [gold.replace(f" {op} (", " = (", 1), f"SELECT {e.name} FROM {e.table} WHERE {e.num} {op} (SELECT AVG({e.num}) FROM {e.table})"])
    if kind == 1:
        v = d.value(e.table, e.cat)
        gold = (f"SELECT {e.name} FROM {e.table} WHERE {e.cat} = {_lit(v)} AND {e.num} = "
                f"(SELECT MAX({e.num}) FROM {e.table} WHERE {e.cat} = {_lit(v)})")
        return (f"Which {e.table} with {_words(e.cat)} {_lit(v)} have the highest {_words(e.num)}?", gold,
                [f"SELECT {e.name} FROM {e.table} WHERE {e.num} = (SELECT MAX({e.num}) FROM {e.table})",
                 gold.replace("MAX(", "MIN(")])
    lk = s.link
    fk = lk.a_fk if e is s.a else lk.b_fk
    if kind == 2:
        v = d.value(e.table, e.cat)
        gold = f"SELECT {e.name} FROM {e.table} WHERE {e.cat} = {_lit(v)} AND id NOT IN (SELECT {fk} FROM {lk.table})"
        return (f"List the {_names(e)} of {e.table} with {_words(e.cat)} {_lit(v)} that have no {lk.table}.", gold,
                [gold.replace("NOT IN", "IN"), f"SELECT {e.name} FROM {e.table} WHERE id NOT IN (SELECT {fk} FROM {lk.table})"])
    a, b = s.a, s.b
    v = d.value(b.table, b.cat)
    gold = (f"SELECT {a.name} FROM {a.table} WHERE id IN (SELECT {lk.a_fk} FROM {lk.table} WHERE {lk.b_fk} IN "
            f"(SELECT id FROM {b.table} WHERE {b.cat} = {_lit(v)}))")
    return (f"List the {_names(a)} of {a.table} who {s.verb} a {b.singular} with {_words(b.cat)} {_lit(v)}.", gold,
            [gold.replace("WHERE id IN", "WHERE id NOT IN", 1), gold.replace(f" = {_lit(v)}", f" != {_lit(v)}")])


TEMPLATES: dict[str, Callable[[_Draw], tuple[str, str, list[str]]]] = dict(
    zip(TASKS, (_filter, _join, _aggregate, _group, _nested)))


def _informative(rows: list[tuple]) -> bool:
    return bool(rows) and any(v is not None and v != 0 for r in rows for v in r)


class _SQLSession(Session):
    def __init__(self, env: "TextToSQL", task: str):
        self.task, self.env, self.item, self._gold_rows = task, env, None, []

    def reset(self, seed: int) -> tuple[Item, str]:
        self.item, self._gold_rows = self.env.item(self.task, seed)
        return self.item, self.item.prompt

    def step(self, completion: str) -> Transition:
        assert self.item is not None, "reset() first"
        parsed = self.env.parse(completion)
        if not parsed.ok:
            return Transition(reward=REWARD_MALFORMED, done=True, success=False, valid=False, info={"error": parsed.error})
        try:
            rows = run_query(self.env.connection(self.item.db), parsed.action)
        except QueryError as e:
            return Transition(reward=REWARD_ERROR, done=True, success=False, valid=True, info={"error": str(e)})
        reward = grade(self._gold_rows, rows, self.item.ordered)
        return Transition(reward=reward, done=True, success=reward == REWARD_EXACT, valid=True,
                          info={"rows": len(rows), "gold_rows": len(self._gold_rows)})

    def expert(self) -> str:
        assert self.item is not None, "reset() first"
        return self.item.gold


def _reserved_for_eval(question: str) -> bool:
    """Whether a question belongs to the evaluation split. Templates over finite data repeat
    questions across seeds (a third of 200 held-out questions also occurred among 200 demo seeds),
    so held-out items are disjoint by question, not only by seed: a stable quarter of all questions
    is asked on evaluation seeds and never on demo or rollout seeds."""
    return hashlib.sha1(question.encode()).digest()[0] % 4 == 0


class TextToSQL(Environment):
    """Text-to-SQL over three built databases; one task per difficulty level."""

    name = "sql"
    tasks: ClassVar[tuple[str, ...]] = TASKS
    default_tasks: ClassVar[tuple[str, ...]] = TASKS
    has_expert = True
    action_regex: ClassVar[str] = ACTION_REGEX
    reward_weight: ClassVar[float] = 1.0
    # The longest gold SQL is 53 SmolLM2 tokens (a three-table join; seeds 0-299 of every task),
    # prompts at most 81: room for a slightly longer answer and the end-of-sequence token.
    max_new_tokens: ClassVar[int] = 72
    batch_sessions: ClassVar[int] = 32  # no browser: episodes run 32 at a time (dpo_driver.batched)

    def __init__(self, cache_dir: str = ""):
        self.cache_dir = cache_dir
        self._conns: dict[str, sqlite3.Connection] = {}

    def connection(self, db: str) -> sqlite3.Connection:
        """The read-only connection to database `db` (built on first use)."""
        if db not in self._conns:
            self._conns[db] = connect_readonly(database_path(db, self.cache_dir))
        return self._conns[db]

    def item(self, task: str, seed: int) -> tuple[Item, list[tuple]]:
        """The question of (task, seed) and its gold rows; deterministic, never an empty answer."""
        rng = random.Random(f"{task}:{seed}")
        held_out = split_of(seed) == "eval"
        for _ in range(400):
            db = rng.choice(sorted(SCHEMAS))
            conn = self.connection(db)
            try:
                question, gold, wrong = TEMPLATES[task](_Draw(rng, SCHEMAS[db], conn))
            except _Retry:
                continue
            if _reserved_for_eval(question) != held_out:
                continue  # the question space is finite: a quarter of it is asked on evaluation seeds only
            rows = run_query(conn, gold)
            if not _informative(rows):
                continue
            candidates = sorted(set(wrong) - {gold})
            candidates.insert(rng.randrange(len(candidates) + 1), gold)
            return Item(task, seed, db, question, gold, orders_at_top_level(gold), tuple(candidates)), rows
        raise RuntimeError(f"{task} seed {seed}: no item with a non-empty answer in 400 draws")

    def open(self, task: str) -> Session:
        return _SQLSession(self, task)

    def parse(self, completion: str) -> Parsed:
        if _ACTION.fullmatch(completion):
            return Parsed(canonical(completion))
        text = completion.strip()
        if not text:
            return Parsed(None, "empty completion")
        if ";" in text.rstrip(";").rstrip() or text.count(";") > 1:
            return Parsed(None, "more than one statement")
        if re.search(rf"(?i)\b(?:{'|'.join(_WRITES)})\b", text):
            return Parsed(None, "not read-only: the query names a write or schema statement")
        return Parsed(None, "not a query: answer with one SELECT (or WITH ... SELECT) statement")

    def candidates(self, observation: Any) -> list[str]:
        return list(observation.candidates) if isinstance(observation, Item) else []

    def decontamination_text(self, prompt: str) -> str:
        """The question line only: the schema lines repeat across every prompt of a database."""
        return next((ln for ln in prompt.splitlines() if ln.startswith("Question: ")), prompt)

    def describe(self) -> dict:
        return {**super().describe(), "databases": sorted(SCHEMAS)}
