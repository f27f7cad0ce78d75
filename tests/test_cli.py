"""`dpo-driver` (dpo_driver/cli.py): every subcommand's help, and forwarding to the modules it fronts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_driver import cli


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse --help and usage errors
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_top_level_help_lists_every_subcommand(capsys):
    rc, out, _ = run_main(capsys, "--help")
    assert rc == 0
    for command in ("run", "bench", "registry", "traces", "home"):
        assert command in out


@pytest.mark.parametrize("argv, expect", [
    (["run", "--help"], "--preset"),
    (["bench", "--help"], "learning"),
    (["home", "--help"], "init"),
    (["registry", "--help"], "rollback"),  # the registry's own help: forwarded whole
    (["traces", "--help"], "import"),
    (["traces", "import", "--help"], "--mlflow"),
])
def test_each_subcommand_has_help(capsys, argv, expect):
    rc, out, _ = run_main(capsys, *argv)
    assert rc == 0 and expect in out


def test_bench_forwards_arguments_to_the_benchmark_script(capsys):
    rc, out, _ = run_main(capsys, "bench", "experts", "--help")  # benchmarks/experts.py's own argparse
    assert rc == 0 and "usage:" in out and "experts" in out


def test_unknown_preset_and_benchmark_are_usage_errors(capsys):
    assert run_main(capsys, "run", "--preset", "huge")[0] == 2
    assert run_main(capsys, "bench", "nonsense")[0] == 2


def test_registry_audit_on_an_empty_home_prints_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_HOME", str(tmp_path / "home"))
    rc, out, err = run_main(capsys, "registry", "audit", "--json")
    assert rc == 0 and out == "" and err == ""
    # Commands that need the MLflow store say where they looked.
    with pytest.raises(SystemExit, match="no MLflow store"):
        cli.main(["registry", "champion"])


def test_traces_import_forwards_and_keeps_exit_codes(capsys, tmp_path):
    traces = tmp_path / "traces.jsonl"
    rows = [{"trace_id": f"t{i}", "task": "support", "item": 1, "success": ok,
             "steps": [{"prompt": "support 1 state 0", "output": out}]} for i, (ok, out) in enumerate([(True, "A"), (False, "B")])]
    traces.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_path = tmp_path / "episodes.jsonl"
    rc, out, _ = run_main(capsys, "traces", "import", str(traces), "--out", str(out_path))
    assert rc == 0 and out_path.is_file() and len(out_path.read_text().splitlines()) == 2
    assert json.loads(out.strip().splitlines()[-1])["path"] == str(out_path)
    traces.write_text('{"trace_id": "x"}\n')
    rc, _, err = run_main(capsys, "traces", "import", str(traces), "--out", str(tmp_path / "bad.jsonl"))
    assert rc == 2 and "line 1" in err and not (tmp_path / "bad.jsonl").exists()


def test_installed_console_script_runs_home_init(tmp_path):
    script = Path(sys.executable).parent / "dpo-driver"
    assert script.is_file(), "pip install -e . installs the dpo-driver console script"
    env = {**os.environ, "DPO_HOME": str(tmp_path / "home")}
    env.pop("DAGSTER_HOME", None)
    proc = subprocess.run([str(script), "home", "init"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "home" / "mlflow.db").is_file() and (tmp_path / "home" / "dagster" / "dagster.yaml").is_file()
