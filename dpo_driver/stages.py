"""What each training or evaluation stage hands to the next: typed values, one definition each.

The assets return these (pickled by the IO manager) instead of dicts, so a downstream stage, a
check or a later run reads named fields that a type checker and a reviewer can follow. Rollouts
and pairs stay DataFrames: their columns are the JSONL records the user can read. Plain data and
functions, no Dagster import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dpo_driver.validation import ValidationResult


@dataclass(frozen=True)
class SFTOutput:
    adapter_dir: str  # the LoRA adapter (+ tokenizer)
    base_model: str  # the resolved base model (local path or HF id) the adapter belongs to
    model: str  # the configured model name (policy_model.model), what registry tags compare
    num_examples: int  # demo steps trained on
    mlflow_run_id: str
    demos_path: str  # the (PII-scrubbed) demos trained on
    validation_path: str  # held-out expert states of the demo band: the SFT gate's input
    # The last SFT round's measure of the gate (None: not measured there); the gate reuses it when
    # its token budget is the same, so the DAG does not answer the same states twice.
    validation: ValidationResult | None = None
    validation_max_new_tokens: int = 0


@dataclass(frozen=True)
class DPOOutput:
    adapter_dir: str
    base_model: str
    model: str
    sft_adapter_dir: str  # the SFT adapter of this lineage
    start_adapter_dir: str  # the policy DPO continued from and referred to (SFT in round 1, else the champion)
    num_examples: int  # pairs trained on
    mlflow_run_id: str
    validation_path: str  # held-out expert states (the KL gate's prompts), from the SFT stage
    validation_pairs_path: str  # held-out pairs never trained on (the preference-accuracy gate's input)


@dataclass(frozen=True)
class EvaluationOutput:
    report_dir: str
    decision: str  # promote | keep previous | needs review
    environment: str
    summary: dict = field(default_factory=dict)  # report.json
    eval_seeds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Arms:
    """The policies one evaluation plays, by name, and the one DPO is judged against."""

    adapters: dict[str, str]
    baseline: str


def evaluation_arms(sft: SFTOutput, dpo: DPOOutput) -> Arms:
    """SFT and DPO always; the champion DPO continued from too when it is not the SFT adapter
    (a later round), and then the baseline, since promotion must beat what is deployed."""
    adapters = {"sft": sft.adapter_dir, "dpo": dpo.adapter_dir}
    if Path(dpo.start_adapter_dir) != Path(sft.adapter_dir):
        adapters["champion"] = dpo.start_adapter_dir
    return Arms(adapters, "champion" if "champion" in adapters else "sft")
