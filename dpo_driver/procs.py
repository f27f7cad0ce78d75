"""The browser processes an environment started, so it can end them even when the driver is dead.

Chromium is a child of chromedriver. When chromedriver dies, Selenium's `quit()` has nobody to
talk to and Chromium lives on as an orphan (parent PID 1) with its renderers, about 1 GB
resident; a long rollout with occasional driver crashes would grow without bound. The PIDs are
recorded while the driver is alive, and the whole tree below them is killed on close or crash.
"""

from __future__ import annotations

import psutil


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
    psutil.wait_procs(list(victims.values()), timeout=timeout)
    return sorted(victims)


def _is_browser(p: psutil.Process) -> bool:
    try:
        name = p.name().lower()
    except psutil.NoSuchProcess:
        return False
    return "chrom" in name
