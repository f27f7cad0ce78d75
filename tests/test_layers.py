"""The top-level packages import each other in one direction only (no cycle):

    dpo_driver -> nothing of ours      resources -> dpo_driver
    sensors    -> dpo_driver, resources      dpo_assets -> any of them

and dpo_driver's entry points (the CLI, presets, IO helpers, registry) load without Dagster.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("dpo_driver", "resources", "sensors", "dpo_assets")
ALLOWED = {
    "dpo_driver": set(),
    "resources": {"dpo_driver"},
    "sensors": {"dpo_driver", "resources"},
    "dpo_assets": {"dpo_driver", "resources", "sensors"},
}


def imported_packages(path: Path) -> set[str]:
    """Our top-level packages that `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & set(OURS)
    return found


def test_package_import_graph_has_no_cycle():
    offenders = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = imported_packages(path) - allowed - {package}
            if bad:
                offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def fresh_import(module: str) -> dict:
    code = (f"import sys, json; import {module}; "
            "print(json.dumps({'ours': sorted({m.split('.')[0] for m in sys.modules} & set(%r)), "
            "'dagster': 'dagster' in sys.modules}))" % (OURS,))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", ["dpo_driver", "resources", "sensors"])
def test_each_package_imports_alone_in_a_fresh_interpreter(package):
    loaded = set(fresh_import(package)["ours"])
    assert loaded <= ALLOWED[package] | {package}, loaded


@pytest.mark.parametrize("module", ["dpo_driver.cli", "dpo_driver.runconfig", "dpo_driver.io", "dpo_driver.registry"])
def test_dpo_driver_entry_points_load_without_dagster(module):
    assert fresh_import(module) == {"ours": ["dpo_driver"], "dagster": False}
