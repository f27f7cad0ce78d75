"""The three seed ranges (demos, rollouts, evaluation) every environment family splits its items by.

The ranges are disjoint *by construction*: each split owns a fixed band of seed values and a
split can never grow into the next band. `SeedPlan` asserts it anyway, so a config change can
never leak evaluation seeds into training data.
"""

from __future__ import annotations

from dataclasses import dataclass

BAND = 1_000_000  # seeds per split band
SPLIT_BANDS = {"demo": 0, "rollout": 1, "eval": 2}
# Validation slices start half-way into a band: the SFT gate's expert states in the demo band, the
# preference-accuracy gate's pairs in the rollout band. Training plans use [0, n) with n far below.
VALIDATION_OFFSET = BAND // 2


def seeds_for(split: str, count: int, offset: int = 0) -> list[int]:
    """`count` seeds of one split, starting `offset` into that split's band."""
    if split not in SPLIT_BANDS:
        raise ValueError(f"unknown seed split {split!r}; expected one of {list(SPLIT_BANDS)}")
    if count < 0 or offset < 0 or offset + count > BAND:
        raise ValueError(f"{split} seeds: offset {offset} + count {count} must fit in [0, {BAND})")
    start = SPLIT_BANDS[split] * BAND + offset
    return list(range(start, start + count))


def split_of(seed: int) -> str:
    for name, band in SPLIT_BANDS.items():
        if band * BAND <= seed < (band + 1) * BAND:
            return name
    raise ValueError(f"seed {seed} belongs to no split band")


@dataclass(frozen=True)
class SeedPlan:
    demo: tuple[int, ...]
    rollout: tuple[int, ...]
    eval: tuple[int, ...]
    # Rolled out like `rollout`, but their pairs are never trained on: the preference-accuracy
    # gate's held-out pairs, on pages DPO never saw, at no cost to the training pairs.
    pair_validation: tuple[int, ...] = ()

    def __post_init__(self):
        sets = {"demo": set(self.demo), "rollout": set(self.rollout), "eval": set(self.eval), "pair_validation": set(self.pair_validation)}
        assert not sets["eval"] & (sets["demo"] | sets["rollout"] | sets["pair_validation"]), "evaluation seeds overlap training seeds"
        assert not sets["demo"] & sets["rollout"], "demo seeds overlap rollout seeds"
        assert not sets["pair_validation"] & (sets["rollout"] | sets["demo"]), "pair-validation seeds overlap training seeds"

    @classmethod
    def build(cls, n_demo: int, n_rollout: int, n_eval: int, rollout_offset: int = 0,
              eval_offset: int = 0, n_pair_validation: int = 0) -> "SeedPlan":
        # eval_offset gives a fresh held-out range, to confirm a preset tuned on the default one
        if rollout_offset + n_rollout > VALIDATION_OFFSET:
            raise ValueError(f"rollout seeds (offset {rollout_offset} + {n_rollout}) reach the validation slice at {VALIDATION_OFFSET}")
        return cls(
            demo=tuple(seeds_for("demo", n_demo)),
            rollout=tuple(seeds_for("rollout", n_rollout, rollout_offset)),
            eval=tuple(seeds_for("eval", n_eval, eval_offset)),
            pair_validation=tuple(seeds_for("rollout", n_pair_validation, VALIDATION_OFFSET)),
        )
