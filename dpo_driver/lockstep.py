"""Greedy evaluation with N browsers in lockstep: one batched propose() per step for all of them.

Each browser has a worker thread that plays whole episodes with `rollouts._play` (one reset per
episode, the same records as the sequential loop). Its policy is a proxy that parks the request;
once every worker waits (for an action or for its next episode), the main thread answers all
parked prompts with ONE `policy.propose` call, so generation runs batched and the browsers' resets
and steps overlap (selenium waits on the browser with the GIL released).

Everything that decides what runs next happens in the main thread while all workers wait, in
worker order: which seed a worker plays next, the crash count, the batch's row order. So a run is
deterministic for a deterministic policy and environment, however the threads are timed.

Not the default (rollouts.DEFAULT_NUM_ENVS = 0; `evaluation_report.num_envs` turns it on) because on
this project's 2-core CPU it is slower: generation is compute-bound there, so a batch of N prompts
(padded to the longest, each decoded until the batch's longest answer ends) costs about N single
ones, and the one-browser loop already batches every first step across seeds. Held decoding, the
base model, five multi-step tasks x 4 seeds (benchmarks/results/throughput_multistep_held.json):
sequential 0.23 episodes/s, 4 browsers 0.17, 8 browsers 0.19; the default suite (free decoding,
float32, throughput_fp32_alone.json): 0.8x with 4 or 8. It is for an accelerator, where a batch
costs about what one prompt does. (It used to risk MiniWoB's 10 s episode clock; env.py now
pushes that clock to an hour.) Also, in bf16 a greedy answer can depend on its batch's other rows,
so results may differ slightly from the one-browser loop's and between `num_envs` values (each run
is deterministic for a fixed `num_envs`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from typing import Any

from dpo_driver.environment import EnvCrashed, Environment, Session
from dpo_driver.policy import Sampling
from dpo_driver.rollouts import DEFAULT_NUM_ENVS, MAX_CONSECUTIVE_CRASHES, EpisodeSpec, _crashed, _play, step_limit

# A new browser takes ~1 s to start, during which every other browser waits for the next batch;
# a worker whose task is used up moves to another task only while that task still has more than
# this many seeds left per worker already on it.
SWITCH_MIN_PER_WORKER = 4


class _Aborted(Exception):
    """The run failed elsewhere; this worker stops."""


class _Proxy:
    """The policy as one worker sees it: its single prompt joins the next batch."""

    def __init__(self, run: "_Lockstep", worker: int):
        self.run, self.worker = run, worker

    def propose(self, prompts, observations, num_samples, sampling, seed):
        assert len(prompts) == 1 and num_samples == 1, "lockstep plays one greedy sample per episode"
        return [[self.run.await_action(self.worker, prompts[0], observations[0], seed)]]


class _Lockstep:
    def __init__(self, policy, env: Environment, tasks: list[str], seeds: list[int], sampling: Sampling, max_steps: int | None,
                 policy_name: str, on_progress: Callable[[dict], None] | None, num_envs: int):
        self.policy, self.sampling, self.policy_name = policy, sampling, policy_name
        self.max_steps = {t: step_limit(env, t, max_steps) for t in tasks}
        self.env = env
        self.on_progress = on_progress
        self.tasks = tasks
        self.pending = {t: deque(EpisodeSpec(t, s, 0) for s in seeds) for t in tasks}
        self.total = len(tasks) * len(seeds)
        self.num_workers = min(num_envs, self.total)
        self.owner: list[str | None] = [None] * self.num_workers  # the task each worker's browser runs
        self.cond = threading.Condition()
        self.running = self.num_workers  # workers not yet exited
        self.asks: dict[int, dict | None] = {}  # worker -> its finished episode; it waits for the next spec
        self.given: dict[int, EpisodeSpec | None] = {}
        self.prompts: dict[int, tuple[str, Any, int]] = {}  # worker -> its parked request
        self.answers: dict[int, str] = {}
        self.failure: BaseException | None = None
        self.episodes: list[dict] = []
        self.crashes = 0  # consecutive, over all browsers
        self.t_start = time.perf_counter()

    # --- worker side -------------------------------------------------------------------------

    def work(self, w: int) -> None:
        env: Session | None = None
        finished = None
        try:
            while (spec := self._next_episode(w, finished)) is not None:
                if env is None or env.task != spec.task:
                    if env is not None:
                        env.close()
                    env = self.env.open(spec.task)
                try:
                    finished = _play(self.env, env, _Proxy(self, w), spec, [], self.sampling, self.max_steps[spec.task], self.policy_name)
                except EnvCrashed as e:  # the next reset re-opens this browser
                    finished = _crashed(self.policy_name, spec, e)
        except _Aborted:
            pass
        except BaseException as e:
            with self.cond:
                self.failure = self.failure or e
                self.cond.notify_all()
        finally:
            try:
                if env is not None:
                    env.close()
            finally:
                with self.cond:
                    self.running -= 1
                    self.cond.notify_all()

    def _next_episode(self, w: int, finished: dict | None) -> EpisodeSpec | None:
        with self.cond:
            self.asks[w] = finished
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.failure is not None or w in self.given)
            if self.failure is not None:
                raise _Aborted
            return self.given.pop(w)

    def await_action(self, w: int, prompt: str, obs: Any, seed: int) -> str:
        with self.cond:
            self.prompts[w] = (prompt, obs, seed)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.failure is not None or w in self.answers)
            if self.failure is not None:
                raise _Aborted
            return self.answers.pop(w)

    # --- main thread -------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.failure is not None or len(self.asks) + len(self.prompts) == self.running)
                if self.failure is not None:
                    raise self.failure
                if self.running == 0:
                    return
                if self.asks:  # new episodes first, so their first prompts join this step's batch
                    for w in sorted(self.asks):
                        finished = self.asks.pop(w)
                        if finished is not None:
                            self._record(finished)
                        self.given[w] = self._assign(w)
                    self.cond.notify_all()
                    continue
                batch = sorted(self.prompts.items())
                self.prompts.clear()
            # Greedy decoding ignores the seed; the first row's per-step seed is passed as _play would.
            outs = self.policy.propose([p for _, (p, _, _) in batch], [o for _, (_, o, _) in batch], 1, self.sampling,
                                       seed=batch[0][1][2])
            with self.cond:
                self.answers.update({w: out[0] for (w, _), out in zip(batch, outs, strict=True)})
                self.cond.notify_all()

    def _record(self, ep: dict) -> None:
        self.crashes = self.crashes + 1 if ep["env_error"] else 0
        if self.crashes >= MAX_CONSECUTIVE_CRASHES:
            raise EnvCrashed(f"{ep['task']}: browser crashed {self.crashes} times in a row; last: {ep['error']}")
        self.episodes.append(ep)
        if self.on_progress:
            done = len(self.episodes)
            elapsed = time.perf_counter() - self.t_start
            self.on_progress({"done": done, "total": max(self.total, done), "task": ep["task"],
                              "episodes_per_second": done / elapsed if elapsed else 0.0,
                              "success_so_far": sum(e["success"] for e in self.episodes) / done})

    def _assign(self, w: int) -> EpisodeSpec | None:
        own = self.owner[w]
        if own is not None and self.pending[own]:
            return self.pending[own].popleft()
        workers = {t: self.owner.count(t) for t in self.tasks}
        # The task with the most seeds left per worker (+1 for this one); ties go to task order.
        task = max(self.tasks, key=lambda t: len(self.pending[t]) / (workers[t] + 1))
        worth_a_new_browser = len(self.pending[task]) > (SWITCH_MIN_PER_WORKER * workers[task] if own else 0)
        if not worth_a_new_browser:
            self.owner[w] = None
            return None
        self.owner[w] = task
        return self.pending[task].popleft()


def run_lockstep(
    policy,
    env: Environment,
    tasks: list[str],
    seeds: list[int],
    sampling: Sampling,
    max_steps: int | None = None,
    policy_name: str = "policy",
    on_progress: Callable[[dict], None] | None = None,
    num_envs: int = DEFAULT_NUM_ENVS,
) -> list[dict]:
    """One greedy episode per (task, seed) on up to `num_envs` browsers shared by all tasks (a browser
    starts in ~1 s); records in task, then seed order. `max_steps` as in run_episodes (None = per task)."""
    if sampling.temperature > 0:
        raise ValueError("lockstep plays greedy episodes only (temperature <= 0)")
    if num_envs < 1:
        raise ValueError("num_envs must be >= 1")
    run = _Lockstep(policy, env, tasks, seeds, sampling, max_steps, policy_name, on_progress, num_envs)
    threads = [threading.Thread(target=run.work, args=(w,), name=f"lockstep-{w}", daemon=True) for w in range(run.num_workers)]
    for t in threads:
        t.start()
    try:
        run.serve()
    except BaseException as e:
        with run.cond:  # wakes every parked worker with _Aborted; each closes its browser on the way out
            run.failure = run.failure or e
            run.cond.notify_all()
        raise
    finally:
        for t in threads:
            t.join()
    order = {(t, s): i for i, (t, s) in enumerate((t, s) for t in tasks for s in seeds)}
    return sorted(run.episodes, key=lambda e: order[(e["task"], e["seed"])])
