"""Model cards: built from the adapter, the pairs and the evaluation report; stored, logged to MLflow, loadable."""

import json
from pathlib import Path

import pandas as pd
from huggingface_hub import ModelCard
from mlflow import MlflowClient

from dpo_driver.io import atomic_write_jsonl
from dpo_driver.modelcard import build_model_card, pair_counts, publish_model_card
from dpo_driver.registry import record_evaluation
from dpo_driver.report import build_report

LORA = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "target_modules": ["v_proj", "q_proj"], "base_model_name_or_path": "/models/tiny-random"}


def dpo_run(tracker, tmp_path: Path) -> tuple[str, Path]:
    """A DPO artifact folder as the dpo_adapter asset writes it (adapter/ + pairs.jsonl), logged to MLflow."""
    out = tmp_path / "dpo"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(LORA))
    atomic_write_jsonl(out / "pairs.jsonl", [{"task": t} for t in ["click-button"] * 3 + ["enter-text"] * 2])
    with tracker.stage_run("dpo", {}) as run:
        run.log_artifacts(out / "adapter", "adapter")
    return run.run_id, out


def report():
    rows = [{"policy": p, "task": t, "seed": s, "success": bool((s + (p == "dpo")) % 2)}
            for p in ("sft", "dpo") for t in ("click-button", "enter-text") for s in range(6)]
    return build_report(pd.DataFrame(rows), n_boot=200)


def test_card_is_stored_logged_tagged_and_loads_back(make_tracker, tmp_path):
    tracker = make_tracker()
    run_id, out = dpo_run(tracker, tmp_path)
    rep = report()
    version = record_evaluation(tracker, run_id, "promote", "dpo - sft = +8.3 points", "tiny-random", name="test-policy")
    card = build_model_card(out / "adapter", base_model="tiny-random", model_name="test-policy", version=version.version,
                            decision="promote", reason="dpo - sft = +8.3 points", report_markdown=rep.markdown,
                            pairs_by_task=pair_counts(out / "pairs.jsonl"), start_policy="/a/sft/adapter", sft_examples=40,
                            gates={"preference_pairs_count": True, "sft_adapter_validation": True},
                            runs={"MLflow DPO run": run_id})
    path = publish_model_card(tracker, version, card, tmp_path / "report" / "model_card")

    loaded = ModelCard.load(path)
    assert loaded.data.base_model == "tiny-random" and loaded.data.library_name == "peft"
    assert loaded.data.decision == "promote" and "dpo" in loaded.data.tags
    text = loaded.text
    assert "| LoRA r | 16 |" in text and "| LoRA alpha | 32 |" in text and "| target modules | q_proj, v_proj |" in text
    assert "Preference pairs: **5** (click-button 3, enter-text 2)" in text
    assert "preference_pairs_count passed, sft_adapter_validation passed" in text
    assert rep.markdown.strip() in text  # the evaluation table with its intervals, verbatim
    assert "**promote**: dpo - sft = +8.3 points" in text and "## Limitations" in text

    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    logged = Path(client.download_artifacts(run_id, "model_card/README.md", str(tmp_path / "dl")))
    assert logged.read_text() == path.read_text()
    assert client.get_model_version("test-policy", str(version.version)).tags["model_card"] == f"runs:/{run_id}/model_card/README.md"
    assert [a.path for a in client.list_artifacts(run_id, "adapter")] == ["adapter/adapter_config.json"]  # the source stays as trained


def test_card_without_known_gates_says_so(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(LORA))
    card = build_model_card(tmp_path, base_model="b", model_name="m", version=2, decision="keep previous", reason="r",
                            report_markdown="| t |", pairs_by_task={}, start_policy="s")
    assert "not known (the gates ran outside this run)" in card.text and "Preference pairs: **0** (none)" in card.text
