"""`dpo-driver`: one command for the pipeline's entry points (installed by `pip install -e .`).

    dpo-driver run [--preset tiny|default]     materialize the whole DAG through Dagster (as scripts/run_pipeline.sh)
    dpo-driver bench NAME [ARGS...]            benchmarks/NAME.py (learning, suites, experts, throughput, soak)
    dpo-driver registry ARGS...                python -m dpo_driver.registry (champion, rollback, audit, ...)
    dpo-driver traces import ARGS...           python -m dpo_driver.traces import
    dpo-driver home init                       create $DAGSTER_HOME and $DPO_HOME/mlflow.db once (python -m resources.home init)

No Dagster import here: `run` and `home init` start the Dagster-side modules as child processes
(`dagster asset materialize -m dpo_assets.definitions`, `python -m resources.home`), so this
module, like the rest of dpo_driver, imports nothing from resources/, sensors/ or dpo_assets/.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

from dpo_driver.io import dpo_home

BENCHMARKS = ("learning", "suites", "experts", "throughput", "soak")
CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root of an editable install


def _state_env() -> dict[str, str]:
    """The environment run_pipeline.sh sets up: DPO_HOME (default ./.dpo_home), DAGSTER_HOME under it,
    and the Debian Chromium for MiniWoB++ when the variables are unset."""
    env = dict(os.environ)
    home = Path(env.get("DPO_HOME") or dpo_home()).resolve()
    env["DPO_HOME"] = str(home)
    env.setdefault("DAGSTER_HOME", str(home / "dagster"))
    for var, exe in (("MINIWOB_CHROME_BINARY", "chromium"), ("MINIWOB_CHROMEDRIVER", "chromedriver")):
        if not env.get(var) and shutil.which(exe):
            env[var] = shutil.which(exe)
    return env


def home_init(env: dict[str, str] | None = None) -> int:
    return subprocess.call([sys.executable, "-m", "resources.home", "init"], env=env or _state_env())


def run(preset_name: str, select: str) -> int:
    from dpo_driver.runconfig import preset

    config = preset(preset_name)  # an unknown name fails here, before anything starts
    env = _state_env()
    rc = home_init(env)  # Dagster + MLflow stores created once, under a lock
    if rc:
        return rc
    rc = subprocess.call([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dpo_assets.definitions",
                          "--select", select, "--config-json", json.dumps(config)], env=env)
    if rc:
        return rc
    reports = sorted(Path(env["DPO_HOME"], "artifacts", "evaluation_report").glob("*/report.md"),
                     key=lambda p: p.stat().st_mtime)
    if reports:
        print(f"\n== evaluation report ({preset_name} preset): {reports[-1]}\n{reports[-1].read_text()}")
    print(f"Dagster UI:  DAGSTER_HOME={env['DAGSTER_HOME']} DPO_HOME={env['DPO_HOME']} dg dev   (or bash scripts/ui.sh)")
    return 0


def bench(name: str, argv: list[str]) -> int:
    script = CHECKOUT / "benchmarks" / f"{name}.py"
    if not script.is_file():
        print(f"error: {script} not found: the benchmarks run from a checkout (pip install -e .)", file=sys.stderr)
        return 2
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))  # `benchmarks` and its imports resolve as when run from the checkout
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
    return 0


def _forward(module_main, argv: list[str]) -> int:
    return int(module_main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-driver", description="Environment-feedback DPO for web agents: the pipeline's commands.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="materialize the whole DAG on a preset through Dagster (as scripts/run_pipeline.sh)")
    p.add_argument("--preset", default="default", choices=("tiny", "default"),
                   help="default: the embedded SmolLM2-135M; tiny: a ~1M-parameter random model (plumbing check)")
    p.add_argument("--select", default="*", help="Dagster asset selection (default: every asset)")
    p = sub.add_parser("bench", help="run benchmarks/NAME.py with the arguments that follow (NAME --help for its own)")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    p = sub.add_parser("registry", help="the model registry: champion, history, promote, rollback, audit (python -m dpo_driver.registry)",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("traces", help="import logged agent traces as episodes (python -m dpo_driver.traces)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("home", help="local state: `home init` creates the Dagster and MLflow stores once, under a lock")
    p.add_argument("action", choices=("init",))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in ("registry", "traces"):  # all of the rest, --help included, is theirs
        if argv[0] == "registry":
            from dpo_driver.registry import main as forward
        else:
            from dpo_driver.traces import main as forward
        return _forward(forward, argv[1:])
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.preset, args.select)
    if args.command == "bench":
        return bench(args.name, args.args)
    return home_init()


if __name__ == "__main__":
    sys.exit(main())
