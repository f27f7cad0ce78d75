"""A thin, failure-aware wrapper around one real MiniWoB++ environment (headless Chromium)."""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_driver.actions import Action, resolve_target
from dpo_driver.environment import EnvCrashed
from dpo_driver.observation import Observation, parse_observation

__all__ = ["BrowserMissing", "EnvCrashed", "StepResult", "WebEnv", "find_browser"]
from dpo_driver.procs import browser_dirs, browser_pids, browser_tree, exit_on_sigterm, kill_tree, remove_dirs

# A closed <select> hides its options from MiniWoB's DOM dump (they have no layout box): read
# them, as (text, selected) pairs per select ref, so the policy can see what it may choose.
_DROPDOWNS_JS = """
var out = {};
for (var ref in core.previousDOMInfo) {
  var el = core.previousDOMInfo[ref];
  if (el.tagName === 'SELECT' && !el.multiple && el.size <= 1)
    out[ref] = Array.from(el.options).map(function (o) { return [o.text, o.selected]; });
}
return out;
"""
# jQuery UI widgets animate (accordions, ~0.4 s) or wait (autocomplete suggestions, 0.3 s)
# before they show a change; an observation taken in between shows the page before the action.
# Switched off, the observation right after an action shows its result.
# MiniWoB also ends every episode as failed after 10 s of wall clock. Generation on a loaded CPU
# (or for a batch of browsers in lockstep) can take that long, which made success depend on the
# machine's load; the episode clock is pushed to an hour, and the per-task step limit bounds
# episodes instead. (The time-decayed reward still decays over MiniWoB's 10 s; pairs ignore it.)
_NO_DELAYS_JS = """
if (core.EP_TIMER !== null) {
  clearTimeout(core.EP_TIMER);
  core.EP_TIMER = setTimeout(function () { core.endEpisode(-1, false, 'timed out'); }, 3600 * 1000);
}
if (window.jQuery) {
  jQuery.fx.off = true;
  if (jQuery.ui && jQuery.ui.autocomplete) jQuery('.ui-autocomplete-input').autocomplete('option', 'delay', 0);
}
"""
# MiniWoB has no select action and clicking an <option> selects nothing: choose the option the
# way a user's pick does (mark it selected, then fire `change` for the page's listeners).
# arguments: the ref of an <option>, or of a <select> plus the index of its option.
_SELECT_JS = """
var el = core.previousDOMInfo[arguments[0]];
var opt = el.tagName === 'OPTION' ? el : el.options[arguments[1]];
var sel = opt.closest('select');
opt.selected = true;
sel.dispatchEvent(new Event('input', {bubbles: true}));
sel.dispatchEvent(new Event('change', {bubbles: true}));
"""


# Selenium's quit() asks chromedriver to shut down (10 s), polls it for up to 30 s, then waits up to
# 60 s after SIGTERM: on a busy machine a SIGTERMed run took over a minute to exit. The polite close
# gets this long; whatever is still running after it, kill_tree ends (and so the stuck quit too).
QUIT_SECONDS = 10.0


def _close_within(env, seconds: float) -> None:
    def close():
        try:
            env.close()
        except Exception:  # a dead driver cannot close its browser: the process kill after this does
            pass

    quitter = threading.Thread(target=close, name="webenv-quit", daemon=True)
    quitter.start()
    quitter.join(seconds)


class BrowserMissing(RuntimeError):
    pass


def find_browser(chrome_binary: str | None = None, chromedriver: str | None = None) -> tuple[str, str]:
    """Locate Chromium and its driver, or raise telling the user how to install them."""
    chrome = chrome_binary or os.environ.get("MINIWOB_CHROME_BINARY") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = chromedriver or os.environ.get("MINIWOB_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    for what, path in (("Chromium", chrome), ("ChromeDriver", driver)):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise BrowserMissing(
                f"{what} not found at {path!r}: install it with "
                "`apt-get update && apt-get install -y chromium chromium-driver`, or set "
                "MINIWOB_CHROME_BINARY / MINIWOB_CHROMEDRIVER to their paths"
            )
    return chrome, driver


@dataclass
class StepResult:
    observation: Observation | None
    fields: dict[str, str]
    reward: float  # MiniWoB's time-decayed reward (0 until the episode ends)
    raw_reward: float  # reward without the time penalty; 1.0 = solved
    done: bool
    valid: bool  # the action named an element that exists on the page


class WebEnv:
    """One MiniWoB task in one browser; `reset(seed)` reuses the browser across episodes."""

    def __init__(self, task: str, chrome_binary: str | None = None, chromedriver: str | None = None, ordinals: bool | None = None):
        chrome, driver = find_browser(chrome_binary, chromedriver)
        # miniwob reads these when it starts the driver.
        os.environ["MINIWOB_CHROME_BINARY"] = chrome
        os.environ["MINIWOB_CHROMEDRIVER"] = driver
        self.task = task
        if ordinals is None:  # the task's own listing (families.miniwob.FROZEN_LISTING_TASKS); imported here: that module builds on this one
            from dpo_driver.families.miniwob import FROZEN_LISTING_TASKS

            ordinals = task not in FROZEN_LISTING_TASKS
        self.ordinals = ordinals  # `#k` after an ambiguous kind + text (observation.parse_observation)
        self._env = None
        self._pids: list[int] = []  # chromedriver + Chromium, killed with their descendants on close/crash
        self._dirs: list[Path] = []  # their temporary directories, removed once they are dead
        self.raw: dict[str, Any] | None = None
        self.observation: Observation | None = None

    def _make(self):
        import gymnasium
        import miniwob

        gymnasium.register_envs(miniwob)
        return gymnasium.make(f"miniwob/{self.task}-v1")

    def reset(self, seed: int) -> tuple[Observation, dict[str, str]]:
        try:
            if self._env is None:
                exit_on_sigterm()  # a killed process must still close this browser
                self._env = self._make()
                self._pids = browser_pids(self._driver())  # while the driver lives: it may not later
                self._dirs = browser_dirs(self._pids)
                # The policy reads the DOM, never pixels: no screenshot per observation (reset ~70 -> 30 ms, step ~31 -> 17 ms).
                self._env.unwrapped.set_record_screenshots(False)
            raw, _ = self._env.reset(seed=seed)
            self._driver().execute_script(_NO_DELAYS_JS)
            self._observe(raw)
        except Exception as e:  # selenium raises many types; all mean the browser is unusable
            self._discard()
            raise EnvCrashed(f"{self.task} seed {seed}: browser failed on reset: {e}") from e
        return self.observation, dict(raw["fields"])

    def _driver(self):
        return self._env.unwrapped.instance.driver

    def _observe(self, raw: dict[str, Any], done: bool = False):
        if not done and any(str(e["tag"]) == "select" for e in raw["dom_elements"]):
            found = self._driver().execute_script(_DROPDOWNS_JS)
            raw = {**raw, "dropdowns": {int(r): [(str(t), bool(s)) for t, s in opts] for r, opts in found.items()}}
        self.raw = raw
        self.observation = None if done else parse_observation(raw, ordinals=self.ordinals)

    def step(self, action: Action | None) -> StepResult:
        """Apply an action; an unparseable or unresolvable one ends the episode as a failure."""
        assert self._env is not None and self.observation is not None, "reset() first"
        target = resolve_target(action, list(self.observation.elements)) if action else None
        if target is None:
            return StepResult(None, {}, reward=-1.0, raw_reward=-1.0, done=True, valid=False)
        from miniwob.action import ActionTypes

        env = self._env.unwrapped
        try:
            if action.verb == "click":
                act = env.create_action(ActionTypes.CLICK_ELEMENT, ref=target.ref)
            elif action.verb == "select":
                self._driver().execute_script(_SELECT_JS, target.ref, self._option_index(target))
                act = env.create_action(ActionTypes.NONE)  # the choice is made; step to observe it
            else:
                act = env.create_action(ActionTypes.FOCUS_ELEMENT_AND_TYPE_TEXT, ref=target.ref, text=action.text)
            raw, reward, terminated, truncated, info = self._env.step(act)
            self._observe(raw, done=bool(terminated or truncated))
        except Exception as e:
            self._discard()
            raise EnvCrashed(f"{self.task}: browser failed on step: {e}") from e
        return StepResult(
            self.observation,
            dict(raw.get("fields", ())),
            reward=float(reward),
            raw_reward=float(info.get("raw_reward", reward)),
            done=bool(terminated or truncated),
            valid=True,
        )

    def _option_index(self, option) -> int:
        """Index of a closed dropdown's option within its <select> (-1: the option has its own ref)."""
        same_ref = [e for e in self.observation.elements if e.ref == option.ref and e.kind == "option"]
        return same_ref.index(option) if "dropdowns" in self.raw and option.ref in self.raw["dropdowns"] else -1

    def _discard(self):
        env, self._env = self._env, None
        pids, self._pids = self._pids, []
        tree = browser_tree(pids)  # before quit(): a renderer whose parent quit() kills is orphaned, no one's child after
        if env is not None:
            _close_within(env, QUIT_SECONDS)
        kill_tree(pids, also=tree)  # whatever quit() left behind, e.g. Chromium orphaned by a killed chromedriver
        dirs, self._dirs = self._dirs, []
        remove_dirs(dirs)

    def close(self):
        self._discard()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
