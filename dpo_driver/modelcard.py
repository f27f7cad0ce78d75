"""A Hugging Face model card for every registered DPO adapter version.

The card (README.md with YAML metadata, the Hub convention) says what the adapter is (base model,
LoRA config from adapter_config.json), what it was trained on (pair counts, sources, gates passed),
how it evaluated (the evaluation report's table with intervals), what was decided, and what it is
for. It is written into the evaluation report folder and logged to the DPO run as
`model_card/README.md` (not into `adapter/`: that folder is the registered version's source and
stays as trained); the version's tag `model_card` points there. Load it with `ModelCard.load(path)`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from mlflow.entities.model_registry import ModelVersion

from dpo_driver.io import atomic_write_text, read_jsonl
from dpo_driver.tracking import Tracker

CARD_ARTIFACT_DIR = "model_card"

INTENDED_USE = """\
Acting as an agent in the `{environment}` environment family, on the tasks it was trained and
evaluated on: given the prompt the family renders for a state (for MiniWoB++, the page as a
numbered list of actionable elements and the task), answer one action in the family's grammar,
which the family parses and executes (`dpo_driver.environment.Environment.parse`). Load it on its base model with PEFT
(`PeftModel.from_pretrained(base, adapter_dir)`); the pipeline's rollouts use the `champion` alias."""

LIMITATIONS = """\
- Evaluated only on the listed tasks of the `{environment}` family and held-out seeds of those tasks;
  nothing is known about other tasks, real websites, databases or tools, or other prompt formats.
- Success rates come from a finite number of seeds: read them with their intervals. The decision
  compares against the policy this round started from, not against every earlier version.
- Preference pairs come from the policy's own rollouts scored by the environment, so the adapter
  inherits that policy's blind spots: behaviour never sampled was never preferred or rejected.
- Not for actions with real-world consequences (purchases, messages, account changes) without a human check."""


def lora_config(adapter_dir: Path) -> dict:
    """The PEFT adapter_config.json of `adapter_dir`; raises if the folder holds no adapter."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {adapter_dir} is not a PEFT adapter folder")
    return json.loads(path.read_text())


def pair_counts(pairs_path: Path) -> dict[str, int]:
    """Preference pairs per task in a DPO records file (the `pairs.jsonl` beside the adapter)."""
    return dict(sorted(Counter(r["task"] for r in read_jsonl(Path(pairs_path))).items()))


def build_model_card(adapter_dir: Path, *, base_model: str, model_name: str, version: str | int, decision: str,
                     reason: str, report_markdown: str, pairs_by_task: dict[str, int], start_policy: str,
                     sft_examples: int | None = None, gates: dict[str, bool] | None = None,
                     runs: dict[str, str] | None = None, environment: str = "miniwob") -> ModelCard:
    """The card of `model_name` v`version`. `gates` maps check names to passed (None = not known);
    `runs` names the runs behind it ({"dpo": mlflow id, "dagster": run id, ...})."""
    lora = lora_config(adapter_dir)
    targets = lora.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    data = ModelCardData(base_model=base_model, library_name="peft", pipeline_tag="text-generation",
                         tags=["dpo", "lora", "trl", "peft", environment, "agent"], model_name=f"{model_name} v{version}",
                         decision=decision)
    total = sum(pairs_by_task.values())
    by_task = ", ".join(f"{t} {n}" for t, n in pairs_by_task.items()) or "none"
    gate_line = ("not known (the gates ran outside this run)" if not gates else
                 ", ".join(f"{name} {'passed' if ok else 'FAILED'}" for name, ok in sorted(gates.items())))
    run_lines = "\n".join(f"- {k}: `{v}`" for k, v in (runs or {}).items())
    body = f"""
# {model_name} v{version}

LoRA adapter on **{base_model}** trained with environment-feedback DPO (TRL) on `{environment}` tasks:
pairs of a successful and a failed action from the same state, scored by the environment.

## Decision

**{decision}**: {reason}

## Adapter

| field | value |
|---|---|
| PEFT type | {lora.get('peft_type')} ({lora.get('task_type')}) |
| LoRA r | {lora.get('r')} |
| LoRA alpha | {lora.get('lora_alpha')} |
| LoRA dropout | {lora.get('lora_dropout')} |
| target modules | {targets} |
| base model (as loaded) | {lora.get('base_model_name_or_path')} |

## Training data

- Preference pairs: **{total}** ({by_task}), from rollouts of the policy `{start_policy}`, which is also the frozen DPO reference.
- SFT demonstrations before DPO: {'not known' if sft_examples is None else f'{sft_examples} demo steps (scripted experts or user demos)'}.
- Blocking quality gates in this run: {gate_line}.

## Evaluation

{report_markdown.strip()}

## Intended use

{INTENDED_USE.format(environment=environment)}

## Limitations

{LIMITATIONS.format(environment=environment)}

## Provenance

{run_lines or '- not recorded'}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def publish_model_card(tracker: Tracker, version: ModelVersion, card: ModelCard, out_dir: Path) -> Path:
    """Write `card` to `out_dir/README.md`, log it to the version's run as `model_card/README.md`,
    and tag the version with where it is. Returns the local path."""
    path = atomic_write_text(Path(out_dir) / "README.md", str(card))
    tracker.client.log_artifact(version.run_id, str(path), CARD_ARTIFACT_DIR)
    tracker.client.set_model_version_tag(version.name, str(version.version), "model_card",
                                         f"runs:/{version.run_id}/{CARD_ARTIFACT_DIR}/README.md")
    return path
