"""Atomic writes: a reader (or a rerun after a crash) sees the old output or the new one, never half."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> Path:
    """Write `data` to `path` via a temp file + rename; `mode` (e.g. 0o644) is applied before the
    rename, else the file keeps mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_rows(path: Path, what: str) -> Iterator[tuple[int, str, object]]:
    """(line number, "<what> <path> line <n>", parsed JSON) for each non-blank line of a user's JSONL
    file: the one reader behind demos and traces, so both name file and line the same way."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{what} {path} line {n}"
            try:
                yield n, where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from e


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a scratch directory beside `target`; on success it replaces `target` whole.

    On error the scratch directory is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` onto `dst`; `dst` is at every moment absent, the old folder, or the new one."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def dpo_home() -> Path:
    """The pipeline's local state folder (MLflow db, artifacts, audit log): $DPO_HOME, else ./.dpo_home.

    Here, not in resources/, so the Dagster-free modules (registry CLI, audit log) share the rule."""
    return Path(os.environ.get("DPO_HOME") or Path.cwd() / ".dpo_home").resolve()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[int]:
    """Hold an exclusive fcntl lock on `path` (created if missing) for the block; yields the fd.

    Advisory and per open file: every process that cooperates takes the same lock file. The
    kernel drops it when the process dies, so a killed holder never leaves it stuck."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing the last fd on the file releases the lock
