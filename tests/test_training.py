import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from dpo_driver.model import load_model_and_tokenizer
from dpo_driver.training import (
    DPOParams,
    SFTParams,
    build_dpo_trainer,
    build_kto_trainer,
    build_sft_trainer,
    compact_fused_head,
    load_policy,
    train_dpo,
    train_kto,
    train_sft,
)

NAMES = ["okay", "Cancel", "Submit", "Next"]
SFT_RECORDS = [
    {
        "prompt": [{"role": "user", "content": f'Task: Click on the "{n}" button.\n{i}. button "{n}"'}],
        "completion": [{"role": "assistant", "content": f'click button "{n}"'}],
    }
    for i in range(1, 5)
    for n in NAMES
]
DPO_RECORDS = [
    {
        "prompt": r["prompt"],
        "chosen": r["completion"],
        "rejected": [{"role": "assistant", "content": 'type textbox "Myron"'}],
    }
    for r in SFT_RECORDS
]
KTO_RECORDS = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in DPO_RECORDS] + [
    {"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in DPO_RECORDS[::2]
]
# A high LR so the SFT adapter is far from identity (LoRA B starts at zero, so untrained == base).
SFT = SFTParams(max_steps=0, min_steps=0, learning_rate=1e-2, num_train_epochs=2, per_device_train_batch_size=4, logging_steps=1)
DPO = DPOParams(max_steps=0, min_steps=0, learning_rate=1e-3, per_device_train_batch_size=4, logging_steps=1)


pytestmark = pytest.mark.usefixtures("model_cache")  # tiny models built once per module


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    logs = []
    out = tmp_path_factory.mktemp("run") / "sft"
    result = train_sft("tiny-random", SFT_RECORDS, out, SFT, on_log=logs.append)
    return result, logs


def seq_logps(model, batch) -> torch.Tensor:
    """Summed log-prob of the completion tokens of each row, computed independently of TRL."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def test_the_fused_head_scores_only_labelled_positions_and_gives_the_same_outputs(monkeypatch):
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton as trl_default

    model, _ = load_model_and_tokenizer("tiny-random", dtype="float32")
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :9] = -100  # a prompt of 9 tokens, an answer of 3
    rows, apply = [], trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", lambda h, *a: rows.append(len(h)) or apply(h, *a))

    def run():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out, model.get_input_embeddings().weight.grad.clone()

    monkeypatch.setattr(trl_utils, "_use_triton", trl_default)  # TRL as shipped: every position on CPU
    full, full_grad = run()
    compact_fused_head()
    compact_fused_head()  # idempotent
    compact, compact_grad = run()
    assert rows == [3 * 11, 3 * 3]
    assert torch.equal(full.label_mask, compact.label_mask)
    torch.testing.assert_close(compact.log_probs, full.log_probs)
    torch.testing.assert_close(compact.entropy, full.entropy)
    torch.testing.assert_close(compact_grad, full_grad)


def test_sft_writes_a_trained_adapter(sft, tmp_path):
    result, _ = sft
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert result.num_examples == len(SFT_RECORDS) and result.metrics["global_step"] == 8
    assert {"train_loss", "train_runtime", "loss"} <= result.metrics.keys()
    # Every LoRA tensor moved away from its init; two fresh builds agree, so that init is the real one.
    init = [
        get_peft_model_state_dict(build_sft_trainer("tiny-random", SFT_RECORDS, tmp_path, SFT).model)
        for _ in "ab"
    ]
    assert all(torch.equal(init[0][k], init[1][k]) for k in init[0])
    trained = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert trained.keys() == init[0].keys() and len(trained) > 0
    assert [k for k in trained if torch.equal(trained[k], init[0][k])] == []
    base, _ = load_model_and_tokenizer("tiny-random")
    assert isinstance(PeftModel.from_pretrained(base, result.adapter_dir), PeftModel)


def test_sft_reports_progress_and_learns(sft):
    result, logs = sft
    steps = [log for log in logs if "loss" in log]
    assert [log["step"] for log in steps] == list(range(1, 9)) and all(log["max_steps"] == 8 for log in logs)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert "train_runtime" in logs[-1]
    # The demos became more likely under the SFT policy than under the base model.
    tuned, tok = load_policy("tiny-random", result.adapter_dir)
    base, _ = load_policy("tiny-random", None)
    assert not tuned.training
    for record in SFT_RECORDS[:4]:
        ids = tok.apply_chat_template(record["prompt"] + record["completion"])["input_ids"]
        n_prompt = len(tok.apply_chat_template(record["prompt"], add_generation_prompt=True)["input_ids"])
        batch = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "completion_mask": torch.tensor([[0] * n_prompt + [1] * (len(ids) - n_prompt)]),
        }
        assert seq_logps(tuned, batch) > seq_logps(base, batch) + 1.0


def test_load_policy_keeps_the_adapter_in_the_base_dtype(sft):
    """bf16 LoRA weights repeat training's autocast arithmetic; an fp32 upcast only slows prefill."""
    result, _ = sft
    for dtype, want in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        model, _ = load_policy("tiny-random", result.adapter_dir, dtype=dtype)
        lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        assert lora == {want} and {p.dtype for n, p in model.named_parameters()} == {want}


@pytest.mark.parametrize("rows,keep", [(4, 2), (1, 1)])  # (1, 1): one prompt's prefill, a slice that passes as contiguous
def test_a_loaded_policy_scores_kept_positions_without_expanding_its_head(sft, rows, keep):
    from torch.profiler import ProfilerActivity, profile

    model, _ = load_policy("tiny-random", sft[0].adapter_dir, dtype="float32")
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(5, 200, (rows, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -keep:]
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            kept = model(input_ids=ids, logits_to_keep=keep).logits
    torch.testing.assert_close(kept, full)
    # Frozen weights and a strided slice would run a bmm on the head's weight copied once per row.
    expanded = [e.key for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::bmm" and any(len(shape) == 3 and vocab in shape for shape in e.input_shapes)]
    assert expanded == []


def test_sft_without_records_writes_nothing(tmp_path):
    out = tmp_path / "nested" / "sft"
    with pytest.raises(ValueError, match="no records"):
        train_sft("tiny-random", [], out, SFT)
    assert not (tmp_path / "nested").exists()


def test_dpo_trains_the_sft_adapter(sft, tmp_path):
    sft_result, _ = sft
    logs = []
    result = train_dpo(
        "tiny-random", sft_result.adapter_dir, DPO_RECORDS, tmp_path / "dpo", DPO, on_log=logs.append
    )
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not (result.adapter_dir / "ref").exists()  # the frozen reference copy is not part of the result
    before = load_file(sft_result.adapter_dir / "adapter_model.safetensors")
    after = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert after.keys() == before.keys()
    assert [k for k in after if torch.equal(after[k], before[k])] == []
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "train_loss"} <= result.metrics.keys()
    assert result.metrics["rewards/margins"] > 0
    assert logs[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)  # at step 1 the policy is the reference


def test_dpo_reference_is_the_frozen_sft_policy(sft, tmp_path):
    sft_dir = sft[0].adapter_dir
    # fp32 on both sides: the comparison is exact to 1e-3, which bf16 rounding is not.
    trainer = build_dpo_trainer("tiny-random", sft_dir, DPO_RECORDS, tmp_path, replace(DPO, bf16=False))
    batch = next(iter(trainer.get_train_dataloader()))
    sft_policy, _ = load_policy("tiny-random", sft_dir, dtype="float32")
    base, _ = load_policy("tiny-random", None, dtype="float32")
    want, bare = seq_logps(sft_policy, batch), seq_logps(base, batch)
    assert (want - bare).abs().min() > 1.0  # the SFT adapter is far from identity

    def ref_logps():
        return torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))

    torch.testing.assert_close(ref_logps(), want, atol=1e-3, rtol=1e-4)
    trainer.train()
    torch.testing.assert_close(ref_logps(), want, atol=1e-3, rtol=1e-4)  # still frozen after updates
    trainer.model.eval()
    assert (seq_logps(trainer.model, batch) - want).abs().max() > 0.1  # while the policy moved


def test_dpo_without_records_writes_nothing(sft, tmp_path):
    with pytest.raises(ValueError, match="no records"):
        train_dpo("tiny-random", sft[0].adapter_dir, [], tmp_path / "dpo", DPO)
    assert list(tmp_path.iterdir()) == []


def test_rerun_replaces_the_previous_adapter_whole(tmp_path):
    from dpo_driver.io import replace_dir  # what train_sft / train_dpo put their adapter in place with

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "stale.bin").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "adapter_model.safetensors").write_text("new")
    replace_dir(tmp_path / "new", tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["adapter_model.safetensors"]


def test_sft_can_continue_an_existing_adapter(sft, tmp_path):
    """The RFT control continues the SFT adapter: training starts exactly from its weights."""
    result, _ = sft
    trainer = build_sft_trainer("tiny-random", SFT_RECORDS, tmp_path, SFT, init_adapter_dir=result.adapter_dir)
    start = get_peft_model_state_dict(trainer.model)
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)


def test_kto_trains_the_start_adapter_against_its_frozen_copy(sft, tmp_path):
    sft_dir = sft[0].adapter_dir
    trainer = build_kto_trainer("tiny-random", sft_dir, KTO_RECORDS, tmp_path / "scratch", DPO)
    # 16 desirable, 8 undesirable: the weights balance the classes as TRL's check asks.
    assert (trainer.desirable_weight, trainer.undesirable_weight) == (1.0, 2.0)
    assert "ref" in trainer.model.peft_config  # the reference is the start adapter, not the bare base
    result = train_kto("tiny-random", sft_dir, KTO_RECORDS, tmp_path / "kto", DPO)
    before = load_file(sft_dir / "adapter_model.safetensors")
    after = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert after.keys() == before.keys() and [k for k in after if torch.equal(after[k], before[k])] == []
    assert {"kl", "rewards/chosen", "rewards/rejected", "train_loss"} <= result.metrics.keys()
    assert result.metrics["rewards/chosen"] > result.metrics["rewards/rejected"]  # desirable pushed above undesirable


def test_kto_needs_both_labels(sft, tmp_path):
    with pytest.raises(ValueError, match="desirable and undesirable"):
        train_kto("tiny-random", sft[0].adapter_dir, [r for r in KTO_RECORDS if r["label"]], tmp_path / "kto", DPO)
    assert not (tmp_path / "kto").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU bf16 path")
def test_bf16_trains_on_cpu(tmp_path):
    """bf16 on a CPU: Transformers needs use_cpu for it; the base is held in bf16, the LoRA weights
    the optimizer updates stay fp32, and the loss follows the fp32 run's."""
    params = replace(SFT, bf16=True)
    trainer = build_sft_trainer("tiny-random", SFT_RECORDS, tmp_path / "scratch", params)
    assert trainer.args.bf16 and trainer.args.use_cpu
    assert {p.dtype for n, p in trainer.model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    curves = [[log["loss"] for log in train_sft("tiny-random", SFT_RECORDS, tmp_path / f"sft{bf16}", replace(SFT, bf16=bf16)).log_history
               if "loss" in log] for bf16 in (True, False)]
    assert curves[0][-1] < 0.8 * curves[0][0]
    assert curves[0] == pytest.approx(curves[1], rel=0.03)


def test_train_steps_is_epochs_with_a_floor():
    from dpo_driver.training import train_steps

    # 16 records, batch 4: 4 steps per epoch.
    assert train_steps(SFTParams(max_steps=0, min_steps=0, num_train_epochs=2, per_device_train_batch_size=4), 16) == 8
    assert train_steps(SFTParams(num_train_epochs=2, per_device_train_batch_size=4, max_steps=0, min_steps=20), 16) == 20
    assert train_steps(SFTParams(num_train_epochs=2, per_device_train_batch_size=4, max_steps=0, min_steps=20), 64) == 32
    assert train_steps(DPOParams(max_steps=0, min_steps=0, num_train_epochs=1, per_device_train_batch_size=4, gradient_accumulation_steps=2), 17) == 3
    assert train_steps(DPOParams(num_train_epochs=0.5, per_device_train_batch_size=4, max_steps=0, min_steps=1), 2) == 1


def test_the_step_budget_is_the_same_for_any_data_size():
    from dpo_driver.training import train_steps

    # The defaults are step budgets: a 2-task suite and a 39-task suite get the same updates.
    for n in (10, 25, 500):
        assert train_steps(SFTParams(), n) == SFTParams().max_steps == 20
        assert train_steps(DPOParams(), 4 * n) == DPOParams().max_steps == 46
    assert train_steps(SFTParams(max_steps=7, num_train_epochs=100, min_steps=50), 1000) == 7


def test_a_step_budget_is_what_training_runs(tmp_path):
    result = train_sft("tiny-random", SFT_RECORDS[:8], tmp_path / "sft", replace(SFT, max_steps=3))
    assert result.metrics["global_step"] == 3  # 2 epochs x 2 steps would be 4


def test_the_step_floor_is_what_training_runs(tmp_path):
    """Half the records, same epochs: without the floor a small suite gets half the updates."""
    params = replace(SFT, max_steps=0, min_steps=8)
    result = train_sft("tiny-random", SFT_RECORDS[:8], tmp_path / "sft", params)
    assert result.metrics["global_step"] == 8  # 2 epochs x 2 steps would be 4


def test_init_adapter_is_the_base_model_and_dpo_can_start_from_it(tmp_path):
    from dpo_driver.training import init_adapter

    start = init_adapter("tiny-random", tmp_path / "zero", SFT)
    base, tok = load_policy("tiny-random")
    zero, _ = load_policy("tiny-random", start)
    batch = tok(["click button \"ok\""], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(base(**batch).logits, zero(**batch).logits)  # LoRA B = 0: the policy is the base
    result = train_dpo("tiny-random", start, DPO_RECORDS, tmp_path / "dpo", DPO)
    assert result.metrics["rewards/margins"] > 0


def test_train_until_ready_stops_at_the_criterion_or_the_cap(tmp_path):
    from dpo_driver.validation import ValidationResult, round_message, train_until_ready

    def scripted(matches):
        calls = []

        def train_round(r, previous):
            calls.append((r, previous))
            return tmp_path / f"a{r}", {"round": r}

        def check(adapter):
            return ValidationResult(num_states=10, valid_fraction=1.0, expert_match=matches[int(adapter.name[1:])], per_task={}, examples=[])

        return calls, train_round, check

    calls, train_round, check = scripted([0.3, 0.6, 0.9])
    rounds = train_until_ready(train_round, check, 0.5, 4)
    assert [r.validation.expert_match for r in rounds] == [0.3, 0.6]  # met after round 1: no third round
    assert calls == [(0, None), (1, tmp_path / "a0")]  # round 1 continued round 0's adapter
    assert "below 50%: another round" in round_message(rounds[0], 0.5)  # the log line says what happens next
    assert "reached 50%: done" in round_message(rounds[1], 0.5)
    calls, train_round, check = scripted([0.1, 0.1, 0.1])
    rounds = train_until_ready(train_round, check, 0.5, 3)
    assert len(rounds) == 3 and rounds[-1].validation is None  # the cap: the last round is not measured (nothing follows it)
    calls, train_round, check = scripted([0.0])
    assert len(train_until_ready(train_round, check, 0.0, 4)) == 1  # criterion off: one round, never measured
    with pytest.raises(ValueError, match="max_rounds"):
        train_until_ready(train_round, check, 0.5, 0)


def test_sft_rounds_in_keeps_every_round_in_one_movable_folder(tmp_path):
    from dpo_driver.train import JobSpec
    from dpo_driver.validation import ValidationResult, sft_rounds_in

    launched = []

    def launch(spec_path):  # stands in for the trainer: writes the adapter where the spec says
        spec = JobSpec.load(spec_path)
        Path(spec.output_dir).mkdir()
        (Path(spec.output_dir) / "round").write_text(str(len(launched)))
        launched.append(json.loads(Path(spec_path).read_text()))
        return {"num_examples": 1}

    def check(adapter):
        return ValidationResult(num_states=4, valid_fraction=1.0, expert_match=0.25 * len(launched), per_task={}, examples=[])

    spec = JobSpec("sft", "tiny-random", "demos.jsonl", "adapter", scratch_dir="/scratch/sft")
    rounds = sft_rounds_in(tmp_path, spec, launch, check, until_expert_match=0.5, max_rounds=4)
    assert len(rounds) == 2 and rounds[-1].validation.expert_match == 0.5
    assert (tmp_path / "adapter" / "round").read_text() == "1" and (tmp_path / "rounds" / "0" / "round").read_text() == "0"
    assert [(s["init_adapter_dir"], s["scratch_dir"], s["output_dir"]) for s in launched] == [
        ("", "/scratch/sft", "adapter"), ("rounds/0", "/scratch/sft-r1", "adapter")]  # relative: valid after the folder moves
    assert sorted(p.name for p in tmp_path.glob("sft_job*.json")) == ["sft_job.json", "sft_job_r1.json"]


def test_anchor_batches_label_the_completion_only():
    from dpo_driver.training import anchor_batches

    _, tok = load_model_and_tokenizer("tiny-random")
    batch = next(anchor_batches(tok, SFT_RECORDS[:3], batch_size=3, max_length=512, seed=0))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        learned = [int(t) for t, lab in zip(ids, labels) if lab != -100]
        assert all(int(lab) in (-100, int(t)) for t, lab in zip(ids, labels))
        assert labels[mask == 0].eq(-100).all()  # padding is never learned
        text = tok.decode(learned)
        assert text.lstrip().startswith('click button "') and "Task:" not in text  # the answer, not the prompt


def _demo_nll(adapter, records) -> float:
    from dpo_driver.training import anchor_batches

    model, tok = load_policy("tiny-random", adapter, dtype="float32")
    with torch.no_grad():
        return float(model(**next(anchor_batches(tok, records, len(records), 512, 0))).loss)


def test_dpo_anchor_keeps_the_demos_likely(sft, tmp_path):
    """Pairs that push the demos' own answers down: the anchored run keeps them more likely."""
    sft_dir = sft[0].adapter_dir
    against = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in DPO_RECORDS]
    params = replace(DPO, learning_rate=1e-2, num_train_epochs=2)
    plain = train_dpo("tiny-random", sft_dir, against, tmp_path / "plain", params).adapter_dir
    anchored = train_dpo("tiny-random", sft_dir, against, tmp_path / "anchored", replace(params, anchor_weight=1.0),
                         anchor=SFT_RECORDS).adapter_dir
    start, off, on = (_demo_nll(a, SFT_RECORDS) for a in (sft_dir, plain, anchored))
    assert off > start + 0.5  # the pairs alone make the demos less likely
    assert on < off - 0.5


def test_the_anchor_loss_is_the_plain_forward_loss_on_the_shared_prompt_model(sft, tmp_path):
    from dpo_driver.training import anchor_batches, completion_nll

    trainer = build_dpo_trainer("tiny-random", sft[0].adapter_dir, DPO_RECORDS, tmp_path, replace(DPO, bf16=False))
    batch = next(anchor_batches(trainer.processing_class, SFT_RECORDS, 4, 512, 0))  # 4 rows sharing a prefix, as pairs do
    with torch.no_grad():
        plain = trainer.model(**batch, use_cache=False).loss  # every position's logits, then the labelled ones
        fused = completion_nll(trainer.model, batch)
    torch.testing.assert_close(fused, plain)


def test_dpo_anchor_weight_needs_the_demos(sft, tmp_path):
    with pytest.raises(ValueError, match="anchor"):
        train_dpo("tiny-random", sft[0].adapter_dir, DPO_RECORDS, tmp_path / "dpo", replace(DPO, anchor_weight=1.0))
    assert not (tmp_path / "dpo").exists()


def test_chosen_sft_steps_is_sft_on_the_chosen_side_then_dpo_from_it(sft, tmp_path):
    """DPO with `chosen_sft_steps` = SFT on the pairs' chosen answers (+ the anchor demos) from the
    start adapter, then DPO from that adapter as start and reference; a retry reuses that stage."""
    start = sft[0].adapter_dir
    params = replace(DPO, chosen_sft_steps=3, anchor_weight=1.0)
    both = train_dpo("tiny-random", start, DPO_RECORDS, tmp_path / "both", params, anchor=SFT_RECORDS[:2])
    by_hand = train_sft("tiny-random", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in DPO_RECORDS] + SFT_RECORDS[:2],
                        tmp_path / "chosen", SFTParams(learning_rate=DPO.learning_rate, max_steps=3, until_expert_match=0.0,
                                                       per_device_train_batch_size=DPO.per_device_train_batch_size,
                                                       logging_steps=DPO.logging_steps), init_adapter_dir=start)
    then = train_dpo("tiny-random", by_hand.adapter_dir, DPO_RECORDS, tmp_path / "then", replace(params, chosen_sft_steps=0),
                     anchor=SFT_RECORDS[:2])
    a, b, s = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (both, then, sft[0]))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], s[k]) for k in a)  # and it trained
    # A retry of the same job (same scratch) reuses the chosen-side SFT instead of training it again.
    build_dpo_trainer("tiny-random", start, DPO_RECORDS, tmp_path / "scratch", params, anchor=SFT_RECORDS[:2])
    stage = tmp_path / "scratch" / "chosen_sft" / "adapter_model.safetensors"
    written = stage.stat().st_mtime_ns
    build_dpo_trainer("tiny-random", start, DPO_RECORDS, tmp_path / "scratch", params, anchor=SFT_RECORDS[:2])
    assert stage.stat().st_mtime_ns == written


def test_pack_pairs_makes_one_row_per_pair():
    """TRL's collator example: two pairs as four right-padded rows become two rows, each the chosen
    row then the rejected tail from the last shared token, which restarts at that token's position
    and cannot see the chosen tail."""
    from dpo_driver.shared_prompt import pack_pairs

    ids = torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    completion = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]])
    labels = ids.masked_fill(completion == 0, -100)
    p = pack_pairs(ids, attn, labels, pad_id=0)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 3, 6], [7, 8, 9, 8, 10, 11, 0]]
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert p.position_ids[1, :6].tolist() == [0, 1, 2, 1, 2, 3]
    assert p.shift_labels[0].tolist() == [-100, -100, 4, 5, -100, 6, -100]
    assert p.shift_labels[1, :6].tolist() == [-100, 9, -100, 10, 11, -100]
    # The rejected tail (packed 5..6) sees the prompt's first two tokens and itself, not 3 4 5 of the chosen row.
    assert p.allowed[0, 0, 6].tolist() == [True, True, False, False, False, True, True]
    assert p.allowed[0, 0, 4].tolist() == [True] * 5 + [False, False]
    # Not TRL's pair layout: odd rows, or rows that share no token.
    assert pack_pairs(ids[:3], attn[:3], labels[:3], pad_id=0) is None
    other = ids.clone()
    other[2, 0] = 99
    assert pack_pairs(other, attn, labels, pad_id=0) is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_dpo_is_the_same_loss_and_gradient(sft, tmp_path, monkeypatch, attn):
    """DPO with chosen and rejected sharing one forward per pair gives TRL's loss, gradient, metrics
    and reference log-probs, on pairs whose prompts differ in length and whose answers share tokens;
    and the model really sees one row per pair."""
    from dpo_driver import shared_prompt

    records = [dict(r, rejected=[{"role": "assistant", "content": 'click button "zz"'}]) for r in DPO_RECORDS[:2]] + DPO_RECORDS[9:11]
    records[3] = dict(records[3], prompt=[{"role": "user", "content": records[3]["prompt"][0]["content"] + " and more words here"}])
    packed_rows = []
    pack = shared_prompt.pack_pairs
    monkeypatch.setattr(shared_prompt, "pack_pairs", lambda *a: packed_rows.append(len((p := pack(*a)).input_ids)) or p)
    got = {}
    for shared in (False, True):
        trainer = build_dpo_trainer("tiny-random", sft[0].adapter_dir, records, tmp_path / str(shared),
                                    replace(DPO, bf16=False, shared_prompt=shared))
        trainer.model.get_base_model().set_attn_implementation(attn)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        with torch.no_grad():  # move the policy off its reference, so the loss is not log 2 whatever the logps
            for name, w in trainer.model.named_parameters():
                if w.requires_grad:
                    w.add_(0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(len(name))))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grad = torch.cat([w.grad.flatten() for w in trainer.model.parameters() if w.grad is not None])
        ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
        got[shared] = loss.detach(), grad, ref, {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert packed_rows == [4, 4, 4]  # the shared run's policy, reference and compute_ref_log_probs forwards: a row per pair
    (loss0, grad0, ref0, m0), (loss1, grad1, ref1, m1) = got[False], got[True]
    assert abs(loss0.item() - 0.6931) > 1e-3
    torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad1, grad0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ref1, ref0, atol=1e-4, rtol=1e-5)
    assert m1.keys() == m0.keys() and all(m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-5) for k in m0)


def test_a_record_longer_than_max_length_fails_training_and_writes_nothing(sft, tmp_path):
    """TRL would cut such a record at its end, its answer, and drop it or train on a fragment,
    silently; training names the records instead, before anything trains."""
    long_prompt = [{"role": "user", "content": "Task: Click on the button. " + "filler words here " * 40}]
    long_sft = SFT_RECORDS[:3] + [{"prompt": long_prompt, "completion": SFT_RECORDS[0]["completion"], "task": "social-media"}]
    with pytest.raises(ValueError, match=r"train_sft: 1 of 4 records are longer than max_length 64 tokens .*record 3, task 'social-media'"):
        train_sft("tiny-random", long_sft, tmp_path / "sft", replace(SFT, max_length=64))
    long_pair = {"prompt": long_prompt, "chosen": DPO_RECORDS[0]["chosen"], "rejected": DPO_RECORDS[0]["rejected"]}
    params = replace(DPO, max_length=64, chosen_sft_steps=2)
    with pytest.raises(ValueError, match=r"train_dpo: 1 of 5 records are longer than max_length 64"):
        train_dpo("tiny-random", sft[0].adapter_dir, DPO_RECORDS[:4] + [long_pair], tmp_path / "dpo", params)
    with pytest.raises(ValueError, match=r"train_dpo: 1 of 6 records"):  # an anchor demo counts too
        train_dpo("tiny-random", sft[0].adapter_dir, DPO_RECORDS[:4], tmp_path / "dpo", replace(params, anchor_weight=1.0),
                  anchor=long_sft[2:])
    assert list(tmp_path.iterdir()) == []


def test_micro_batches_train_the_same_step_without_padding(tmp_path):
    """A batch of 4 run as 4 micro-batches of 1 (gradients summed): the same examples, loss and
    gradient per optimizer step (float32, no dropout); each pass holds one example, never padded
    to the batch's longest (the longest record here is ~4x the shortest)."""
    from transformers import TrainerCallback

    class Grads(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    records = [{"prompt": [{"role": "user", "content": r["prompt"][0]["content"] + " filler" * (40 * (i % 3))}],
                "completion": r["completion"]} for i, r in enumerate(SFT_RECORDS[:8])]
    base = replace(SFT, max_steps=2, bf16=False, lora_dropout=0.0)
    grads, losses, widths = {}, {}, {}
    for micro in (0, 1):
        trainer = build_sft_trainer("tiny-random", records, tmp_path / f"m{micro}", replace(base, micro_batch_size=micro))
        assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == ((4, 1) if micro == 0 else (1, 4))
        seen, cb = [], Grads()
        trainer.add_callback(cb)
        forward = trainer.model.forward
        trainer.model.forward = lambda *a, **kw: (seen.append(kw["input_ids"].shape), forward(*a, **kw))[1]
        trainer.train()
        grads[micro], widths[micro] = cb.steps, seen
        losses[micro] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert [s[0] for s in widths[0]] == [4, 4] and [s[0] for s in widths[1]] == [1] * 8
    assert sum(s[0] * s[1] for s in widths[1]) < sum(s[0] * s[1] for s in widths[0])  # no padding
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-4)
    assert len(grads[0]) == len(grads[1]) == 2 and grads[0][0].keys() == grads[1][0].keys() and grads[0][0]
    for name, g in grads[0][0].items():
        assert torch.allclose(g, grads[1][0][name], rtol=1e-3, atol=1e-6), name


def test_micro_batch_size_must_divide_the_batch():
    from dpo_driver.training import micro_batches

    assert micro_batches(replace(SFT, micro_batch_size=2)) == (2, 2)
    with pytest.raises(ValueError, match="must divide"):
        micro_batches(replace(SFT, micro_batch_size=3))


def test_the_chosen_side_stage_and_rft_take_the_sft_micro_batch():
    from dpo_driver.training import micro_batches, sft_params_like

    sft = sft_params_like(replace(DPO, sft_micro_batch_size=1), max_steps=3)
    assert sft.micro_batch_size == 1 and micro_batches(sft) == (1, 4) and sft.max_steps == 3
    # DPO's own batches are not split: the split is exact for SFT's loss, normalised over the step's tokens.
    assert micro_batches(replace(DPO, sft_micro_batch_size=1)) == (4, 1)
