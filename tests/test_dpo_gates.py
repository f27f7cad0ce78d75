import math
import pandas as pd
import pytest
import torch

from dpo_driver.dpo_gates import (
    KLResult,
    PreferenceAccuracy,
    completion_logprobs,
    kl_to_reference,
    load_policy_and_reference,
    policy_logprobs,
    preference_accuracy,
    split_pairs,
    tokenize_pair,
)
from dpo_driver.pairs import PAIR_COLUMNS, pair_id, to_dpo_records
from dpo_driver.training import DPOParams, SFTParams, build_dpo_trainer, load_policy, train_dpo, train_sft

NAMES = ["okay", "Cancel", "Submit", "Next"]


def _prompt(name: str, i: int) -> str:
    return f'Task: Click on the "{name}" button.\n{i}. button "{name}"'


SFT_RECORDS = [
    {"prompt": [{"role": "user", "content": _prompt(n, i)}], "completion": [{"role": "assistant", "content": f'click button "{n}"'}]}
    for i in range(1, 5) for n in NAMES
]


def _pairs(indices, names=NAMES, rejected='type textbox "Myron"') -> pd.DataFrame:
    rows = []
    for i in indices:
        for n in names:
            p, c = _prompt(n, i), f'click button "{n}"'
            rows.append({"pair_id": pair_id(p, c, rejected), "task": f"click-{n.lower()}", "seed": i, "step": 0, "prompt": p,
                         "chosen": c, "rejected": rejected, "chosen_score": 1.0, "rejected_score": 0.0, "margin": 1.0,
                         "chosen_episode": "c", "rejected_episode": "r"})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


TRAIN_PAIRS = to_dpo_records(_pairs(range(1, 5)))
# Held-out: same kind of state, element indices DPO never saw.
HELD_OUT = to_dpo_records(_pairs(range(5, 8)))
SWAPPED = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in TRAIN_PAIRS]
SFT = SFTParams(max_steps=0, min_steps=0, learning_rate=1e-2, num_train_epochs=2, per_device_train_batch_size=4, logging_steps=1, bf16=False)
DPO = DPOParams(max_steps=0, min_steps=0, learning_rate=1e-3, per_device_train_batch_size=4, logging_steps=1, bf16=False)


pytestmark = pytest.mark.usefixtures("model_cache")  # tiny models built once per module


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """(sft = the reference, dpo = the policy trained from it on TRAIN_PAIRS)."""
    root = tmp_path_factory.mktemp("gates")
    sft = train_sft("tiny-random", SFT_RECORDS, root / "sft", SFT).adapter_dir
    dpo = train_dpo("tiny-random", sft, TRAIN_PAIRS, root / "dpo", DPO).adapter_dir
    return sft, dpo


@pytest.fixture(scope="module")
def loaded(adapters):
    sft, dpo = adapters
    return load_policy_and_reference("tiny-random", dpo, sft, dtype="float32")


# ------------------------------------------------------------------------------------------- split


def _split_frame() -> pd.DataFrame:
    rows = []

    def add(task, prompt, k):
        rows.append({"pair_id": pair_id(prompt, f"c{k}", f"r{k}"), "task": task, "prompt": prompt, "chosen": f"c{k}", "rejected": f"r{k}"})

    for p in range(6):  # big: 12 pairs on 6 prompts
        for k in range(2):
            add("big", f"big prompt {p}", k)
    for p in range(3):  # small: 3 pairs on 3 prompts
        add("small", f"small prompt {p}", 0)
    add("single", "single prompt", 0)  # one pair: never split
    add("one-prompt", "shared prompt", 0)  # two pairs on one prompt: cannot split without sharing it
    add("one-prompt", "shared prompt", 1)
    return pd.DataFrame(rows)


def test_split_is_stratified_prompt_disjoint_and_complete():
    pairs = _split_frame()
    train, val = split_pairs(pairs, 0.25, seed=0)
    assert sorted(train.pair_id.tolist() + val.pair_id.tolist()) == sorted(pairs.pair_id)
    assert set(train.pair_id).isdisjoint(val.pair_id)
    assert set(train.prompt).isdisjoint(val.prompt)  # validation prompts are unseen in training
    counts = val.task.value_counts().to_dict()
    assert counts == {"big": 2, "small": 1}  # 25% of 12 = 3: one prompt group of 2 fits, a second would not
    assert set(train.task) == set(pairs.task)  # every task keeps training pairs
    assert list(train.columns) == list(pairs.columns)


def test_split_is_deterministic_and_seeded():
    pairs = _split_frame()
    a = split_pairs(pairs, 0.3, seed=0)
    b = split_pairs(pairs.sample(frac=1.0, random_state=7), 0.3, seed=0)  # row order does not matter
    assert sorted(a[1].pair_id) == sorted(b[1].pair_id)
    assert sorted(split_pairs(pairs, 0.3, seed=0)[1].pair_id) == sorted(a[1].pair_id)
    others = {tuple(sorted(split_pairs(pairs, 0.3, seed=s)[1].pair_id)) for s in range(1, 6)}
    assert others - {tuple(sorted(a[1].pair_id))}  # another seed draws other prompts


def test_split_edge_cases():
    pairs = _split_frame()
    train, val = split_pairs(pairs, 0.0)
    assert val.empty and list(val.columns) == list(pairs.columns) and len(train) == len(pairs)
    train, val = split_pairs(pairs, 0.95)  # never all of a task's pairs in validation
    assert set(train.task) == set(pairs.task)
    assert val.task.value_counts().to_dict() == {"big": 10, "small": 2}
    empty = pairs.iloc[:0]
    assert [len(x) for x in split_pairs(empty, 0.2)] == [0, 0]
    with pytest.raises(ValueError, match="fraction"):
        split_pairs(pairs, 1.0)
    with pytest.raises(ValueError, match="columns"):
        split_pairs(pairs.drop(columns=["task"]), 0.2)


def test_split_fits_groups_to_the_fraction():
    rows = [{"pair_id": f"a{k}", "task": "tab", "prompt": "big prompt"} for k in range(5)]
    rows += [{"pair_id": "b0", "task": "tab", "prompt": "small prompt"}]
    rows += [{"pair_id": f"c{k}{j}", "task": "even", "prompt": f"p{k}"} for k in range(3) for j in range(3)]
    for seed in range(5):
        _, val = split_pairs(pd.DataFrame(rows), 0.2, seed=seed)
        assert sorted(val[val.task == "tab"].pair_id) == ["b0"]  # not 5 of 6 pairs for a 20% split
        assert len(val[val.task == "even"]) == 3  # no group of 3 fits in round(0.2 * 9) = 2: one group still goes


def test_a_prompt_under_two_tasks_stays_in_training():
    pairs = _split_frame()
    clash = pairs[pairs.task == "small"].assign(task="big", pair_id=lambda d: d.pair_id + "x")
    train, val = split_pairs(pd.concat([pairs, clash], ignore_index=True), 0.5)
    assert set(train.prompt).isdisjoint(val.prompt)


# ------------------------------------------------------------------------------------ log-probs


def test_tokenization_and_logprobs_match_trl(adapters, loaded, tmp_path):
    sft, _ = adapters
    model, tok = loaded
    trainer = build_dpo_trainer("tiny-random", sft, TRAIN_PAIRS, tmp_path, DPO)
    rows = [trainer.train_dataset[i] for i in range(4)]
    for row, record in zip(rows, TRAIN_PAIRS):
        assert tokenize_pair(tok, record) == (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
    batch = trainer.data_collator(rows)
    want = torch.stack(trainer.compute_ref_log_probs(trainer.model, batch), dim=1)  # the frozen SFT copy
    got = policy_logprobs(model, tok, TRAIN_PAIRS[:4], batch_size=3)
    torch.testing.assert_close(got["reference"], want, atol=1e-3, rtol=1e-4)
    assert (got["policy"] - got["reference"]).abs().max() > 0.1  # and the policy adapter is another one


def test_adapters_switch_as_two_separate_loads(adapters, loaded):
    sft, dpo = adapters
    model, tok = loaded
    got = policy_logprobs(model, tok, HELD_OUT[:5], batch_size=2)
    for key, adapter in (("policy", dpo), ("reference", sft)):
        alone, _ = load_policy("tiny-random", adapter, dtype="float32")
        torch.testing.assert_close(got[key], completion_logprobs(alone, tok, HELD_OUT[:5], batch_size=5), atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- preference accuracy


def test_trained_preferences_are_recovered(adapters, loaded):
    sft, dpo = adapters
    trained = preference_accuracy("tiny-random", dpo, sft, TRAIN_PAIRS, loaded=loaded)
    assert trained.num_pairs == len(TRAIN_PAIRS) and trained.accuracy == 1.0 and trained.mean_margin > 0
    assert set(trained.per_task) == {f"click-{n.lower()}" for n in NAMES}
    assert all(s["pairs"] == 4 and s["accuracy"] == 1.0 for s in trained.per_task.values())
    swapped = preference_accuracy("tiny-random", dpo, sft, SWAPPED, loaded=loaded)
    assert swapped.accuracy == 0.0 and swapped.mean_margin == pytest.approx(-trained.mean_margin, rel=1e-4)
    held = preference_accuracy("tiny-random", dpo, sft, HELD_OUT, loaded=loaded)
    assert held.accuracy >= 0.75 and held.verdict(0.7)[0]


def test_policy_equal_to_reference_has_zero_margins(adapters):
    sft, _ = adapters
    same = preference_accuracy("tiny-random", sft, sft, TRAIN_PAIRS[:6], dtype="float32")
    assert same.margins == [0.0] * 6 and same.accuracy == 0.0  # ties are not preferences (TRL's rule)
    assert not same.verdict(0.7)[0]


# ------------------------------------------------------------------------------------------ KL


PROMPTS = [r["prompt"][0]["content"] for r in HELD_OUT]


def test_kl_is_zero_for_the_reference_itself(adapters):
    sft, _ = adapters
    res = kl_to_reference("tiny-random", sft, sft, PROMPTS[:6], dtype="float32")
    assert res.num_prompts == 6 and res.num_tokens >= 6
    assert res.kl_per_token < 1e-6 and res.verdict(0.1)[0]


def test_kl_after_dpo_is_positive_and_exact(adapters, loaded):
    sft, dpo = adapters
    model, tok = loaded
    res = kl_to_reference("tiny-random", dpo, sft, PROMPTS, batch_size=5, loaded=loaded)
    assert res.num_prompts == len(PROMPTS) and len(res.per_prompt) == len(PROMPTS)
    assert res.kl_per_token > 1e-3 and res.max_token_kl >= res.kl_per_token
    # Against the bare base (no reference adapter) the policy is further still.
    assert kl_to_reference("tiny-random", dpo, None, PROMPTS, dtype="float32").kl_per_token > res.kl_per_token
    # Independently: two separate models, one prompt, unbatched, every position by hand.
    policy, _ = load_policy("tiny-random", dpo, dtype="float32")
    reference, _ = load_policy("tiny-random", sft, dtype="float32")
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[3]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = policy.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        new = new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new
        seq = torch.tensor([ids["input_ids"][0].tolist() + new])
        n = len(new)
        p = policy(input_ids=seq).logits[0, -n - 1 : -1].log_softmax(-1)
        q = reference(input_ids=seq).logits[0, -n - 1 : -1].log_softmax(-1)
    assert res.per_prompt[3] == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-3, abs=1e-6)


def test_sampled_kl_is_seeded(adapters, loaded):
    sft, dpo = adapters
    runs = [kl_to_reference("tiny-random", dpo, sft, PROMPTS[:6], sample=True, seed=s, loaded=loaded) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0].estimator == "sample"
    assert runs[0].kl_per_token > 0


# ------------------------------------------------------------------------------------- verdicts


def test_verdict_messages_name_value_threshold_and_gap():
    ok, msg = KLResult(10, 200, 0.23, 1.5, [0.2] * 10).verdict(0.1)
    assert not ok and "KL(policy‖reference) 0.230 per token > 0.100 (by 0.130)" in msg and "beta" in msg
    ok, msg = KLResult(10, 200, 0.04, 0.3).verdict(0.1)
    assert ok and "0.040" in msg
    ok, msg = KLResult(10, 200, float("nan"), 0.0).verdict(0.1)
    assert not ok and "nan" in msg
    per_task = {"a": {"pairs": 10, "accuracy": 0.9, "mean_margin": 1.0}, "b": {"pairs": 10, "accuracy": 0.2, "mean_margin": -1.0}}
    ok, msg = PreferenceAccuracy(20, 0.55, 0.1, per_task).verdict(0.7)
    assert not ok and "preference accuracy 55% < 70% (by 15 points) on 20 held-out pairs" in msg and "b 20%" in msg
    assert "a 90%" not in msg
    ok, msg = PreferenceAccuracy(20, 0.7, 0.5, per_task).verdict(0.7)
    assert ok and "70% >= 70%" in msg


def test_empty_checks_fail_explicitly(tmp_path):
    # Nothing is loaded for an empty check: the adapter paths are not even read.
    acc = preference_accuracy("tiny-random", tmp_path / "none", tmp_path / "none", [])
    ok, msg = acc.verdict(0.7)
    assert not ok and acc.num_pairs == 0 and "no held-out pairs" in msg
    kl = kl_to_reference("tiny-random", tmp_path / "none", None, [])
    ok, msg = kl.verdict(0.1)
    assert not ok and kl.num_tokens == 0 and "no held-out prompts" in msg
    assert not math.isnan(kl.kl_per_token)


def test_missing_adapter_is_named(adapters, tmp_path):
    sft, _ = adapters
    with pytest.raises(ValueError, match="reference adapter dir .* no adapter_config.json"):
        load_policy_and_reference("tiny-random", sft, tmp_path, dtype="float32")


def test_dtype_default_loads(adapters):
    """The default dtype ("auto": bf16 where native) runs too; margins keep their sign."""
    sft, dpo = adapters
    res = preference_accuracy("tiny-random", dpo, sft, TRAIN_PAIRS[:4])
    assert res.num_pairs == 4 and res.accuracy == 1.0
