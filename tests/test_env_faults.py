"""A crashed browser is an infrastructure fault: flagged on its episode, the browser restarted, nothing else lost."""

from pathlib import Path

import pytest

from dpo_driver import rollouts
from dpo_driver.env import EnvCrashed, WebEnv
from dpo_driver.policy import RandomPolicy, Sampling
from dpo_driver.tasks import seeds_for


def test_killed_chromedriver_is_flagged_and_the_next_episode_runs(monkeypatch, miniwob):
    seeds = seeds_for("rollout", 3)
    calls = {"n": 0}
    real_reset = WebEnv.reset

    def reset_then_kill_once(self, seed):
        out = real_reset(self, seed)
        calls["n"] += 1
        if calls["n"] == len(seeds) + 2:  # the replay of the second seed: kill the driver under it
            self._env.unwrapped.instance.driver.service.process.kill()
        return out

    monkeypatch.setattr(WebEnv, "reset", reset_then_kill_once)
    eps = rollouts.run_episodes(RandomPolicy(miniwob), miniwob, ["click-button"], seeds, 1, Sampling(), max_steps=2, policy_name="random")
    assert [e["env_error"] for e in eps] == [False, True, False]
    crashed = eps[1]
    assert crashed["reward"] is None and crashed["steps"] == [] and "browser failed" in crashed["error"]
    assert eps[2]["num_steps"] >= 1 and eps[2]["reward"] is not None  # a fresh browser took over


def test_a_browser_that_keeps_crashing_stops_the_run(monkeypatch, miniwob):
    def always_crash(self, action):
        raise EnvCrashed("browser failed on step: simulated")

    monkeypatch.setattr(WebEnv, "step", always_crash)
    with pytest.raises(EnvCrashed, match="crashed 3 times in a row"):
        rollouts.run_episodes(RandomPolicy(miniwob), miniwob, ["click-button"], seeds_for("rollout", 4), 1, Sampling(), max_steps=2)


def test_a_crashed_branch_or_expert_start_keeps_what_it_was(monkeypatch, miniwob):
    """The crashed record keeps the episode's extras (branch_of, expert_prefix), one-at-a-time and batched,
    so the rollouts' metadata still counts a crashed expert start as one."""
    from dpo_driver.batched import play_batched

    def always_crash(self, action):
        raise EnvCrashed("browser failed on step: simulated")

    monkeypatch.setattr(WebEnv, "step", always_crash)
    seed = seeds_for("rollout", 1)[0]
    policy = RandomPolicy(miniwob)
    spec = rollouts.EpisodeSpec("click-button", seed, 4)
    with miniwob.open("click-button") as session:
        one = rollouts.CrashGuard("click-button").play(miniwob, session, policy, spec, [], Sampling(), 2, "p", expert_prefix=2)
    [batched] = play_batched(miniwob, policy, [(spec, [], {"branch_of": "p:click-button:1:0", "branch_step": 1})], Sampling(), 2, "p", 1)
    assert one["env_error"] and one["expert_prefix"] == 2 and one["episode_id"] == f"p:click-button:{seed}:4"
    assert batched["env_error"] and (batched["branch_of"], batched["branch_step"]) == ("p:click-button:1:0", 1)


def _alive(procs) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_a_killed_driver_leaves_no_browser_behind():
    """chromedriver killed under a live page: its Chromium (and renderers) must not outlive the env."""
    import psutil

    env = WebEnv("click-button")
    env.reset(seeds_for("rollout", 1)[0])
    driver_pid = env._driver().service.process.pid
    chrome = [psutil.Process(p) for p in env._pids if p != driver_pid]
    assert chrome and all("chrom" in p.name().lower() for p in chrome)
    tree = chrome + [c for p in chrome for c in p.children(recursive=True)]
    assert len(_alive(tree)) >= 2  # the browser and at least one of its helpers
    dirs = list(env._dirs)  # chromedriver's temp profile and Chromium's singleton-socket directory
    assert len(dirs) == 2 and all(d.is_dir() for d in dirs)
    env._driver().service.process.kill()
    with pytest.raises(EnvCrashed):
        env.reset(seeds_for("rollout", 1)[0])
    assert _alive(tree) == []
    assert not any(d.exists() for d in dirs)  # killed processes clean nothing up themselves
    env.close()


def test_close_ends_the_browser_tree():
    import psutil

    with WebEnv("click-button") as env:
        env.reset(seeds_for("rollout", 1)[0])
        tree = [psutil.Process(p) for p in env._pids]
        tree += [c for p in tree for c in p.children(recursive=True)]
        dirs = list(env._dirs)
    assert _alive(tree) == []
    assert dirs and not any(d.exists() for d in dirs)  # one leaked per browser before (837 in /tmp after a day)


def test_only_temporary_browser_directories_are_ever_removed(tmp_path):
    import tempfile
    from pathlib import Path

    from dpo_driver.procs import remove_dirs

    mine = tmp_path / "org.chromium.Chromium.abc123"  # the right name, but not in the temp folder
    mine.mkdir()
    theirs = Path(tempfile.mkdtemp(prefix="profile-"))  # in the temp folder, not a browser's name
    remove_dirs([mine, theirs])
    assert mine.is_dir() and theirs.is_dir()
    theirs.rmdir()


def test_the_episode_clock_does_not_fail_a_slow_policy():
    """A policy that takes longer than MiniWoB's 10 s per episode (a loaded CPU) still succeeds."""
    import time

    from dpo_driver.experts import expert_action

    env = WebEnv("click-button")
    obs, fields = env.reset(seeds_for("rollout", 1)[0])
    time.sleep(10.5)  # MiniWoB's own clock would have ended the episode as failed by now
    result = env.step(expert_action("click-button", fields, obs, []))
    env.close()
    assert result.done and result.raw_reward == 1.0


def _as_a_shell_starts_it():
    """Run in the child before exec: SIGTERM at its default and no signal blocked. Both a handler set
    to SIG_IGN and a blocked mask survive exec, so whatever this pytest worker was left with by the
    tests before (in-process Dagster runs remap SIGTERM) would otherwise decide what the child does."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def test_a_terminated_process_closes_its_browser(tmp_path):
    """SIGTERM to a process with a live page (a stopped benchmark or CLI run) must not orphan the browser."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "hold.py"
    script.write_text(
        "import faulthandler, signal, sys, time\n"
        "faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it hangs, if it does\n"
        "from dpo_driver.env import WebEnv\n"
        "with WebEnv('click-button') as env:\n"
        "    env.reset(1000000)\n"
        "    print(' '.join(map(str, env._pids)), flush=True)\n"
        "    time.sleep(120)\n")
    stderr = (tmp_path / "stderr.txt").open("w")  # a file, not a pipe: nothing the child writes can block it
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=stderr, text=True,
                            cwd=str(Path(__file__).resolve().parents[1]), preexec_fn=_as_a_shell_starts_it)
    pids = [int(p) for p in proc.stdout.readline().split()]
    tree = [psutil.Process(p) for p in pids]
    tree += [c for p in tree for c in p.children(recursive=True)]
    try:
        assert len(_alive(tree)) >= 2
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            pytest.fail("the SIGTERMed process did not exit in 60 s; its threads:\n" + (tmp_path / "stderr.txt").read_text()[-6000:])
        assert code == 128 + signal.SIGTERM
        deadline = time.time() + 10
        while _alive(tree) and time.time() < deadline:
            time.sleep(0.2)
        assert _alive(tree) == []
    finally:  # a failing run must not leave its own orphans behind
        proc.kill()
        stderr.close()
        for p in _alive(tree):
            p.kill()


def test_a_browser_that_will_not_quit_is_killed_after_the_bound(monkeypatch):
    """Selenium's quit() may wait ~100 s for a busy chromedriver; closing waits QUIT_SECONDS, then kills."""
    import threading
    import time

    from dpo_driver import env as env_module

    class StuckBrowser:
        released = threading.Event()

        def close(self):
            self.released.wait(30)  # a quit() that hangs until its driver is killed

    killed = []
    monkeypatch.setattr(env_module, "QUIT_SECONDS", 0.5)
    monkeypatch.setattr(env_module, "kill_tree", lambda pids, also=(): (killed.append(pids), StuckBrowser.released.set()))
    web = WebEnv("click-button")
    web._env, web._pids = StuckBrowser(), [123]
    t0 = time.perf_counter()
    web.close()
    assert time.perf_counter() - t0 < 5 and killed == [[123]] and web._env is None


def test_a_trainer_started_with_stop_signals_ignored_still_stops(tmp_path):
    """Started from a backgrounded shell, a process inherits SIGINT (and, under Dagster, SIGTERM)
    ignored; the trainer's entry point restores both, so Pipes' SIGINT and a SIGTERM stop it."""
    import signal
    import subprocess
    import sys

    def ignored():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    code = ("import signal, sys, time\n"
            "from dpo_driver.procs import restore_stop_signals\n"
            "if sys.argv[1] == 'restore': restore_stop_signals()\n"
            "print('ready', flush=True)\n"
            "time.sleep(30)\n")
    outcomes = {}
    for mode in ("restore", "inherit"):
        for sig in (signal.SIGINT, signal.SIGTERM):
            proc = subprocess.Popen([sys.executable, "-c", code, mode], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    cwd=str(Path(__file__).resolve().parents[1]), preexec_fn=ignored)
            assert proc.stdout.readline().strip() == "ready"
            proc.send_signal(sig)
            try:
                outcomes[mode, sig] = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                outcomes[mode, sig] = "ignored"
            finally:
                proc.kill()
                proc.wait()
    assert outcomes[("restore", signal.SIGINT)] == -signal.SIGINT  # KeyboardInterrupt, re-raised as the signal at exit
    assert outcomes[("restore", signal.SIGTERM)] == -signal.SIGTERM
    assert outcomes[("inherit", signal.SIGINT)] == outcomes[("inherit", signal.SIGTERM)] == "ignored"  # what it fixes


def test_killing_does_not_wait_for_someone_else_to_reap_a_zombie():
    """A killed process whose parent is not us stays a zombie until that parent reaps it (Chromium's
    orphans go to init, which reaps about once a second here); it is dead, so kill_tree returns.
    Our own child is reaped, not left a zombie."""
    import subprocess
    import sys
    import time

    import psutil

    from dpo_driver.procs import kill_tree

    # A parent that starts a grandchild and never reaps it, so its zombie would stay for the whole timeout.
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, time\n"
                               "p = subprocess.Popen(['sleep', '600']); print(p.pid, flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        grandchild = psutil.Process(int(parent.stdout.readline()))
        started = time.monotonic()
        assert kill_tree([], timeout=120, also=[grandchild]) == [grandchild.pid]
        assert time.monotonic() - started < 60  # did not sit out the 120 s bound waiting for a reap
        assert grandchild.status() == psutil.STATUS_ZOMBIE  # dead, still its parent's to reap

        own_child = psutil.Process(parent.pid)
        kill_tree([], also=[own_child])
        assert not psutil.pid_exists(parent.pid) or psutil.Process(parent.pid).status() != psutil.STATUS_ZOMBIE
    finally:
        parent.kill()
        parent.wait()
