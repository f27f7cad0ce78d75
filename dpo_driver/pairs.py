"""Preference pairs from environment feedback: a success and a failure on the same state.

For each (task, seed), successful and failed episodes are compared step by step; the pair is
taken at the first step where their actions differ *from the same prompt* (on single-step
tasks that is step 0; on multi-step tasks a shared prefix is skipped). Chosen is the success's
action, rejected the failure's output. Episodes are scored so that the margin between the two
is recorded and filtered on.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import pandas as pd

from collections.abc import Callable

from dpo_driver.environment import Parsed
from dpo_driver.tasks import split_of

PAIR_COLUMNS = [
    "pair_id", "task", "seed", "step", "prompt", "chosen", "rejected",
    "chosen_score", "rejected_score", "margin", "chosen_episode", "rejected_episode",
]


@dataclass
class ScoreWeights:
    success: float = 1.0  # solving the task dominates every other term
    # MiniWoB's time-decayed reward measures *wall-clock* time in the browser, so two same-seed
    # runs score the same episodes differently and would pick different pairs. Off by default;
    # step_penalty rewards efficiency deterministically.
    reward: float = 0.0
    step_penalty: float = 0.02  # per step taken: prefer efficient episodes
    invalid_penalty: float = 0.5  # an output that is no action at all, or names no element


@dataclass
class PairParams:
    min_margin: float = 0.5  # drop pairs whose score gap is smaller
    max_pairs_per_prompt: int = 2  # cap per state prompt, so easy prompts with many samples do not dominate
    rejected_must_parse: bool = True  # rejected = well-formed but wrong; malformed outputs teach format-breaking
    # chosen = a success with the fewest steps left from the divergence state; a success that wastes
    # steps where a shorter one exists (typing into a stray field before the right click) is not chosen
    shortest_chosen: bool = True
    # No pair where the failure's action at the divergence is one the success also takes later and
    # the failure went on after it: the two episodes did the same things in another order, and what
    # failed came later (click-option: the right radio first, then a wrong one, rejected against
    # the wrong one first, then the right one): 4 of the 189 pairs of the full set's held rollouts.
    skip_reordered: bool = True


def score_episode(ep: dict, w: ScoreWeights) -> float:
    reward = ep.get("reward") or 0.0
    return (
        w.success * float(bool(ep["success"]))
        + w.reward * float(reward)
        - w.step_penalty * int(ep["num_steps"])
        - w.invalid_penalty * float(bool(ep.get("invalid")))
    )


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    return hashlib.sha1(f"{prompt}\x00{chosen}\x00{rejected}".encode()).hexdigest()[:16]


def _divergence(good: dict, bad: dict) -> tuple[int, str, str, str] | None:
    """(step, prompt, chosen, rejected) at the first step where the episodes part: from the same
    prompt, different outputs that lead to different states (or end one episode, not the other).

    Two outputs that lead to the same next state differ only in what the environment ignores (a
    tool-use thought: "calculate" or "compute" before the same call). That step is not what made
    one episode succeed; a pair there teaches a wording, picked by a later step's outcome (on tool
    use such pairs pushed the expert's own phrasing down), so the comparison moves on.
    """
    ga, ba = good["steps"], bad["steps"]
    for i, (a, b) in enumerate(zip(ga, ba)):
        if a["prompt"] != b["prompt"]:
            return None  # states drifted apart without an action difference: no clean pair
        if a["output"].strip() != b["output"].strip():
            same_next = i + 1 < len(ga) and i + 1 < len(ba) and ga[i + 1]["prompt"] == ba[i + 1]["prompt"]
            if not same_next:
                return a["step"], a["prompt"], a["action"] or a["output"], b["output"].strip()
    return None


def _step_key(st: dict) -> str:
    return st["action"] or st["output"].strip()


def _reordered(good: dict, bad: dict, step: int) -> bool:
    """The failure's action at `step` is taken later by the success, and the failure did not end
    there: the action is not what failed (see PairParams.skip_reordered)."""
    if int(bad["num_steps"]) <= step + 1:
        return False  # the action ended the failed episode: it is the failure
    return _step_key(bad["steps"][step]) in {_step_key(st) for st in good["steps"][step + 1:]}


def steps_to_success(episodes: list[dict]) -> dict[str, int]:
    """Per state prompt: the fewest steps any successful episode took from that state to success."""
    best: dict[str, int] = {}
    for ep in episodes:
        if ep["success"]:
            for st in ep["steps"]:
                left = int(ep["num_steps"]) - int(st["step"])
                best[st["prompt"]] = min(best.get(st["prompt"], left), left)
    return best


def expert_prefix(ep: dict) -> int:
    """Steps of the expert's episode an episode started after (eto.expert_start_episodes); 0 for the others.
    Episodes read back through a DataFrame carry NaN where the key was absent."""
    value = ep.get("expert_prefix")
    return 0 if value is None or value != value else int(value)


def expert_start_count(episodes: list[dict]) -> int:
    """How many of `episodes` started from an expert's state (an expert prefix of at least one step)."""
    return sum(expert_prefix(ep) > 0 for ep in episodes)


def _training_episodes(episodes: list[dict]) -> list[dict]:
    """Episodes fit to train on: browser crashes dropped, evaluation seeds refused."""
    kept = []
    for ep in episodes:
        if ep.get("env_error"):
            continue  # a crashed browser says nothing about the policy
        if split_of(int(ep["seed"])) == "eval":
            raise ValueError(f"episode {ep['episode_id']} uses evaluation seed {ep['seed']}: refusing to build training pairs from it")
        kept.append(ep)
    return kept


def build_preference_pairs(episodes: list[dict], params: PairParams, weights: ScoreWeights,
                           parse: Callable[[str], Parsed] | None = None) -> pd.DataFrame:
    """One row per pair (PAIR_COLUMNS), deduplicated, deterministic order. `parse` is the family's
    (Environment.parse); `params.rejected_must_parse` needs it."""
    if params.rejected_must_parse and parse is None:
        raise ValueError("rejected_must_parse needs the environment's parse function")
    by_state: dict[tuple[str, int, int], list[dict]] = {}
    kept = _training_episodes(episodes)
    for ep in kept:
        # Episodes started from the expert's step t (eto.expert_start_episodes) pair among themselves:
        # against any other, the first difference would be an expert action, chosen or rejected.
        by_state.setdefault((ep["task"], int(ep["seed"]), expert_prefix(ep)), []).append(ep)
    shortest = steps_to_success(kept)
    rows, seen = [], set()
    for (task, seed, _), eps in sorted(by_state.items()):
        scored = sorted(((score_episode(e, weights), e) for e in eps), key=lambda t: (-t[0], t[1]["sample"]))
        wins = [(s, e) for s, e in scored if e["success"]]
        losses = [(s, e) for s, e in scored if not e["success"]]
        taken: dict[str, int] = {}  # per prompt: a multi-step seed has one prompt per state
        for (sw, w), (sl, l) in itertools.product(wins, losses):
            if sw - sl < params.min_margin:
                continue
            div = _divergence(w, l)
            if div is None:
                continue
            step, prompt, chosen, rejected = div
            if params.shortest_chosen and w["num_steps"] - step > shortest[prompt]:
                continue
            if params.skip_reordered and _reordered(w, l, step):
                continue
            if taken.get(prompt, 0) >= params.max_pairs_per_prompt:
                continue
            if params.rejected_must_parse and not parse(rejected).ok:
                continue
            key = (prompt, chosen, rejected)
            if key in seen:
                continue
            seen.add(key)
            taken[prompt] = taken.get(prompt, 0) + 1
            rows.append(
                {
                    "pair_id": pair_id(*key), "task": task, "seed": seed, "step": step,
                    "prompt": prompt, "chosen": chosen, "rejected": rejected,
                    "chosen_score": sw, "rejected_score": sl, "margin": sw - sl,
                    "chosen_episode": w["episode_id"], "rejected_episode": l["episode_id"],
                }
            )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def merge_pairs(pairs: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """`pairs`, then the rows of `extra` whose pair is not already among them."""
    return pd.concat([pairs, extra[~extra["pair_id"].isin(pairs["pair_id"])]], ignore_index=True)


def to_dpo_records(pairs: pd.DataFrame) -> list[dict]:
    """TRL's conversational preference format, one dict per pair."""
    return [
        {
            "prompt": [{"role": "user", "content": r.prompt}],
            "chosen": [{"role": "assistant", "content": r.chosen}],
            "rejected": [{"role": "assistant", "content": r.rejected}],
            "pair_id": r.pair_id, "task": r.task, "seed": int(r.seed), "margin": float(r.margin),
        }
        for r in pairs.itertuples()
    ]


def to_kto_records(episodes: list[dict], parse: Callable[[str], Parsed] | None = None, shortest_only: bool = True) -> list[dict]:
    """Unpaired labels for KTO, one per distinct (prompt, completion): every step of a successful
    episode is desirable (with `shortest_only`, only where no success from that state took fewer
    steps); the *last* step of a failed one is undesirable (the action that ended or stalled it, so
    a correct first step of a multi-step failure is not blamed). A step that also occurs in a
    success is never undesirable. Unlike pairs, failures need no successful sibling.
    """
    good: dict[tuple[str, str], dict] = {}
    bad: dict[tuple[str, str], dict] = {}
    kept = sorted(_training_episodes(episodes), key=lambda e: e["episode_id"])
    shortest = steps_to_success(kept)
    for ep in kept:
        if ep["success"]:
            for st in ep["steps"]:
                if shortest_only and ep["num_steps"] - st["step"] > shortest[st["prompt"]]:
                    continue
                good.setdefault((st["prompt"], _step_key(st)), ep)
        elif ep["steps"]:
            last = ep["steps"][-1]
            out = last["output"].strip()
            if parse is not None and not parse(out).ok:
                continue
            bad.setdefault((last["prompt"], out), ep)
    labelled = [(k, True, e) for k, e in good.items()] + [(k, False, e) for k, e in bad.items() if k not in good]
    return [
        {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
         "label": label, "task": e["task"], "seed": int(e["seed"])}
        for (p, c), label, e in sorted(labelled, key=lambda t: (t[0], not t[1]))
    ]


def pair_yield(episodes: list[dict], pairs: pd.DataFrame) -> dict:
    """Prompts with both outcomes / prompts sampled: how much signal the rollouts produced."""
    states: dict[tuple, set] = {}
    for ep in episodes:
        if not ep.get("env_error"):
            states.setdefault((ep["task"], ep["seed"]), set()).add(bool(ep["success"]))
    both = sum(1 for v in states.values() if len(v) == 2)
    return {"prompts": len(states), "prompts_with_both": both, "pair_yield": both / len(states) if states else 0.0, "pairs": len(pairs)}
