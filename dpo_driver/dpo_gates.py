"""Blocking gates on the DPO adapter: KL to the reference, and preference accuracy on held-out pairs.

The reference is the *start adapter* DPO trained from (the SFT LoRA as it was before DPO; see
`training.build_dpo_trainer`), the policy the trained DPO adapter; both are LoRA adapters on the same
base. One PeftModel holds both: the policy as adapter "default", the reference as "ref", switched
with `set_adapter` (a reference of None is the bare base: adapters disabled).

- `train_and_validation_pairs`: the held-out pairs come from rollout seeds kept for validation
  (no training pair is given up); `split_pairs` holds out a share of the pairs instead, stratified
  by task, with no prompt on both sides, for sources without such seeds (logged traces).
- `preference_accuracy`: the fraction of held-out pairs whose implicit reward margin is positive,
  TRL's `rewards/accuracies`; `PreferenceAccuracy.verdict(min_accuracy)`.
- `kl_to_reference`: per-token KL(policy || reference) on held-out prompts; `KLResult.verdict(max_kl)`.

A failed verdict names the value, its threshold and the gap; an empty check is a failure, never a pass.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

POLICY, REFERENCE = "default", "ref"  # adapter names in the PeftModel `load_policy_and_reference` returns


# --------------------------------------------------------------------------------------------- split


def _task_stream(seed: int, task: str) -> np.random.Generator:
    """A generator per (seed, task): adding or removing a task leaves the other tasks' splits alone."""
    digest = int.from_bytes(hashlib.sha256(str(task).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


def split_pairs(pairs: pd.DataFrame, fraction: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation) rows of `pairs` (PAIR_COLUMNS), stratified by task.

    Pairs that share a prompt stay on one side, so no validation prompt is seen in training. Per
    task, prompt groups (ordered by their smallest pair_id) are visited in a seeded order and each
    goes to validation if it still fits in `round(fraction * n)` pairs; if none fits, the smallest
    group goes. Never the task's last group: a task with >= 2 pairs on >= 2 prompts gets at least one
    validation pair and keeps at least one training pair. A task with one pair, or with all its pairs
    on one prompt, stays wholly in training (so it has no held-out accuracy). A prompt that occurs
    under two tasks (never, with MiniWoB utterances) is kept in training.
    Deterministic: the row order of `pairs` does not matter; no Python `hash()` is used.
    `fraction` 0 gives an empty validation split. Both frames keep the input's columns and row order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split_pairs: fraction must be in [0, 1), got {fraction}")
    missing = [c for c in ("pair_id", "task", "prompt") if c not in pairs.columns]
    if missing:
        raise ValueError(f"split_pairs: pairs lack columns {missing}")
    if pairs["pair_id"].duplicated().any():
        raise ValueError("split_pairs: pair_id is not unique; the split is keyed on it")
    held: set[str] = set()
    if fraction > 0:
        for task, rows in sorted(pairs.groupby("task", sort=False), key=lambda kv: str(kv[0])):
            groups = sorted(rows.groupby("prompt", sort=False)["pair_id"].apply(sorted).tolist())
            if len(rows) < 2 or len(groups) < 2:
                continue
            want = max(1, round(fraction * len(rows)))
            order = _task_stream(seed, task).permutation(len(groups))
            picked, taken = [], 0
            for g in order:  # in the seeded order, the groups that fit, never the task's last one
                if len(picked) == len(groups) - 1:
                    break
                if taken + len(groups[g]) <= want:
                    picked.append(g)
                    taken += len(groups[g])
            if not picked:  # every group is larger than the target: the smallest one, first in seeded order
                picked = [min(order, key=lambda g: len(groups[g]))]
            for g in picked:
                held.update(groups[g])
    is_val = pairs["pair_id"].isin(held)
    shared = set(pairs.loc[is_val, "prompt"]) & set(pairs.loc[~is_val, "prompt"])  # a prompt under two tasks
    is_val &= ~pairs["prompt"].isin(shared)
    return pairs[~is_val].reset_index(drop=True), pairs[is_val].reset_index(drop=True)


def train_and_validation_pairs(episodes: list[dict], build: Callable[[list[dict]], pd.DataFrame], fraction: float = 0.0,
                               seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation) pairs of a rollout stage's episodes; `build` makes pairs from episodes
    (`pairs.build_preference_pairs` with the stage's params).

    Validation pairs come from the episodes rolled out on the plan's pair-validation seeds (`split`
    "validation"; `rollouts.collect_rollouts`), built apart from the training episodes, so the
    training pairs are exactly those a run without validation seeds makes: a small task gives up
    none of its pairs. A validation pair whose prompt also occurs among the training pairs (pages
    that recur word for word) is dropped, so every held-out prompt is unseen. Sources with no
    validation seeds (logged traces) hold out `fraction` of the training pairs instead (`split_pairs`).
    """
    held_eps = [e for e in episodes if e.get("split") == "validation"]
    train = build([e for e in episodes if e.get("split") != "validation"])
    held = build(held_eps) if held_eps else train.iloc[:0]
    held = held[~held["prompt"].isin(set(train["prompt"]))]
    if fraction > 0:
        train, by_fraction = split_pairs(train, fraction, seed)
        held = pd.concat([held, by_fraction], ignore_index=True)
    return train.reset_index(drop=True), held.reset_index(drop=True)


# ------------------------------------------------------------------------------------------- loading


def load_policy_and_reference(base_model: str, policy_adapter: Path, reference_adapter: Path | None, dtype: str = "auto"):
    """(model, tokenizer) in eval mode: one PeftModel with the policy as adapter "default" and the
    reference as "ref" (none when `reference_adapter` is None: the reference is then the bare base)."""
    from .training import load_policy

    for name, path in (("policy", policy_adapter), ("reference", reference_adapter)):
        if path is not None and not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"{name} adapter dir {path} has no adapter_config.json")
    model, tokenizer = load_policy(base_model, Path(policy_adapter), dtype=dtype)
    if reference_adapter is not None:
        model.load_adapter(str(reference_adapter), adapter_name=REFERENCE)
    model.set_adapter(POLICY)
    return model.eval(), tokenizer


class _Adapter:
    """Context: run `model` as the policy or the reference."""

    def __init__(self, model, name: str):
        self.model, self.name, self._off = model, name, None

    def __enter__(self):
        if self.name == REFERENCE and REFERENCE not in self.model.peft_config:
            self._off = self.model.disable_adapter()  # no reference adapter: the bare base
            self._off.__enter__()
        else:
            self.model.set_adapter(self.name)
        return self.model

    def __exit__(self, *exc):
        if self._off is not None:
            self._off.__exit__(*exc)
        self.model.set_adapter(POLICY)
        return False


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask and the positions of the real tokens (as generate() counts them)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def _tail_logprobs(model, seqs: list[list[int]], tails: list[int], pad_id: int) -> list[torch.Tensor]:
    """Per sequence, the float32 log-softmax of the next-token distributions that predict its last
    `tails[i]` tokens: a [tails[i], vocab] tensor. Left padding puts every tail at the end, so only
    the last max(tails) + 1 positions' logits are computed."""
    keep = max(tails) + 1
    batch = _left_pad(seqs, pad_id, _device(model))
    logits = model(**batch, use_cache=False, logits_to_keep=keep).logits[:, -keep:]
    out = []
    for i, t in enumerate(tails):
        out.append(logits[i, keep - 1 - t : keep - 1].float().log_softmax(-1))
    return out


# ------------------------------------------------------------------------------- completion log-probs


def _messages(x, role: str) -> list[dict]:
    return [{"role": role, "content": x}] if isinstance(x, str) else list(x)


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              add_generation_prompt=add_generation_prompt)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer, record: dict, max_length: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of a conversational DPO record, as TRL 1.16's DPOTrainer
    forms them: the chat-templated prompt with the generation prompt, and each completion as the
    tokens of the templated prompt+completion conversation after the prefix it shares with both
    (so the completion ends with the template's end-of-turn tokens). With `max_length`, each
    prompt+completion is cut to its first `max_length` tokens (TRL's "keep_start").
    A plain-string prompt or completion is taken as one user or assistant message.
    """
    prompt = _messages(record["prompt"], "user")
    p = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
    c = _chat_ids(tokenizer, prompt + _messages(record["chosen"], "assistant"))
    r = _chat_ids(tokenizer, prompt + _messages(record["rejected"], "assistant"))
    n = min(_common_prefix(p, c), _common_prefix(p, r))
    prompt_ids, chosen, rejected = p[:n], c[n:], r[n:]
    if max_length is not None:
        chosen = chosen[: max(0, max_length - n)]
        rejected = rejected[: max(0, max_length - n)]
        prompt_ids = prompt_ids[:max_length]
    return prompt_ids, chosen, rejected


@torch.no_grad()
def completion_logprobs(model, tokenizer, records: list[dict], batch_size: int = 8, max_length: int | None = None) -> torch.Tensor:
    """[len(records), 2] float32: the summed log-prob of the chosen (column 0) and rejected (column 1)
    completion of each record given its prompt, under the model's active adapter (TRL's `*_logps`).
    A completion cut away entirely by `max_length` scores 0."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs, tails = [], []
    for record in records:
        prompt_ids, chosen, rejected = tokenize_pair(tokenizer, record, max_length)
        for completion in (chosen, rejected):
            seqs.append(prompt_ids + completion)
            tails.append(len(completion))
    out = torch.zeros(len(seqs))
    step = max(1, batch_size) * 2
    for i in range(0, len(seqs), step):
        chunk, chunk_tails = seqs[i : i + step], tails[i : i + step]
        for j, logp in enumerate(_tail_logprobs(model, chunk, chunk_tails, pad_id)):
            t = chunk_tails[j]
            if t:
                target = torch.tensor(chunk[j][-t:], device=logp.device)
                out[i + j] = logp.gather(-1, target[:, None]).sum().cpu()
    return out.view(-1, 2)


def policy_logprobs(model, tokenizer, records: list[dict], batch_size: int = 8, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """{"policy": [n, 2], "reference": [n, 2]} summed completion log-probs (chosen, rejected) of a
    `load_policy_and_reference` model under each adapter."""
    model.eval()
    out = {}
    for key, name in (("policy", POLICY), ("reference", REFERENCE)):
        with _Adapter(model, name):
            out[key] = completion_logprobs(model, tokenizer, records, batch_size, max_length)
    return out


# ------------------------------------------------------------------------------ preference accuracy


@dataclass(frozen=True)
class PreferenceAccuracy:
    num_pairs: int
    accuracy: float  # pairs with implicit reward margin > 0 (TRL's rewards/accuracies); ties count as wrong
    mean_margin: float  # mean of (logπ-logπref)(chosen) - (logπ-logπref)(rejected), nats; x beta = TRL's rewards/margins
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> pairs, accuracy, mean_margin
    margins: list[float] = field(default_factory=list)  # per pair, in record order

    def verdict(self, min_accuracy: float = 0.7) -> tuple[bool, str]:
        """(passed, message). The message names the value, the threshold and the gap."""
        if self.num_pairs == 0:  # fails unless the threshold asks for nothing (plumbing presets)
            return min_accuracy <= 0, ("preference accuracy: no held-out pairs to measure it on (the validation split of "
                           "preference_pairs is empty: too few pairs, or every task has a single prompt); "
                           "collect more pairs or raise the validation fraction.")
        where = f"on {self.num_pairs} held-out pairs (mean margin {self.mean_margin:+.3f} nats)"
        if self.accuracy >= min_accuracy:
            return True, f"preference accuracy {self.accuracy:.0%} >= {min_accuracy:.0%} {where}"
        weak = sorted((s["accuracy"], t) for t, s in self.per_task.items() if s["accuracy"] < min_accuracy)
        gap = 100 * (min_accuracy - self.accuracy)
        return False, (
            f"preference accuracy {self.accuracy:.0%} < {min_accuracy:.0%} (by {gap:.0f} points) {where}"
            + (f"; weakest tasks: {', '.join(f'{t} {a:.0%}' for a, t in weak[:8])}" if weak else "")
            + ": the DPO policy does not prefer chosen over rejected on unseen prompts. Train on more pairs "
              "or for more steps (dpo min_steps / num_train_epochs), or check the pairs' margins."
        )


def _accuracy(margins: list[float], tasks: list[str]) -> PreferenceAccuracy:
    per: dict[str, list[float]] = defaultdict(list)
    for t, m in zip(tasks, margins):
        per[t].append(m)
    n = len(margins)
    return PreferenceAccuracy(
        num_pairs=n,
        accuracy=sum(m > 0 for m in margins) / n if n else 0.0,
        mean_margin=float(np.mean(margins)) if n else 0.0,
        per_task={t: {"pairs": len(ms), "accuracy": sum(m > 0 for m in ms) / len(ms), "mean_margin": float(np.mean(ms))}
                  for t, ms in sorted(per.items())},
        margins=list(margins),
    )


def preference_accuracy(
    base_model: str,
    policy_adapter: Path,
    reference_adapter: Path | None,
    records: list[dict],
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str = "auto",
    loaded: tuple | None = None,
) -> PreferenceAccuracy:
    """How often the policy's implicit reward prefers chosen on held-out DPO `records`
    (`pairs.to_dpo_records` of the validation split).

    Margin per pair: (logπ(chosen) - logπref(chosen)) - (logπ(rejected) - logπref(rejected)), summed
    completion log-probs tokenized as TRL's DPOTrainer does (`tokenize_pair`); accuracy = fraction
    with margin > 0, as TRL's `rewards/accuracies` (beta > 0 does not change the sign). `max_length`
    None scores whole completions; pass DPOParams.max_length to cut them as training did.
    `loaded`: a `load_policy_and_reference` (model, tokenizer) to reuse instead of loading.
    """
    if not records:
        return _accuracy([], [])
    model, tokenizer = loaded or load_policy_and_reference(base_model, policy_adapter, reference_adapter, dtype)
    lp = policy_logprobs(model, tokenizer, records, batch_size, max_length)
    ratio = lp["policy"] - lp["reference"]
    margins = (ratio[:, 0] - ratio[:, 1]).tolist()
    return _accuracy(margins, [str(r.get("task", "?")) for r in records])


# --------------------------------------------------------------------------------------------- KL


@dataclass(frozen=True)
class KLResult:
    num_prompts: int
    num_tokens: int  # generated tokens the KL is averaged over
    kl_per_token: float  # mean over those tokens of KL(policy(.|prefix) || reference(.|prefix)), nats
    max_token_kl: float  # the largest single-position KL
    per_prompt: list[float] = field(default_factory=list)  # mean KL per token of each prompt's answer
    estimator: str = "greedy"  # "greedy" or "sample"

    def verdict(self, max_kl: float = 0.1) -> tuple[bool, str]:
        """(passed, message). The message names the value, the threshold and the gap."""
        if self.num_tokens == 0:
            return False, "KL(policy‖reference): no held-out prompts (or no generated tokens) to measure it on."
        where = f"on {self.num_tokens} tokens the policy generated for {self.num_prompts} held-out prompts"
        if not math.isfinite(self.kl_per_token):
            return False, f"KL(policy‖reference) is {self.kl_per_token} per token {where}: the policy's distributions are broken."
        if self.kl_per_token <= max_kl:
            return True, f"KL(policy‖reference) {self.kl_per_token:.3f} per token <= {max_kl:.3f} {where}"
        return False, (
            f"KL(policy‖reference) {self.kl_per_token:.3f} per token > {max_kl:.3f} "
            f"(by {self.kl_per_token - max_kl:.3f}) {where} (largest at one token {self.max_token_kl:.2f}): "
            "DPO moved too far from the SFT policy; lower the DPO learning rate or raise beta."
        )


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def kl_to_reference(
    base_model: str,
    policy_adapter: Path,
    reference_adapter: Path | None,
    prompts: list[str],
    max_new_tokens: int = 24,
    batch_size: int = 8,
    sample: bool = False,
    seed: int = 0,
    dtype: str = "auto",
    loaded: tuple | None = None,
) -> KLResult:
    """Per-token KL(policy ‖ reference) on held-out `prompts` (user messages, chat-templated).

    Estimator: the policy answers each prompt — greedily, or with `sample` one sample at
    temperature 1 (no top-k/top-p) under `seed` — for at most `max_new_tokens` tokens, up to and
    including its end-of-turn token. At every generated position t the exact KL between the two
    next-token distributions given the same prefix (prompt + y_<t) is computed over the whole
    vocabulary: sum_v p(v) (log p(v) - log q(v)), p the policy, q the reference. The result is the
    mean over all generated tokens of all prompts (each token weighs the same, so long answers weigh
    more). With `sample`, sum_t KL_t is an unbiased estimate of the sequence KL(π ‖ πref) (its
    Rao-Blackwellised form) and the result estimates it per token; greedy decoding measures it
    along the policy's most likely answers, the ones evaluation plays, deterministically.
    `loaded`: a `load_policy_and_reference` (model, tokenizer) to reuse instead of loading.
    """
    if not prompts:
        return KLResult(0, 0, 0.0, 0.0, [], "sample" if sample else "greedy")
    model, tokenizer = loaded or load_policy_and_reference(base_model, policy_adapter, reference_adapter, dtype)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    if sample:
        gen_kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    else:
        gen_kwargs.update(do_sample=False)
    per_prompt, total, count, worst = [], 0.0, 0, 0.0
    with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), max(1, batch_size)):
            ids = [_chat_ids(tokenizer, _messages(p, "user"), add_generation_prompt=True) for p in prompts[i : i + batch_size]]
            batch = _left_pad(ids, pad_id, _device(model))
            with _Adapter(model, POLICY):
                gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **gen_kwargs)
            answers = []
            for row in gen[:, batch["input_ids"].shape[1] :].tolist():
                cut = next((k + 1 for k, tok in enumerate(row) if tok in eos), len(row))
                answers.append(row[:cut])
            keep = [j for j, a in enumerate(answers) if a]
            kls: dict[int, torch.Tensor] = {}
            if keep:
                seqs, tails = [ids[j] + answers[j] for j in keep], [len(answers[j]) for j in keep]
                with _Adapter(model, POLICY):
                    logp = _tail_logprobs(model, seqs, tails, pad_id)
                with _Adapter(model, REFERENCE):
                    logq = _tail_logprobs(model, seqs, tails, pad_id)
                for j, p, q in zip(keep, logp, logq):
                    kls[j] = (p.exp() * (p - q)).sum(-1).clamp(min=0.0).cpu()  # clamp: float rounding below 0
            for j in range(len(answers)):
                k = kls.get(j)
                if k is None or k.numel() == 0:
                    per_prompt.append(0.0)
                    continue
                per_prompt.append(float(k.mean()))
                total += float(k.sum())
                count += k.numel()
                worst = max(worst, float(k.max()))
    return KLResult(len(prompts), count, total / count if count else 0.0, worst, per_prompt, "sample" if sample else "greedy")
