"""The text-to-SQL family's databases, built deterministically.

Three schemas of one shape (two entity tables and a link table between them, with a category and a
number per entity and a measure per link) so every question template works on every database while
the names the model must read differ. Rows come from `random.Random(<schema name>)` (string seeds
are hashed with SHA-512, not `hash()`), so every process builds byte-identical data. A few entities
of each kind are never linked, so "X with no Y" questions have answers.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUILD_VERSION = 1  # part of the cache file name: bump when the data or schemas change


@dataclass(frozen=True)
class Entity:
    table: str
    alias: str  # the alias gold SQL uses in joins
    singular: str
    name: str  # the column that names a row (unique per table)
    cat: str  # a categorical column
    num: str  # a numeric column
    rows: int


@dataclass(frozen=True)
class Link:
    table: str
    alias: str
    singular: str
    a_fk: str
    b_fk: str
    measure: str
    rows: int


@dataclass(frozen=True)
class Schema:
    db: str
    a: Entity
    b: Entity
    link: Link
    verb: str  # "customers who ORDERED the product ..."
    passive: str  # "products ORDERED by the customer ..."

    def lines(self) -> list[str]:
        """The compact one-line-per-table schema the prompt shows."""
        e = [f"{x.table}(id, {x.name}, {x.cat}, {x.num})" for x in (self.a, self.b)]
        lk = self.link
        return e + [f"{lk.table}(id, {lk.a_fk}, {lk.b_fk}, {lk.measure})"]


SCHEMAS = {
    s.db: s
    for s in (
        Schema("shop", Entity("customers", "c", "customer", "name", "city", "signup_year", 400),
               Entity("products", "p", "product", "name", "category", "price", 120),
               Link("orders", "o", "order", "customer_id", "product_id", "quantity", 3000), "ordered", "ordered"),
        Schema("school", Entity("students", "s", "student", "name", "major", "enroll_year", 600),
               Entity("courses", "c", "course", "title", "department", "credits", 80),
               Link("enrollments", "e", "enrollment", "student_id", "course_id", "grade", 2400), "took", "taken"),
        Schema("hr", Entity("employees", "e", "employee", "name", "department", "hire_year", 300),
               Entity("projects", "p", "project", "title", "client", "budget", 60),
               Link("assignments", "a", "assignment", "employee_id", "project_id", "hours", 1200), "worked on", "worked on"),
    )
}

_FIRST = ("Alice Bruno Carla David Elena Felix Grace Hugo Irene Jonas Karin Leo Maria Nils Olga Pablo Quinn Rosa Samir Tina "
          "Umar Vera Walter Xenia Yusuf Zoe Anna Boris Clara Dario Emma Farid Gina Hans Ines Jack Lena Marco Nora Oscar").split()
_LAST = ("Adams Baker Costa Dubois Evans Fischer Garcia Hansen Ito Jensen Kowalski Lopez Meyer Novak Olsen Petrov Quiroga "
         "Rossi Schmidt Tanaka Ueda Vargas Weber Xu Young Zimmer Berg Moreau Silva Kaya").split()
_ADJ = "Blue Red Green Silver Golden Swift Quiet Bright Smart Compact Classic Urban Solar Arctic Royal Rapid".split()
# Per schema: the categorical values of entity a and b, the second word of b's names, and how
# each numeric column is drawn.
_VALUES = {
    "shop": {
        "a_cat": "Paris Berlin Madrid Rome Vienna Lisbon Dublin Oslo Prague Warsaw Athens Zurich".split(),
        "b_cat": "books toys garden kitchen sports music office beauty".split(),
        "b_words": "Lamp Chair Kettle Backpack Jacket Speaker Notebook Bottle Blender Racket Helmet Clock Mug Pillow Camera Guitar".split(),
        "a_num": lambda r: r.randint(2015, 2024),
        "b_num": lambda r: round(r.uniform(3, 250), 2),
        "measure": lambda r: r.randint(1, 10),
    },
    "school": {
        "a_cat": "Biology Chemistry Economics History Mathematics Physics Philosophy Law Music Medicine".split(),
        "b_cat": "Science Arts Business Engineering Humanities Health Law Education".split(),
        "b_words": None,  # course titles: subject + level
        "a_num": lambda r: r.randint(2018, 2025),
        "b_num": lambda r: r.randint(1, 6),
        "measure": lambda r: r.randint(40, 100),
    },
    "hr": {
        "a_cat": "Sales Finance Engineering Marketing Support Legal Research".split(),
        "b_cat": "Acme Globex Initech Umbrella Hooli Stark Wayne Wonka Tyrell Cyberdyne".split(),
        "b_words": "Falcon Otter Tiger Heron Lynx Badger Raven Cobra Bison Panda Eagle Whale Fox Wolf Hawk Moose".split(),
        "a_num": lambda r: r.randint(2005, 2025),
        "b_num": lambda r: r.randint(10, 500) * 1000,
        "measure": lambda r: r.randint(5, 200),
    },
}
_SUBJECTS = ("Algebra Anatomy Ethics Finance Genetics Geometry Logic Marketing Mechanics Optics Poetry Statistics "
             "Thermodynamics Accounting Botany Databases Drawing Grammar Robotics Sociology").split()


def _weights(rng: random.Random, n: int) -> list[float]:
    """Skewed category weights, so group counts differ (realistic, and top-k questions have few ties)."""
    return [rng.uniform(0.3, 3.0) for _ in range(n)]


def _fill(conn: sqlite3.Connection, s: Schema) -> None:
    rng, v = random.Random(s.db), _VALUES[s.db]
    people = rng.sample([f"{f} {la}" for f in _FIRST for la in _LAST], s.a.rows)
    if v["b_words"]:
        things = rng.sample([f"{a} {w}" for a in _ADJ for w in v["b_words"]], s.b.rows)
    else:
        things = rng.sample([f"{sub} {lvl}" for sub in _SUBJECTS for lvl in (101, 102, 201, 202, 301)], s.b.rows)
    for ent, names, cats, num in ((s.a, people, v["a_cat"], v["a_num"]), (s.b, things, v["b_cat"], v["b_num"])):
        conn.execute(f"CREATE TABLE {ent.table} (id INTEGER PRIMARY KEY, {ent.name} TEXT NOT NULL, {ent.cat} TEXT NOT NULL, "
                     f"{ent.num} {'REAL' if ent.num == 'price' else 'INTEGER'} NOT NULL)")
        w = _weights(rng, len(cats))
        conn.executemany(f"INSERT INTO {ent.table} VALUES (?, ?, ?, ?)",
                         [(i, n, rng.choices(cats, w)[0], num(rng)) for i, n in enumerate(names, 1)])
    lk = s.link
    conn.execute(f"CREATE TABLE {lk.table} (id INTEGER PRIMARY KEY, {lk.a_fk} INTEGER NOT NULL REFERENCES {s.a.table}(id), "
                 f"{lk.b_fk} INTEGER NOT NULL REFERENCES {s.b.table}(id), {lk.measure} INTEGER NOT NULL)")
    # ~6% of each entity never appears in the link table; the rest are drawn with skew (popular products).
    a_ids = [i for i in range(1, s.a.rows + 1) if rng.random() > 0.06]
    b_ids = [i for i in range(1, s.b.rows + 1) if rng.random() > 0.06]
    a_w, b_w = _weights(rng, len(a_ids)), _weights(rng, len(b_ids))
    rows, seen = [], set()
    while len(rows) < lk.rows:
        pair = (rng.choices(a_ids, a_w)[0], rng.choices(b_ids, b_w)[0])
        if s.db != "shop" and pair in seen:
            continue  # a student takes a course once; a customer may order the same product again
        seen.add(pair)
        rows.append((len(rows) + 1, *pair, v["measure"](rng)))
    conn.executemany(f"INSERT INTO {lk.table} VALUES (?, ?, ?, ?)", rows)
    conn.commit()


_BUILT: dict[tuple[str, str], Path] = {}  # (directory, db) -> file, once per process
_TMP: list[tempfile.TemporaryDirectory] = []


def database_path(db: str, cache_dir: str = "") -> Path:
    """The SQLite file of database `db`, built on first use (into `cache_dir`, else a process temp dir)."""
    if not cache_dir:
        if not _TMP:
            _TMP.append(tempfile.TemporaryDirectory(prefix="dpo-sql-"))  # removed at interpreter exit
        cache_dir = _TMP[0].name
    key = (str(cache_dir), db)
    if key not in _BUILT:
        path = Path(cache_dir) / f"sql-{db}-v{BUILD_VERSION}.sqlite"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            try:
                conn = sqlite3.connect(tmp)
                try:
                    _fill(conn, SCHEMAS[db])
                finally:
                    conn.close()
                os.replace(tmp, path)  # atomic: concurrent processes never read a half-built file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        _BUILT[key] = path
    return _BUILT[key]


def checksum(conn: sqlite3.Connection) -> str:
    """SHA-256 over every table's rows in id order: equal across builds iff the data is."""
    h = hashlib.sha256()
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
        for row in conn.execute(f"SELECT * FROM {table} ORDER BY id"):
            h.update(repr(row).encode())
    return h.hexdigest()
