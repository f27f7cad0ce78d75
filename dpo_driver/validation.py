"""The SFT gate: before any rollout, does the SFT policy act like the expert on held-out demo states?

A policy that never emits a working action gives rollouts nothing to learn from (two tasks trained
with half the default suite's SFT updates: SFT 0%, DPO 0%). The gate replays the expert on a
*validation* slice of the demo seed band — never evaluation seeds, never the seeds SFT trained on —
and asks the SFT policy, greedily, for the next action at every expert state (teacher forcing:
each state is the one the expert reached). No browser is needed to score it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_driver.environment import Parsed
from dpo_driver.policy import Sampling
from dpo_driver.tasks import VALIDATION_OFFSET, seeds_for


def validation_seeds(count: int, demo_seeds: tuple[int, ...] | list[int] = ()) -> list[int]:
    seeds = seeds_for("demo", count, VALIDATION_OFFSET)
    overlap = set(seeds) & set(demo_seeds)
    if overlap:
        raise ValueError(f"validation seeds overlap the demo seeds SFT trains on ({len(overlap)} seeds, e.g. {min(overlap)})")
    return seeds


@dataclass(frozen=True)
class ValidationResult:
    num_states: int
    valid_fraction: float  # answers that parse as an action
    expert_match: float  # answers equal to the expert's action
    per_task: dict[str, dict[str, float]]
    examples: list[dict]  # a few mismatches, for the check's metadata

    def reaches(self, until_expert_match: float) -> bool:
        """The SFT rounds' stopping criterion (train_until_ready, round_message): one definition."""
        return self.expert_match >= until_expert_match

    def verdict(self, min_valid_fraction: float, min_expert_match: float) -> tuple[bool, str]:
        """(passed, message). The message names the failed value, its threshold and what to do."""
        if self.num_states == 0:
            return False, "no validation states: the experts solved no validation seed of the suite's tasks"
        problems = []
        if self.valid_fraction < min_valid_fraction:
            problems.append(f"valid actions {self.valid_fraction:.0%} < {min_valid_fraction:.0%}")
        if self.expert_match < min_expert_match:
            problems.append(f"expert match {self.expert_match:.0%} < {min_expert_match:.0%}")
        weak = sorted(t for t, s in self.per_task.items() if s["expert_match"] < min_expert_match)
        if not problems:
            return True, f"SFT policy: {self.valid_fraction:.0%} valid, {self.expert_match:.0%} expert match on {self.num_states} held-out states"
        return False, (
            f"SFT policy is not ready for rollouts: {'; '.join(problems)} on {self.num_states} held-out demo states"
            + (f" (weakest tasks: {', '.join(weak[:8])})" if weak else "")
            + ". Train longer (sft_adapter max_steps, until_expert_match / max_rounds) or give more demos (task_suite demo_seeds)."
        )


def validate_policy(policy, records: list[dict], parse: Callable[[str], Parsed], max_new_tokens: int = 24,
                    batch_size: int = 16) -> ValidationResult:
    """Greedy answers of `policy` to the prompts of expert demo `records` (demos.sft_record format);
    `parse` is the family's (Environment.parse): an answer is valid when it parses."""
    prompts = [r["prompt"][0]["content"] for r in records]
    expected = [r["completion"][0]["content"].strip() for r in records]
    # Free decoding: the gate asks whether SFT learned the answer format itself (held answers are valid by construction).
    greedy = Sampling(temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size, constrained=False)
    answers = [a[0].strip() for a in policy.propose(prompts, [None] * len(prompts), 1, greedy, seed=0)] if prompts else []
    per: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    examples = []
    for r, want, got in zip(records, expected, answers):
        valid, match = parse(got).ok, got == want
        per[r.get("task", "?")].append((valid, match))
        if not match and len(examples) < 10:
            examples.append({"task": r.get("task"), "seed": r.get("seed"), "step": r.get("step"), "expert": want, "policy": got})
    n = len(answers)
    return ValidationResult(
        num_states=n,
        valid_fraction=sum(v for rows in per.values() for v, _ in rows) / n if n else 0.0,
        expert_match=sum(m for rows in per.values() for _, m in rows) / n if n else 0.0,
        per_task={t: {"states": len(rows), "valid_fraction": sum(v for v, _ in rows) / len(rows),
                      "expert_match": sum(m for _, m in rows) / len(rows)} for t, rows in sorted(per.items())},
        examples=examples,
    )


@dataclass(frozen=True)
class Round:
    result: Any  # what the round's trainer returned
    validation: ValidationResult | None  # None: no further round was possible, so it was not measured


def log_rounds(run, rounds: list[Round]) -> None:
    """Each measured round's expert match and valid share to an MLflow run, by round (its step)."""
    for r, rd in enumerate(rounds):
        if rd.validation:
            run.log_metrics({"round_expert_match": rd.validation.expert_match, "round_valid_fraction": rd.validation.valid_fraction}, step=r)


def round_message(rd: Round, until_expert_match: float) -> str:
    """The run-log line of one SFT round ("" when the round was not measured)."""
    if rd.validation is None:
        return ""
    met = rd.validation.reaches(until_expert_match)
    return (f"SFT round: {rd.validation.expert_match:.1%} expert match on {rd.validation.num_states} held-out states "
            f"({'reached' if met else 'below'} {until_expert_match:.0%}: {'done' if met else 'another round, if max_rounds allows'})")


def train_until_ready(train_round: Callable[[int, Path | None], tuple[Path, Any]], check: Callable[[Path], ValidationResult],
                      until_expert_match: float, max_rounds: int, on_round: Callable[[Round], None] | None = None) -> list[Round]:
    """SFT in rounds of a fixed step budget until the policy matches the expert on held-out demo
    states (the SFT gate's measure) at `until_expert_match`, at most `max_rounds` rounds; round r > 0
    continues round r-1's adapter (`train_round(r, previous adapter)` -> (adapter, result)). Returns
    every round; the last one is the result.

    A fixed budget makes the cost independent of the suite, but not the outcome: 20 steps leave a
    4-task suite at 56% expert match and the 39-task set at 31%, whose policy never completed a
    typing task. The criterion stops where the suite is learned, not where its size says.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    rounds: list[Round] = []
    adapter = None
    for r in range(max_rounds):
        adapter, result = train_round(r, adapter)
        last = r == max_rounds - 1 or until_expert_match <= 0
        rounds.append(Round(result, None if last else check(Path(adapter))))
        if on_round:
            on_round(rounds[-1])
        if last or rounds[-1].validation.reaches(until_expert_match):
            break
    return rounds


def sft_rounds_in(folder: Path, spec, launch: Callable[[Path], Any], check: Callable[[Path], ValidationResult],
                  until_expert_match: float, max_rounds: int, on_round: Callable[[Round], None] | None = None) -> list[Round]:
    """`train_until_ready` laid out in one stage folder, as the DAG keeps it: the last round's
    adapter is always `spec.output_dir`, earlier rounds' under rounds/<r>; round r's job spec
    (a `train.JobSpec`, paths relative to `folder`) is written to sft_job.json, then
    sft_job_r<r>.json, and handed to `launch(spec_path) -> result`. Relative paths keep every spec
    valid once the finished folder is moved into place."""
    from dataclasses import replace

    def train_round(r: int, previous: Path | None):
        if previous is not None:  # kept as the next round's start
            (folder / "rounds").mkdir(exist_ok=True)
            previous.rename(folder / "rounds" / str(r - 1))
        job = replace(spec, init_adapter_dir=f"rounds/{r - 1}" if r else spec.init_adapter_dir,
                      scratch_dir=spec.scratch_dir + (f"-r{r}" if r and spec.scratch_dir else ""))
        return folder / spec.output_dir, launch(job.write(folder / (f"sft_job_r{r}.json" if r else "sft_job.json")))

    return train_until_ready(train_round, check, until_expert_match, max_rounds, on_round)
