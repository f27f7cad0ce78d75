"""The browser processes an environment started, so it can end them even when the driver is dead.

Chromium is a child of chromedriver. When chromedriver dies, Selenium's `quit()` has nobody to
talk to and Chromium lives on as an orphan (parent PID 1) with its renderers, about 1 GB
resident; a long rollout with occasional driver crashes would grow without bound. The PIDs are
recorded while the driver is alive, and the whole tree below them is killed on close or crash.
Killed that way, neither removes the temporary directories it would on a normal exit
(chromedriver's profile, Chromium's singleton socket directory): `browser_dirs` records them too.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import psutil

# What chromedriver (profile) and Chromium (process-singleton socket) name their temporary
# directories; only directories named so, directly in the temp folder, are ever removed.
_TEMP_DIR = re.compile(r"^\.?org\.chromium\.Chromium\.[\w.]+$")


def browser_pids(driver) -> list[int]:
    """chromedriver's PID and its direct children's (the Chromium main process), read at start."""
    proc = getattr(getattr(driver, "service", None), "process", None)
    if proc is None:
        return []
    root = psutil.Process(proc.pid)
    return [root.pid] + [c.pid for c in root.children()]


def browser_tree(pids: list[int]) -> list[psutil.Process]:
    """The recorded processes that are still the browser or its driver, and all their descendants.

    A PID recorded earlier may since have been reused by an unrelated process: only processes
    still named like the browser or its driver are roots. psutil.Process objects remember their
    start time, so killing one later never hits a reused PID.
    """
    tree: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if not _is_browser(p):
                continue
            for q in [p, *p.children(recursive=True)]:
                tree[q.pid] = q
        except psutil.NoSuchProcess:
            continue
    return list(tree.values())


def kill_tree(pids: list[int], timeout: float = 5.0, also: list[psutil.Process] = ()) -> list[int]:
    """SIGKILL every recorded process and all its descendants, and `also` (a tree snapshotted
    earlier: children orphaned since, e.g. when quit() killed their parent, are no longer anyone's
    descendants); returns the PIDs that were killed or waited for."""
    victims = {q.pid: q for q in [*also, *browser_tree(pids)]}
    for q in victims.values():
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    wait_ended(list(victims.values()), timeout)
    return sorted(victims)


def wait_ended(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has ended; returns those still running at the timeout.

    A zombie that is not our child counts as ended: it holds nothing but its PID, and only its
    parent can reap it. Chromium's processes are orphaned when chromedriver exits and go to init,
    which may reap only now and then (here about once a second), and psutil's wait_procs waits
    for the reaping: 1.1 s of every closed browser was spent there. Our own children (chromedriver)
    are reaped here, so none is left a zombie.
    """
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while True:
        pending = [q for q in pending if not _ended(q)]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.01)


def _ended(q: psutil.Process) -> bool:
    try:
        if q.ppid() == os.getpid():
            q.wait(timeout=0)  # reaps our own child, or raises while it runs
            return True
        return q.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False


def _is_browser(p: psutil.Process) -> bool:
    try:
        name = p.name().lower()
    except psutil.NoSuchProcess:
        return False
    return "chrom" in name


def browser_dirs(pids: list[int]) -> list[Path]:
    """The temporary directories the recorded browser uses: its profile (`--user-data-dir`, which
    chromedriver made) and the directory its profile's SingletonSocket link points into. Read at
    start, while both exist; a profile the user named (not a temp directory) is never listed."""
    dirs: list[Path] = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            cmdline = p.cmdline() if _is_browser(p) else []
        except psutil.Error:
            continue
        for arg in cmdline:
            if arg.startswith("--user-data-dir="):
                profile = Path(arg.split("=", 1)[1])
                dirs.append(profile)
                try:
                    dirs.append(Path(os.readlink(profile / "SingletonSocket")).parent)
                except OSError:  # not made yet, or no singleton: nothing more to record
                    pass
    return [d for d in dict.fromkeys(dirs) if _is_temp_browser_dir(d)]


def remove_dirs(dirs: list[Path]) -> None:
    """Remove the recorded temporary directories (after the processes using them are dead)."""
    for d in dirs:
        if _is_temp_browser_dir(d):
            shutil.rmtree(d, ignore_errors=True)


def _is_temp_browser_dir(d: Path) -> bool:
    return d.parent == Path(tempfile.gettempdir()) and bool(_TEMP_DIR.match(d.name))


def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill`, a job scheduler's stop) raise SystemExit, where nobody else handles it.

    Python's default for SIGTERM ends the process without unwinding, so no `with` block closes its
    browser and chromedriver and Chromium live on under PID 1. As SystemExit, the sessions' context
    managers run. Only in the main thread (the only one that may set handlers), and never over a
    handler someone installed (Dagster's, a caller's)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def restore_stop_signals() -> None:
    """At a process's start: SIGINT and SIGTERM back to Python's defaults where they arrive ignored.

    Ignored dispositions survive exec, and a shell ignores SIGINT for a command it starts in the
    background (`dagster ... &`, nohup); Dagster then maps SIGTERM onto SIGINT's handler, so every
    process it starts inherits both ignored (measured: a backgrounded pytest run's workers had SIGTERM
    ignored after an in-process Dagster run). A trainer must stop when Pipes interrupts it (SIGINT) or
    a scheduler terminates it (SIGTERM); ignoring both would keep it training after its run was cancelled."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
