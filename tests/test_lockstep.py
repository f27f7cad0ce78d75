"""Greedy evaluation in lockstep (several browsers, one batched propose per step) plays exactly the
episodes the one-browser loop plays, and a browser fault stays confined to its episode."""

import os
import signal
import zlib
from pathlib import Path

import pytest

from dpo_driver import lockstep
from dpo_driver.env import WebEnv
from dpo_driver.model import resolve_model
from dpo_driver.policy import LMPolicy, Sampling
from dpo_driver.rollouts import run_episodes
from dpo_driver.tasks import seeds_for
from dpo_driver.training import load_policy

GREEDY = Sampling(temperature=0.0, max_new_tokens=12)


class HashPolicy:
    """Deterministic per prompt, whatever the batch: acts on the element the prompt's hash picks,
    typing the task's quoted text into text fields (so enter-text episodes run several steps)."""

    def __init__(self):
        self.batches: list[int] = []

    def propose(self, prompts, observations, num_samples, sampling, seed):
        self.batches.append(len(prompts))
        outs = []
        for prompt, obs in zip(prompts, observations, strict=True):
            e = obs.elements[zlib.crc32(prompt.encode()) % len(obs.elements)]
            quoted = obs.utterance.split('"')[1::2]
            out = f'type {e.kind} "{quoted[0]}"' if e.kind == "textbox" and quoted else f'click {e.kind} "{e.text}"'
            outs.append([out] * num_samples)
        return outs


def _played(eps: list[dict]) -> list[tuple]:
    """What an episode did, without its timings (wall-clock and MiniWoB's time-decayed reward)."""
    return [(e["episode_id"], e["success"], e["raw_reward"], e["truncated"], e["invalid"], e["env_error"], e["num_steps"],
             [(s["prompt"], s["output"], s["action"], s["valid"], s["done"]) for s in e["steps"]]) for e in eps]


def test_lockstep_plays_the_same_episodes_as_the_sequential_loop(miniwob):
    tasks, seeds = ["click-button", "enter-text"], seeds_for("eval", 4)
    sequential = run_episodes(HashPolicy(), miniwob, tasks, seeds, 1, GREEDY, max_steps=3, policy_name="p", num_envs=0)
    policy = HashPolicy()
    batched = run_episodes(policy, miniwob, tasks, seeds, 1, GREEDY, max_steps=3, policy_name="p", num_envs=3)
    assert _played(batched) == _played(sequential)
    assert any(e["num_steps"] > 1 for e in batched) and any(e["success"] for e in batched)
    assert max(policy.batches) == 3  # the three browsers' prompts went out together
    # One browser serving both tasks in turn (it moves on once its task is used up): the same again.
    assert _played(run_episodes(HashPolicy(), miniwob, tasks, seeds, 1, GREEDY, max_steps=3, policy_name="p", num_envs=1)) == _played(sequential)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, miniwob):
    model, tokenizer = load_policy(resolve_model("tiny-random", tmp_path_factory.mktemp("models")))
    return LMPolicy(model, tokenizer, miniwob)


def test_lockstep_with_a_real_lm_matches_the_sequential_loop(tiny_lm, miniwob):
    tasks, seeds = ["click-button"], seeds_for("eval", 6)
    sequential = run_episodes(tiny_lm, miniwob, tasks, seeds, 1, GREEDY, max_steps=2, policy_name="lm", num_envs=0)
    calls = tiny_lm.stats.calls
    batched = run_episodes(tiny_lm, miniwob, tasks, seeds, 1, GREEDY, max_steps=2, policy_name="lm", num_envs=4)
    assert _played(batched) == _played(sequential)
    assert tiny_lm.stats.calls - calls <= 2 * max(e["num_steps"] for e in batched)  # ~one generate per lockstep step


def test_a_killed_browser_fails_only_its_episode(monkeypatch, miniwob):
    tasks, seeds = ["click-button"], seeds_for("eval", 5)
    victim = seeds[1]
    real_reset = WebEnv.reset

    def reset_then_kill(self, seed):
        out = real_reset(self, seed)
        if seed == victim:  # the driver dies under the episode's first step
            driver = self._env.unwrapped.instance.driver.service.process
            browsers = [pid for t in Path(f"/proc/{driver.pid}/task").iterdir() for pid in (t / "children").read_text().split()]
            driver.kill()
            for pid in browsers:  # else the orphaned Chromium outlives the test
                os.kill(int(pid), signal.SIGKILL)
        return out

    monkeypatch.setattr(WebEnv, "reset", reset_then_kill)
    eps = run_episodes(HashPolicy(), miniwob, tasks, seeds, 1, GREEDY, max_steps=2, policy_name="p", num_envs=2)
    assert [e["seed"] for e in eps] == seeds
    assert [e["env_error"] for e in eps] == [s == victim for s in seeds]
    crashed = eps[1]
    assert crashed["reward"] is None and crashed["steps"] == [] and "browser failed" in crashed["error"]
    assert all(e["num_steps"] >= 1 and e["reward"] is not None for e in eps if e["seed"] != victim)


def test_every_browser_is_closed_when_the_policy_fails(monkeypatch, miniwob):
    opened: list[WebEnv] = []
    real_init = WebEnv.__init__

    def track(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    class Broken(HashPolicy):
        def propose(self, *args, **kwargs):
            if len(self.batches) == 1:
                raise RuntimeError("generation failed")
            return super().propose(*args, **kwargs)

    monkeypatch.setattr(WebEnv, "__init__", track)
    with pytest.raises(RuntimeError, match="generation failed"):
        lockstep.run_lockstep(Broken(), miniwob, ["click-button"], seeds_for("eval", 6), GREEDY, max_steps=2, num_envs=3)
    assert len(opened) == 3 and all(env._env is None for env in opened)
