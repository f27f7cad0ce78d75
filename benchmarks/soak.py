"""Soak: many episodes with the driver killed now and then; browser processes and memory must stay flat.

Runs a random valid-action policy through rollouts.run_episodes (the sequential loop, one browser
per task) for `--episodes` episodes, killing chromedriver every `--kill-every` episodes, and reports
the number of Chromium/chromedriver processes and their resident memory at the start and the end
(after the last browser closed) and the peak in between. Prints a table and writes JSON.

    python benchmarks/soak.py --episodes 1000 --kill-every 200 --json benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpo_driver.env import WebEnv  # noqa: E402
from dpo_driver.families.miniwob import MiniWoB  # noqa: E402
from dpo_driver.io import atomic_write_text  # noqa: E402
from dpo_driver.policy import RandomPolicy, Sampling  # noqa: E402
from dpo_driver.rollouts import run_episodes  # noqa: E402
from dpo_driver.tasks import seeds_for  # noqa: E402


def browser_processes() -> tuple[int, float]:
    """(count, resident MiB) of the Chromium / chromedriver processes this run is answerable for: its
    descendants, plus orphans (parent PID 1), where a leaked browser ends up. Other jobs' browsers
    on the machine are not counted."""
    me = psutil.Process()
    procs = {p.pid: p for p in me.children(recursive=True)}
    for p in psutil.process_iter(["ppid"]):
        if p.info["ppid"] == 1:
            procs.setdefault(p.pid, p)
    n, rss = 0, 0
    for p in procs.values():
        try:
            if "chrom" in p.name().lower() and p.status() != psutil.STATUS_ZOMBIE:
                n += 1
                rss += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return n, round(rss / 2**20, 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--kill-every", type=int, default=200)
    ap.add_argument("--task", default="click-button")
    ap.add_argument("--json", default="benchmarks/results/soak.json")
    args = ap.parse_args(argv)

    start = browser_processes()
    resets = {"n": 0, "kills": 0, "peak": start}
    real_reset = WebEnv.reset

    def reset_and_sometimes_kill(self, seed):
        out = real_reset(self, seed)
        resets["n"] += 1
        resets["peak"] = max(resets["peak"], browser_processes())
        if resets["n"] % args.kill_every == 0:
            self._driver().service.process.kill()  # the driver dies under a live page, as in a real crash
            resets["kills"] += 1
        return out

    WebEnv.reset = reset_and_sometimes_kill
    t0 = time.perf_counter()
    try:
        env = MiniWoB()
        eps = run_episodes(RandomPolicy(env), env, [args.task], seeds_for("rollout", args.episodes), 1, Sampling(), max_steps=2,
                           policy_name="random")
    finally:
        WebEnv.reset = real_reset
    time.sleep(2)  # crashpad handlers exit on their own a moment after their browser
    end = browser_processes()
    res = {"command": " ".join(shlex.quote(a) for a in sys.argv), "episodes": len(eps),
           "env_errors": sum(e["env_error"] for e in eps), "driver_kills": resets["kills"],
           "browser_processes": {"start": start[0], "peak": resets["peak"][0], "end": end[0]},
           "browser_rss_mib": {"start": start[1], "peak": resets["peak"][1], "end": end[1]},
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    print(f"\n{res['command']}\n")
    print(f"{'':<22}{'start':>8}{'peak':>8}{'end':>8}")
    print(f"{'browser processes':<22}" + "".join(f"{res['browser_processes'][k]:>8}" for k in ("start", "peak", "end")))
    print(f"{'browser RSS (MiB)':<22}" + "".join(f"{res['browser_rss_mib'][k]:>8}" for k in ("start", "peak", "end")))
    print(f"\n{res['episodes']} episodes, {res['driver_kills']} drivers killed, {res['env_errors']} episodes flagged env_error, "
          f"{res['wall_seconds']} s")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
