"""Append-only audit log: every promotion, rollback, kept candidate, blocking gate failure and
sensor-triggered rerun, with when, what, why, which runs and which model version.

Two copies, the file being the record of truth:
  * JSONL at $DPO_AUDIT_LOG, else $DPO_HOME/audit/audit.jsonl (beside the artifact root). Each
    record is one line written with one O_APPEND write + fsync under an fcntl lock, so records
    from concurrent processes never interleave and a crash loses at most the record being written.
  * MLflow: one run per event in the experiment "dpo-driver-audit" (search it: `tags.audit.event =
    'rollback'`), plus the tag `audit.last_event` on the affected run (the DPO, pairs or SFT run).

    python -m dpo_driver.registry audit [--last N] [--json]
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from dpo_driver.io import dpo_home, file_lock
from dpo_driver.tracking import Tracker

EVENTS = ("promote", "rollback", "keep", "gate_failure", "rerun", "regression")
AUDIT_EXPERIMENT = "dpo-driver-audit"
MAX_REASON_CHARS = 1000  # the file keeps this much; MLflow tag values take up to 8000


def log_path() -> Path:
    return Path(os.environ.get("DPO_AUDIT_LOG") or dpo_home() / "audit" / "audit.jsonl")


def record(event: str, reason: str, tracker: Tracker | None = None, *, dagster_run_id: str | None = None,
           mlflow_run_id: str | None = None, model: str | None = None, version: str | int | None = None,
           details: dict | None = None, path: Path | None = None) -> dict:
    """Append one event to the JSONL log, then (given a tracker) to MLflow; returns the record.

    MLflow errors propagate: the line is already on disk, and the caller's failure says MLflow lacks it.
    """
    if event not in EVENTS:
        raise ValueError(f"audit event {event!r} is not one of {EVENTS}")
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "event": event,
        "reason": reason[:MAX_REASON_CHARS],
        "dagster_run_id": dagster_run_id,
        "mlflow_run_id": mlflow_run_id,
        "model": model,
        "version": None if version is None else str(version),
        "details": details or {},
        "actor": f"{getpass.getuser()}@{socket.gethostname()}",
    }
    append(path or log_path(), entry)
    if tracker is not None:
        _to_mlflow(tracker, entry)
    return entry


def append(path: Path, entry: dict) -> None:
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The lock is a separate file: flock on the log itself would also work, but a reader or a log
    # rotation replacing audit.jsonl would then hold a lock on a different inode.
    with file_lock(path.with_name(f".{path.name}.lock")):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a torn last line (power loss) stays alone on its line
            if os.write(fd, line) != len(line):
                raise OSError(f"short write to {path}: the audit line may be incomplete")
            os.fsync(fd)
        finally:
            os.close(fd)


def read(path: Path | None = None, last: int | None = None) -> list[dict]:
    """Records oldest first (the last `last` of them). A line that is not JSON raises, naming it."""
    path = Path(path or log_path())
    if not path.exists():
        return []
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not a JSON audit record ({e}); a write was torn there") from e
    return entries[-last:] if last else entries


def format_line(entry: dict) -> str:
    """`time event model vN run ids: reason` for a terminal."""
    model = f" {entry['model']} v{entry['version']}" if entry.get("version") else ""
    runs = " ".join(f"{k.split('_')[0]}={entry[k]}" for k in ("dagster_run_id", "mlflow_run_id") if entry.get(k))
    previous = entry.get("details", {}).get("previous")
    return (f"{entry['time']} {entry['event']:<12}{model}{f' (was v{previous})' if previous else ''}"
            f"{' ' + runs if runs else ''}: {entry['reason']}")


def _to_mlflow(tracker: Tracker, entry: dict) -> None:
    client = tracker.client
    audit = Tracker(tracker.tracking_uri, AUDIT_EXPERIMENT, tracker.artifact_location)
    tags = {"audit.event": entry["event"], "audit.reason": entry["reason"], "audit.time": entry["time"],
            "audit.actor": entry["actor"], "mlflow.note.content": entry["reason"]}
    for key in ("dagster_run_id", "mlflow_run_id", "model", "version"):
        if entry[key] is not None:
            tags[f"audit.{key}"] = entry[key]
    for key, value in entry["details"].items():
        tags[f"audit.details.{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    run = client.create_run(audit.experiment_id(), tags=tags, run_name=entry["event"])
    client.set_terminated(run.info.run_id, "FINISHED")
    if entry["mlflow_run_id"]:
        client.set_tag(entry["mlflow_run_id"], "audit.last_event",
                       f"{entry['time']} {entry['event']}: {entry['reason']}"[:5000])
