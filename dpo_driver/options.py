"""One definition per option: the plain dataclasses (SFTParams, DPOParams, Sampling, PairParams,
ScoreWeights, PairGateThresholds) hold every default; the Dagster Config classes read them with
`default(...)` and add only the description the launchpad shows. tests/test_options.py fails when a
Config field and the dataclass field of the same name disagree."""

from __future__ import annotations

import dataclasses
from typing import Any


def default(cls: type, name: str) -> Any:
    """The default of dataclass `cls`'s field `name` (a fresh copy for factory defaults)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise AttributeError(f"{cls.__name__} has no option {name!r}")
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"{cls.__name__}.{name} has no default")
