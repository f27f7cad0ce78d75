"""MLflow model registry for DPO adapters: register, promote, roll back, with an alias history.

Each DPO adapter (the run's ``adapter/`` artifact folder) becomes a version of one registered
model. The alias ``champion`` names the version the rollouts act with; it moves only through
``promote`` and ``rollback`` here, which append to a JSON history kept as a registered-model tag
(newest last) and tag the versions involved. Stages are deprecated in MLflow 3: aliases only.

Everything goes through the tracker's ``MlflowClient`` (never the fluent API; see tracking.py).
One writer at a time is assumed: the history tag is read-modify-write.

Rollback from a shell (MLFLOW_TRACKING_URI, else the SQLite store in $DPO_HOME):
    python -m dpo_driver.registry rollback [--to VERSION] [--reason TEXT]
    python -m dpo_driver.registry history | champion
    python -m dpo_driver.registry audit [--last N] [--json]   # the audit log (dpo_driver/audit.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from dpo_driver import audit
from dpo_driver.io import dpo_home
from dpo_driver.tracking import Tracker

MODEL_NAME = "dpo-driver-policy"
CHAMPION = "champion"
HISTORY_TAG = "champion_history"
# MLflow stores registered-model tag values in a String(5000) column; the history keeps the
# newest entries that fit. Each version's own tags (champion_since/until/reason) are not capped.
MAX_HISTORY_CHARS = 5000
MAX_REASON_CHARS = 300


def register_adapter(tracker: Tracker, run_id: str, artifact_path: str = "adapter", name: str = MODEL_NAME,
                     tags: dict | None = None) -> ModelVersion:
    """New version of ``name`` whose source is ``artifact_path`` of MLflow run ``run_id``.

    Creates the registered model on first use. Raises ValueError when the run has no such artifact.
    """
    client = tracker.client
    run = client.get_run(run_id)  # raises RESOURCE_DOES_NOT_EXIST with the id in the message
    if not client.list_artifacts(run_id, artifact_path):
        raise ValueError(f"MLflow run {run_id} has no artifacts under {artifact_path!r}; "
                         "log the adapter folder there (StageRun.log_artifacts(dir, 'adapter')) before registering")
    try:
        client.create_registered_model(name, description="DPO LoRA adapters; alias 'champion' = the policy in use")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    version_tags = {"artifact_path": artifact_path, **{k: str(v) for k, v in (tags or {}).items()}}
    return client.create_model_version(name, source, run_id=run_id, tags=version_tags)


def champion(tracker: Tracker, name: str = MODEL_NAME) -> ModelVersion | None:
    """The version the alias ``champion`` points at; None when nothing was ever promoted."""
    model = _registered_model(tracker, name)
    if model is None or CHAMPION not in model.aliases:
        return None
    return tracker.client.get_model_version(name, str(model.aliases[CHAMPION]))


def adapter_dir(tracker: Tracker, version: ModelVersion, dst: str | Path | None = None) -> Path:
    """Local folder of a version's adapter: the source itself on a local store, else a download into ``dst``."""
    parsed = urlparse(version.source)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
        if not path.is_dir():
            raise FileNotFoundError(f"{version.name} v{version.version}: adapter folder {path} is gone; "
                                    "restore the MLflow artifact store or roll back to another version")
        return path
    if dst is None:
        raise ValueError(f"{version.name} v{version.version} lives at {version.source}; pass dst to download it")
    artifact = version.tags.get("artifact_path", "adapter")
    return Path(tracker.client.download_artifacts(version.run_id, artifact, str(dst)))


def champion_adapter_dir(tracker: Tracker, name: str = MODEL_NAME, dst: str | Path | None = None) -> Path | None:
    """Local adapter folder of the champion, or None when there is none."""
    version = champion(tracker, name)
    return None if version is None else adapter_dir(tracker, version, dst)


@dataclass(frozen=True)
class Acting:
    """The policy rollouts act with: its adapter folder, its role ("sft" or "champion", the name its
    episodes carry) and why it was chosen."""

    adapter_dir: Path
    role: str
    reason: str

    @property
    def label(self) -> str:
        return f"{self.role} ({self.reason})"


def acting_adapter(tracker: Tracker, fallback_dir: str | Path, base_model: str, name: str = MODEL_NAME,
                   dst: str | Path | None = None) -> Acting:
    """The policy the rollouts act with: the champion if it was trained on ``base_model`` (its
    ``base_model`` tag), else ``fallback_dir`` (the SFT adapter), saying which and why."""
    best = champion(tracker, name)
    if best is None:
        return Acting(Path(fallback_dir), "sft", "no champion yet")
    trained_on = best.tags.get("base_model")
    if trained_on != base_model:
        return Acting(Path(fallback_dir), "sft", f"champion v{best.version} was trained on base model {trained_on!r}, not {base_model!r}")
    return Acting(adapter_dir(tracker, best, dst), "champion", f"v{best.version}")


def record_evaluation(tracker: Tracker, dpo_run_id: str, decision: str, reason: str, base_model: str,
                      tags: dict | None = None, name: str = MODEL_NAME) -> ModelVersion:
    """Register the evaluated DPO adapter (always, so every candidate is on record) and move
    ``champion`` to it only when ``decision`` is "promote". Either way the audit log says so
    (a "promote" from ``_move``, else a "keep"); ``tags["dagster_run_id"]`` names the run there."""
    tags = tags or {}
    version = register_adapter(tracker, dpo_run_id, name=name, tags={**tags, "decision": decision, "base_model": base_model})
    if decision == "promote":
        return promote(tracker, name, version.version, reason, dagster_run_id=tags.get("dagster_run_id"))
    current = champion(tracker, name)
    audit.record("keep", f"evaluation decided {decision!r}: {reason}", tracker, dagster_run_id=tags.get("dagster_run_id"),
                 mlflow_run_id=dpo_run_id, model=name, version=version.version,
                 details={"decision": decision, "champion": None if current is None else str(current.version)})
    return version


def promote(tracker: Tracker, name: str, version: str | int, reason: str, dagster_run_id: str | None = None) -> ModelVersion:
    """Move ``champion`` to ``version`` and record why. Promoting the current champion changes nothing."""
    return _move(tracker, name, str(version), reason, "promote", dagster_run_id)


def rollback(tracker: Tracker, name: str = MODEL_NAME, to_version: str | int | None = None,
             reason: str = "manual rollback", dagster_run_id: str | None = None) -> ModelVersion:
    """Point ``champion`` back to the champion before the current one (or to ``to_version``).

    Repeated rollbacks walk further back through the promotions recorded in the history.
    """
    current = champion(tracker, name)
    if current is None:
        raise ValueError(f"registered model {name!r} has no {CHAMPION!r} alias: nothing to roll back")
    if to_version is None:
        stack = _champion_stack(alias_history(tracker, name))
        while stack and stack[-1] == str(current.version):
            stack.pop()
        if not stack:
            raise ValueError(f"{name} v{current.version} is the first recorded champion: no earlier one to roll "
                             "back to; pass to_version (python -m dpo_driver.registry rollback --to VERSION)")
        to_version = stack[-1]
    if str(to_version) == str(current.version):
        raise ValueError(f"{name} v{to_version} already is the champion")
    return _move(tracker, name, str(to_version), reason, "rollback", dagster_run_id)


def alias_history(tracker: Tracker, name: str = MODEL_NAME) -> list[dict]:
    """Every recorded move of ``champion``, oldest first: {time, action, version, previous, reason}.

    Versions are strings here (MLflow's ModelVersion.version is an int in 3.x, a string in 2.x).
    """
    model = _registered_model(tracker, name)
    if model is None:
        return []
    return json.loads(model.tags.get(HISTORY_TAG, "[]"))


def _move(tracker: Tracker, name: str, version: str, reason: str, action: str,
          dagster_run_id: str | None = None) -> ModelVersion:
    client = tracker.client
    target = client.get_model_version(name, version)  # raises RESOURCE_DOES_NOT_EXIST naming model and version
    previous = champion(tracker, name)
    if previous is not None and str(previous.version) == version:
        return target
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    reason = reason[:MAX_REASON_CHARS]
    client.set_registered_model_alias(name, CHAMPION, version)
    entry = {"time": now, "action": action, "version": version,
             "previous": str(previous.version) if previous else None, "reason": reason}
    history = alias_history(tracker, name) + [entry]
    while len(history) > 1 and len(json.dumps(history)) > MAX_HISTORY_CHARS:
        history.pop(0)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    for key, value in {"champion_since": now, "champion_action": action, "champion_reason": reason}.items():
        client.set_model_version_tag(name, version, key, value)
    if previous is not None:
        client.set_model_version_tag(name, str(previous.version), "champion_until", now)
    # After the move: the log never claims a move the registry did not make.
    audit.record(action, reason, tracker, dagster_run_id=dagster_run_id, mlflow_run_id=target.run_id, model=name,
                 version=version, details={"previous": entry["previous"]})
    return client.get_model_version(name, version)


def _registered_model(tracker: Tracker, name: str):
    try:
        return tracker.client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _champion_stack(history: list[dict]) -> list[str]:
    """Replay the history: a promote pushes its version; a rollback to v pops back to v (or pushes it)."""
    stack: list[str] = []
    for entry in history:
        version = entry["version"]
        if entry["action"] == "rollback" and version in stack:
            del stack[len(stack) - stack[::-1].index(version):]
        else:
            stack.append(version)
    return stack


def tracker_from_env() -> Tracker:
    """MLFLOW_TRACKING_URI if set, else the embedded store in $DPO_HOME (default ./.dpo_home)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return Tracker(uri)
    home = dpo_home()
    if not (home / "mlflow.db").is_file():
        raise SystemExit(f"no MLflow store at {home / 'mlflow.db'}: set DPO_HOME to the pipeline's state folder "
                         "or MLFLOW_TRACKING_URI to the tracking server")
    return Tracker.local(home)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_driver.registry", description=__doc__.split("\n")[0])
    parser.add_argument("--name", default=MODEL_NAME, help="registered model name")
    commands = parser.add_subparsers(dest="command", required=True)
    back = commands.add_parser("rollback", help="point 'champion' back to the previous champion")
    back.add_argument("--to", dest="to_version", help="version to point 'champion' at instead")
    back.add_argument("--reason", default="manual rollback (CLI)")
    up = commands.add_parser("promote", help="point 'champion' at a version")
    up.add_argument("version")
    up.add_argument("--reason", default="manual promotion (CLI)")
    commands.add_parser("champion", help="print the champion version and its adapter folder")
    commands.add_parser("history", help="print the alias history as JSON lines, oldest first")
    log = commands.add_parser("audit", help=f"print the audit log ({audit.log_path()}), oldest first")
    log.add_argument("--last", type=int, default=None, metavar="N", help="only the newest N records")
    log.add_argument("--json", action="store_true", help="JSON lines instead of one readable line per record")
    args = parser.parse_args(argv)
    if args.command == "audit":  # the file alone: no MLflow store needed
        for entry in audit.read(last=args.last):
            print(json.dumps(entry, sort_keys=True) if args.json else audit.format_line(entry))
        return 0
    tracker = tracker_from_env()
    try:
        if args.command == "rollback":
            before = champion(tracker, args.name)
            now = rollback(tracker, args.name, args.to_version, args.reason)
            print(f"{args.name}: champion v{before.version} -> v{now.version} ({now.source})")
        elif args.command == "promote":
            now = promote(tracker, args.name, args.version, args.reason)
            print(f"{args.name}: champion is v{now.version} ({now.source})")
        elif args.command == "champion":
            now = champion(tracker, args.name)
            print(f"{args.name}: no champion" if now is None else f"{args.name}: v{now.version} {now.source}")
        else:
            for entry in alias_history(tracker, args.name):
                print(json.dumps(entry))
    except (ValueError, MlflowException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
