"""new_demos_sensor: a new or edited demos JSONL file runs the whole loop with SFT on that file.

Watches DPO_DEMOS_DIR (default $DPO_HOME/demos) for ``*.jsonl``. The run key is the file's
SHA-256, and the cursor keeps every hash seen: the same content never triggers twice (renamed or
copied files included), an edit does. Files modified in the last DPO_DEMOS_SETTLE_SECONDS
(default 5) wait a tick, so a file still being written is not trained on half-done.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from dpo_driver.demos import load_demos
from dpo_driver.runconfig import TRIGGER_TAG, preset, preset_name
from resources.environment import EnvironmentResource
from resources.home import dpo_home


def preset_environment():
    """The environment family the runs this sensor requests act in (the preset's `environment` resource)."""
    config = preset(preset_name())["resources"].get("environment", {}).get("config", {})
    return EnvironmentResource(**config).get()


def demos_dir() -> Path:
    return Path(os.environ.get("DPO_DEMOS_DIR") or dpo_home() / "demos").resolve()


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class DemosCursor:
    seen: set[str] = field(default_factory=set)  # content hashes already acted on
    stats: dict[str, list] = field(default_factory=dict)  # path -> [mtime_ns, size, sha256]: skip re-hashing

    @classmethod
    def parse(cls, text: str | None) -> DemosCursor:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(set(raw["seen"]), raw["stats"])

    def dump(self) -> str:
        return json.dumps({"seen": sorted(self.seen), "stats": self.stats}, sort_keys=True)


def scan_demos(folder: Path, cursor: DemosCursor, now: float, settle_s: float) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(new files with their hashes, files still settling); refreshes ``cursor.stats`` but not ``seen``."""
    new, settling, stats = [], [], {}
    for path in sorted(folder.glob("*.jsonl")):
        try:
            st = path.stat()
        except FileNotFoundError:  # deleted between listing and stat
            continue
        if now - st.st_mtime < settle_s:
            settling.append(path)
            continue
        cached = cursor.stats.get(str(path))
        digest = cached[2] if cached and cached[:2] == [st.st_mtime_ns, st.st_size] else content_hash(path)
        stats[str(path)] = [st.st_mtime_ns, st.st_size, digest]
        if digest not in cursor.seen and digest not in {d for _, d in new}:
            new.append((path, digest))
    cursor.stats = stats
    return new, settling


def demos_run_config(path: Path) -> dict:
    config = preset(preset_name())
    sft = config.setdefault("ops", {}).setdefault("sft_adapter", {}).setdefault("config", {})
    sft["demos_path"] = str(path)
    return config


@dg.sensor(name="new_demos_sensor", job_name="dpo_loop", minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.STOPPED)
def new_demos_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """A new or changed *.jsonl in the demos folder runs the whole loop (dpo_loop) with SFT on it."""
    folder = demos_dir()
    if not folder.is_dir():
        return dg.SkipReason(f"demos folder {folder} does not exist: create it and drop *.jsonl files there "
                             "(or set DPO_DEMOS_DIR to watch another folder)")
    cursor = DemosCursor.parse(context.cursor)
    new, settling = scan_demos(folder, cursor, time.time(), float(os.environ.get("DPO_DEMOS_SETTLE_SECONDS", "5")))
    requests = []
    for path, digest in new:
        cursor.seen.add(digest)  # an invalid file is not retried until its content changes
        try:
            if not load_demos(path, preset_environment()):
                raise ValueError("it holds no demos")
        except ValueError as e:
            context.log.error(f"demos file {path} not used: {e}")
            continue
        context.log.info(f"new demos {path} (sha256 {digest[:12]}): requesting dpo_loop")
        requests.append(dg.RunRequest(run_key=digest, run_config=demos_run_config(path),
                                      tags={TRIGGER_TAG: "new_demos", "dpo/demos_file": str(path),
                                            "dpo/demos_sha256": digest}))
    skip = None if requests else (f"no new demos in {folder}"
                                  + (f"; {len(settling)} file(s) still being written" if settling else ""))
    return dg.SensorResult(run_requests=requests, skip_reason=skip, cursor=cursor.dump())
