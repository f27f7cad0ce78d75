"""The built-in text-to-SQL family: deterministic databases and items, a gold query that always
solves its item, graded execution rewards, a read-only and time-guarded executor, one grammar."""

from __future__ import annotations

import re
import sqlite3
import time

import pytest

from dpo_driver.environment import load_environment
from dpo_driver.families.sql import (
    PARTIAL_CAP, REWARD_ERROR, REWARD_EXACT, REWARD_MALFORMED, QueryError, TextToSQL, grade, orders_at_top_level, run_query,
)
from dpo_driver.families.sql_data import SCHEMAS, checksum, database_path

SEEDS = range(50)


@pytest.fixture(scope="module")
def env():
    return TextToSQL()


def _seed_where(env, task, want):
    """The first seed of `task` whose item satisfies `want(item, gold_rows)`."""
    for seed in range(200):
        item, rows = env.item(task, seed)
        if want(item, rows):
            return seed
    raise AssertionError(f"no {task} seed fits")


def _step(env, task, seed, completion):
    session = env.open(task)
    session.reset(seed)
    return session.step(completion)


def test_databases_are_deterministic_and_realistic(tmp_path):
    def stats(cache):
        out = {}
        for db in SCHEMAS:
            with sqlite3.connect(database_path(db, str(cache))) as conn:
                tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
                out[db] = ({t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}, checksum(conn))
        return out

    first, second = stats(tmp_path / "a"), stats(tmp_path / "b")
    assert first == second
    assert len(SCHEMAS) >= 3 and len({tuple(counts) for counts, _ in first.values()}) == len(SCHEMAS)  # different schemas
    for counts, _ in first.values():
        assert len(counts) == 3 and all(50 <= n <= 5000 for n in counts.values()) and max(counts.values()) >= 1000


def test_load_environment_returns_the_family():
    env = load_environment("sql")
    assert isinstance(env, TextToSQL) and env.name == "sql" and env.has_expert and env.reward_weight == 1.0
    assert env.suite(None) == list(env.tasks) == ["sql-filter", "sql-join", "sql-aggregate", "sql-group", "sql-nested"]
    assert all(env.max_steps(t) == 1 for t in env.tasks)


@pytest.mark.parametrize("task", TextToSQL.tasks)
def test_gold_solves_every_seed_and_items_differ(env, task):
    session, prompts, dbs = env.open(task), set(), set()
    for seed in SEEDS:
        item, prompt = session.reset(seed)
        assert item.gold not in prompt and "SELECT" not in prompt and prompt.endswith("Answer with one SQLite query.")
        assert item.gold in env.candidates(item) and len(env.candidates(item)) >= 3
        t = session.step(session.expert())
        assert (t.reward, t.done, t.success, t.valid) == (REWARD_EXACT, True, True, True), (seed, item.gold, t)
        assert t.info["gold_rows"] > 0
        prompts.add(prompt)
        dbs.add(item.db)
    # sql-group's question space is the smallest (~130 questions; a quarter is reserved for evaluation seeds)
    assert len(prompts) >= 0.6 * len(SEEDS) and dbs == set(SCHEMAS)
    again = TextToSQL().open(task)
    assert again.reset(7)[1] == session.reset(7)[1] and again.expert() == session.expert()


def test_graded_reward_unordered(env):
    seed = _seed_where(env, "sql-filter", lambda it, rows: not it.ordered and len(rows) >= 4 and it.gold.startswith("SELECT name "))
    gold = env.item("sql-filter", seed)[0].gold
    assert _step(env, "sql-filter", seed, gold + ";").reward == REWARD_EXACT
    reordered = _step(env, "sql-filter", seed, f"SELECT * FROM ({gold}) ORDER BY 1 DESC")
    assert reordered.success and reordered.reward == REWARD_EXACT
    subset = _step(env, "sql-filter", seed, f"SELECT * FROM ({gold}) LIMIT 2")
    extra_column = _step(env, "sql-filter", seed, gold.replace("SELECT name", "SELECT name, id", 1))
    for t in (subset, extra_column):
        assert 0 < t.reward < 1 and not t.success and t.valid
    wrong = _step(env, "sql-filter", seed, "SELECT 'nobody'")
    assert wrong.reward == 0.0 and not wrong.success and wrong.valid
    error = _step(env, "sql-filter", seed, "SELECT nope FROM nowhere")
    assert error.reward == REWARD_ERROR < 0 and error.valid and not error.success and "nowhere" in error.info["error"]


def test_graded_reward_ordered(env):
    seed = _seed_where(env, "sql-group", lambda it, rows: it.ordered)
    gold = env.item("sql-group", seed)[0].gold
    assert orders_at_top_level(gold) and not orders_at_top_level("SELECT a FROM (SELECT a FROM t ORDER BY a)")
    assert _step(env, "sql-group", seed, gold).reward == REWARD_EXACT
    reversed_rows = _step(env, "sql-group", seed, f"SELECT * FROM ({gold}) ORDER BY 2 ASC")
    assert not reversed_rows.success and 0 < reversed_rows.reward <= PARTIAL_CAP


def test_grade_units():
    gold = [("a", 1), ("b", 2), ("c", 3)]
    assert grade(gold, [("c", 3), ("a", 1), ("b", 2.0)], ordered=False) == REWARD_EXACT  # 2.0 == 2
    assert grade(gold, [("c", 3), ("a", 1), ("b", 2)], ordered=True) == PARTIAL_CAP
    assert grade(gold, [(1, "a"), (2, "b"), (3, "c")], ordered=False) == PARTIAL_CAP  # columns swapped: not exact
    assert 0 < grade(gold, [("a", 1)], ordered=False) < grade(gold, [("a", 1), ("b", 2)], ordered=False) < 1
    assert grade(gold, [("a",), ("b",), ("c",)], ordered=False) < PARTIAL_CAP  # a missing column costs
    assert grade(gold, [], ordered=False) == 0.0 and grade([(42,)], [(41,)], ordered=False) == 0.0


MALFORMED = ["", "   ", "DELETE FROM customers", "SELECT 1; SELECT 2", "SELECT 1;;", "The answer is 42.",
             "DROP TABLE orders", "WITH x AS (SELECT 1) DELETE FROM orders", "UPDATE customers SET city = 'Oslo'",
             "SELECT * FROM customers; DROP TABLE customers", "select name from customers where id in (delete from orders)",
             "PRAGMA query_only = OFF", "With this query we list the names."]
WELL_FORMED = ["SELECT 1", " select name from customers ; ", "SELECT name\nFROM   customers\tWHERE city = 'Paris'  ;",
               "WITH t AS (SELECT 1 AS x) SELECT x FROM t", "with recursive n(i) as (select 1) select i from n",
               "SELECT nope FROM nowhere", "SELECT * FROM customers WHERE name = 'A  B'"]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_is_invalid(env, text):
    assert not env.parse(text).ok and env.parse(text).error
    assert re.fullmatch(env.action_regex, text) is None
    t = _step(env, "sql-filter", 0, text)
    assert (t.reward, t.done, t.success, t.valid) == (REWARD_MALFORMED, True, False, False)


@pytest.mark.parametrize("text", WELL_FORMED)
def test_action_regex_agrees_with_parse(env, text):
    parsed = env.parse(text)
    assert parsed.ok and re.fullmatch(env.action_regex, text)
    assert re.fullmatch(env.action_regex, parsed.action) and env.parse(parsed.action).action == parsed.action
    assert not parsed.action.endswith(";") and "  " not in parsed.action.replace("'A  B'", "")
    assert "'A  B'" in env.parse(WELL_FORMED[-1]).action  # whitespace inside a string literal is kept


def test_candidates_and_golds_match_the_grammar(env):
    for task in env.tasks:
        for seed in range(10):
            for c in env.item(task, seed)[0].candidates:
                assert re.fullmatch(env.action_regex, c) and env.parse(c).action == c


def test_writes_cannot_modify_the_database(env):
    conn = env.connection("shop")
    before = checksum(conn)
    for sql in ["DELETE FROM orders", "WITH x AS (SELECT 1) DELETE FROM orders", "INSERT INTO customers VALUES (9999, 'X', 'Y', 2020)",
                "PRAGMA query_only = OFF", "ATTACH DATABASE ':memory:' AS m", "DROP TABLE orders"]:
        with pytest.raises(QueryError):
            run_query(conn, sql)
    with pytest.raises(sqlite3.OperationalError):
        sqlite3.connect(f"{database_path('shop').resolve().as_uri()}?mode=ro", uri=True).execute("DELETE FROM orders")
    assert checksum(conn) == before


def test_runaway_queries_are_stopped(env):
    conn = env.connection("shop")
    start = time.monotonic()
    with pytest.raises(QueryError, match="stopped"):
        run_query(conn, "SELECT COUNT(*) FROM orders a, orders b, orders c", seconds=0.3)
    with pytest.raises(QueryError, match="rows"):
        run_query(conn, "SELECT * FROM orders a, orders b")
    assert time.monotonic() - start < 3
    start = time.monotonic()
    t = _step(env, "sql-filter", 0, "SELECT COUNT(*) FROM customers a, customers b, customers c, customers d")
    assert t.reward == REWARD_ERROR and t.valid and time.monotonic() - start < 5
    assert run_query(conn, "SELECT COUNT(*) FROM customers") == [(400,)]  # the connection still works
