"""LoRA SFT and DPO with TRL: plain functions the Dagster assets call.

Records are TRL conversational data. SFT: {"prompt": [user msg], "completion": [assistant msg]};
TRL masks the prompt, so the loss is on the completion only. DPO: {"prompt", "chosen", "rejected"}.
Adapters are written to a temp dir beside `output_dir` and renamed onto it, so a killed run never
leaves a half-written adapter behind. With `checkpoint_steps` > 0 the trainer checkpoints into a
scratch dir that is stable per output dir (`.<name>.scratch` beside it): it is kept when a run fails
or is killed, a retry of the same job resumes from its last complete checkpoint, and it is removed
once the adapter is in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from .dpo_gates import _chat_ids, _messages  # the chat templating the gates score pairs with
from .io import atomic_write_text, replace_dir
from .model import bf16_is_native, load_model_and_tokenizer, resolve_model
from .shared_prompt import share_prompts


@dataclass
class SFTParams:
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (effective scale alpha/r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    target_modules: str | list[str] = "all-linear"  # PEFT target modules; "all-linear" skips lm_head
    learning_rate: float = 2e-4  # AdamW peak learning rate (linear decay)
    max_steps: int = 20  # the budget in optimizer steps, whatever the number of demos; 0 = num_train_epochs passes (see train_steps)
    until_expert_match: float = 0.5  # another round of max_steps while held-out expert match is below this (validation.train_until_ready); 0 = one round
    max_rounds: int = 4  # cap on those rounds
    num_train_epochs: float = 3.0  # passes over the demos, only when max_steps is 0
    min_steps: int = 20  # optimizer-step floor of the epoch budget (max_steps 0)
    per_device_train_batch_size: int = 8  # examples per step before accumulation
    gradient_accumulation_steps: int = 1  # steps summed per optimizer update
    # Run each batch as micro-batches of this many examples, gradients summed: the same examples per
    # optimizer step and the same loss (normalised over the whole batch's tokens), without padding
    # every example to the batch's longest. 0 = the batch in one pass (see micro_batches).
    micro_batch_size: int = 0
    max_length: int = 2048  # tokens per prompt+completion; a longer record fails training (see check_lengths)
    seed: int = 0  # seeds data order and LoRA init
    logging_steps: int = 5  # optimizer steps between on_log calls
    bf16: bool | None = None  # bf16 base weights + autocast; None = where bf16 is native (CUDA, AVX512-BF16/AMX CPU)
    load_in_4bit: bool = False  # QLoRA: 4-bit NF4 base via bitsandbytes (CUDA only)
    gradient_checkpointing: bool = False  # recompute activations to save GPU memory (~20% slower)
    checkpoint_steps: int = 0  # optimizer steps between resumable checkpoints in the scratch dir; 0 = none


@dataclass
class DPOParams:
    beta: float = 0.1  # strength of the pull towards the reference (SFT) policy
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])  # TRL losses; several are mixed
    loss_weights: list[float] | None = None  # one weight per loss_type; None = all 1.0
    learning_rate: float = 5e-5  # AdamW peak learning rate (linear decay)
    warmup_steps: int = 0  # optimizer steps of linear warm-up to the peak rate (Adam's first steps are its largest)
    anchor_weight: float = 0.0  # weight of an SFT loss on the expert demos added to every step (see _anchored); 0 = off
    chosen_sft_steps: int = 0  # SFT steps on the pairs' chosen side before DPO, whose start and reference that is (see _chosen_sft); 0 = off
    sft_micro_batch_size: int = 0  # SFTParams.micro_batch_size of the SFT this run does (chosen side; the RFT control); 0 = off
    max_steps: int = 46  # the budget in optimizer steps, whatever the number of pairs; 0 = num_train_epochs passes (see train_steps)
    num_train_epochs: float = 1.0  # passes over the pairs, only when max_steps is 0
    min_steps: int = 30  # optimizer-step floor of the epoch budget (max_steps 0)
    per_device_train_batch_size: int = 4  # pairs per step before accumulation
    gradient_accumulation_steps: int = 1  # steps summed per optimizer update
    max_length: int = 2048  # tokens per prompt+response; a longer record fails training (see check_lengths)
    seed: int = 0  # seeds data order
    logging_steps: int = 5  # optimizer steps between on_log calls
    bf16: bool | None = None  # bf16 base weights + autocast; None = where bf16 is native (CUDA, AVX512-BF16/AMX CPU)
    load_in_4bit: bool = False  # QLoRA: 4-bit NF4 base via bitsandbytes (CUDA only)
    gradient_checkpointing: bool = False  # TRL defaults this to True; off is faster for small models
    checkpoint_steps: int = 0  # optimizer steps between resumable checkpoints in the scratch dir; 0 = none
    shared_prompt: bool = True  # one forward per pair, chosen and rejected sharing the prompt's tokens (see shared_prompt.py)


@dataclass
class TrainResult:
    adapter_dir: Path  # PEFT adapter + tokenizer
    metrics: dict[str, float]  # last value of every logged number, then TRL's train_* summary
    num_examples: int  # records trained on
    log_history: list[dict]  # every log dict TRL emitted, in order


class _ForwardLogs(TrainerCallback):
    def __init__(self, on_log: Callable[[dict], None]):
        self.fn = on_log  # not `self.on_log`: that would shadow the hook

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.fn({**(logs or {}), "step": state.global_step, "max_steps": state.max_steps})


def _check_records(records: list[dict], fn: str, keys: tuple[str, ...]) -> None:
    if not records:
        raise ValueError(f"{fn} got no records; it needs at least one {keys} record to train on.")
    for i, record in enumerate(records):
        missing = [k for k in keys if k not in record]
        if missing:
            raise ValueError(f"{fn}: record {i} lacks {missing}; every record needs keys {keys}.")


def check_lengths(tokenizer, records: list[dict], max_length: int, fn: str) -> None:
    """Fail when a record's prompt + answer (each of `completion`, `chosen`, `rejected` it has) is
    longer than `max_length` tokens in the chat template.

    Why: TRL cuts such a record at the end, i.e. its answer, and then drops it or trains on a
    fragment, silently. At the old 512, 650 of 676 social-media-some steps (pages of 500-811
    tokens) lost their answers, so SFT and DPO never saw that task's actions while its evaluation
    (which generates on the whole page) counted it.
    """
    longest, over = 0, []
    for i, r in enumerate(records):
        prompt = _messages(r["prompt"], "user")
        for key in ("completion", "chosen", "rejected"):
            if key in r:
                n = len(_chat_ids(tokenizer, prompt + _messages(r[key], "assistant")))
                longest = max(longest, n)
                if n > max_length:
                    over.append(i)
                    break
    if over:
        raise ValueError(f"{fn}: {len(over)} of {len(records)} records are longer than max_length {max_length} tokens "
                         f"(longest {longest}; first: record {over[0]}, task {records[over[0]].get('task', '?')!r}); training would "
                         "cut their answers off. Raise max_length.")


def _use_bf16(bf16: bool | None) -> bool:
    # TRL defaults bf16 to True even where it is emulated, so it is always set explicitly.
    return bf16_is_native() if bf16 is None else bf16


def compact_fused_head() -> None:
    """Make TRL's fused LM head score only the positions that have a label, on CPU too.

    TRL 1.16's `add_fused_lm_head` (trainer/utils.py), which its SFT, DPO and KTO trainers install,
    projects only the labelled positions through the LM head where its Triton kernel runs (CUDA,
    XPU); elsewhere it projects every position, for static shapes on compiled backends (Neuron), and
    on CPU in float32 (kernels/chunked_logprob.py `_addmm_fp32`). Here prompts are ~90% of a row and
    nothing is compiled, so that was most of an SFT or DPO step's LM-head work for log-probs that are
    then zeroed. Scoring the labelled positions gives the same per-token outputs; default-suite steps
    (5 batches, alone): SFT 25.3 -> 18.5 s, DPO 15.2 -> 9.6 s. `trainer/utils.py` uses its imported
    `_use_triton` for that choice only (its kernels import their own), so this changes nothing else.
    """
    import trl.trainer.utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)
    if use_triton is None or getattr(use_triton, "compacts_cpu", False):
        return  # another TRL (test_training checks this one compacts), or done already

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or use_triton(device)

    compact.compacts_cpu = True
    trl_utils._use_triton = compact


def _load_base(base_model: str, params: SFTParams | DPOParams):
    compact_fused_head()  # every trainer loads its model here
    dtype = "bfloat16" if _use_bf16(params.bf16) else "float32"
    model, tokenizer = load_model_and_tokenizer(base_model, dtype=dtype, load_in_4bit=params.load_in_4bit)
    if params.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=params.gradient_checkpointing
        )
    return model, tokenizer


def train_steps(params: SFTParams | DPOParams, num_records: int) -> int:
    """The optimizer steps a run takes: `max_steps` when it is set, whatever the data's size;
    otherwise `num_train_epochs` passes over the records, never fewer than `min_steps`.

    Epochs tie the budget to the suite's size: two tasks of five demos got half the SFT updates
    of four tasks, and their policy never emitted a working action (SFT 0%, where the same two
    tasks reached 62-70% inside the four-task suite), while 39 tasks got ten times the updates
    (and the time). A step budget is the same for every suite. The defaults (SFT 20, DPO 46) are
    the steps the four-task default suite took under the old epoch budgets (5 epochs over 25 demo
    steps at batch 8 hit the floor of 20; 2 epochs over 91 pairs at batch 4), so its result is
    unchanged; other suites now get those same budgets.
    """
    if params.max_steps > 0:
        return int(params.max_steps)
    per_epoch = max(1, math.ceil(math.ceil(num_records / params.per_device_train_batch_size) / params.gradient_accumulation_steps))
    return max(int(params.min_steps), math.ceil(params.num_train_epochs * per_epoch))


def micro_batches(params: SFTParams | DPOParams) -> tuple[int, int]:
    """(per-device batch, accumulation steps) the Trainer runs for `params`' optimizer batch.

    With SFTParams.micro_batch_size m, a batch of b examples runs as b/m micro-batches of m: the
    Trainer draws the same shuffled order either way, so every optimizer step sees the same b
    examples, and Transformers divides the summed token losses by the whole batch's token count
    (num_items_in_batch), so the loss is the batch's. What goes is the padding: a batch pads every
    example to its longest, and one ~700-token page among ~100-token ones made SFT steps 2.6x
    slower (random29-1's demos, 54.5 vs 20.7 s per step with micro-batches of 1).
    """
    batch, accumulation, micro = params.per_device_train_batch_size, params.gradient_accumulation_steps, getattr(params, "micro_batch_size", 0)
    if not micro:
        return batch, accumulation
    if micro < 0 or batch % micro:
        raise ValueError(f"micro_batch_size {micro} must divide per_device_train_batch_size {batch}")
    return micro, accumulation * (batch // micro)


def _trainer_args(params: SFTParams | DPOParams, scratch: Path, num_records: int) -> dict:
    bf16 = _use_bf16(params.bf16)
    per_device, accumulation = micro_batches(params)
    return dict(
        output_dir=str(scratch),
        learning_rate=params.learning_rate,
        max_steps=train_steps(params, num_records),  # overrides num_train_epochs in the HF Trainer
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_length=params.max_length,
        seed=params.seed,
        logging_steps=params.logging_steps,
        bf16=bf16,
        # Transformers refuses bf16 without a GPU unless told the CPU is meant (then it autocasts there).
        use_cpu=bf16 and not torch.cuda.is_available(),
        # Transformers 5 renamed gradient_checkpointing; TRL still defaults the old name to True.
        activation_checkpointing=params.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if params.gradient_checkpointing else None,
        report_to="none",  # the caller logs to MLflow itself
        # Checkpoints (adapter, optimizer, scheduler, RNG, trainer_state.json last) let a retry resume;
        # two are kept so one complete checkpoint survives a kill while the next is being written.
        save_strategy="steps" if params.checkpoint_steps > 0 else "no",
        **({"save_steps": params.checkpoint_steps, "save_total_limit": 2} if params.checkpoint_steps > 0 else {}),
        push_to_hub=False,
    )


def _run(trainer, records: list[dict], output_dir: Path, resume_from: Path | None = None) -> TrainResult:
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.partial-"))
    try:
        # Only the trained adapter: DPO also holds a frozen "ref" copy, which is not the result.
        trainer.model.save_pretrained(str(tmp), selected_adapters=["default"])
        trainer.processing_class.save_pretrained(str(tmp))
        replace_dir(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    history = list(trainer.state.log_history)
    metrics = {k: float(v) for log in history for k, v in log.items() if isinstance(v, (int, float))}
    metrics.update({k: float(v) for k, v in out.metrics.items()})
    metrics["global_step"] = float(out.global_step)
    return TrainResult(Path(output_dir), metrics, len(records), history)


def build_sft_trainer(
    base_model: str,
    records: list[dict],
    scratch_dir: Path,
    params: SFTParams,
    on_log: Callable[[dict], None] | None = None,
    init_adapter_dir: Path | None = None,
):
    """An SFTTrainer with a fresh LoRA adapter on `base_model`, or continuing `init_adapter_dir`.

    Continuing an adapter is how rejection-sampling fine-tuning (the RFT control) extends the
    SFT policy with the same LoRA shape DPO trains; the LoRA fields of `params` are then unused.
    """
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import SFTConfig, SFTTrainer

    _check_records(records, "train_sft", ("prompt", "completion"))
    model, tokenizer = _load_base(base_model, params)
    check_lengths(tokenizer, records, params.max_length, "train_sft")
    lora = None
    if init_adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter_dir), is_trainable=True)
    else:
        lora = LoraConfig(
            r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
            target_modules=params.target_modules, task_type="CAUSAL_LM",
        )
    return SFTTrainer(
        model=model,
        args=SFTConfig(**_trainer_args(params, Path(scratch_dir), len(records))),
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[_ForwardLogs(on_log)] if on_log else None,
    )


def train_sft(
    base_model: str,
    records: list[dict],
    output_dir: Path,
    params: SFTParams,
    on_log: Callable[[dict], None] | None = None,
    init_adapter_dir: Path | None = None,
    scratch_dir: Path | None = None,
) -> TrainResult:
    """LoRA SFT on prompt-completion demos; writes the adapter to `output_dir`."""
    _check_records(records, "train_sft", ("prompt", "completion"))
    return _train_in_scratch(lambda scratch: build_sft_trainer(base_model, records, scratch, params, on_log, init_adapter_dir),
                             records, output_dir, _job_fingerprint("sft", base_model, records, params, init_adapter_dir),
                             scratch_dir)


def scratch_dir_for(output_dir: Path) -> Path:
    """The trainer's working dir for `output_dir`: the same on every retry, so checkpoints are found."""
    output_dir = Path(output_dir)
    return output_dir.with_name(f".{output_dir.name}.scratch")


def last_checkpoint(scratch: Path) -> Path | None:
    """The newest complete `checkpoint-N` in `scratch`: the Trainer writes trainer_state.json last,
    so a checkpoint whose trainer_state.json is there and parses was written whole."""
    done = []
    for path in Path(scratch).glob("checkpoint-*"):
        state = path / "trainer_state.json"
        if path.name.removeprefix("checkpoint-").isdigit() and state.is_file():
            try:
                json.loads(state.read_text())
            except json.JSONDecodeError:  # killed while writing it: this checkpoint is incomplete
                continue
            done.append(path)
    return max(done, key=lambda p: int(p.name.removeprefix("checkpoint-")), default=None)


def _job_fingerprint(kind: str, base_model: str, records: list[dict], params, start_adapter: Path | None) -> str:
    """What a checkpoint was trained on: resuming a different job from it would silently mix runs."""
    job = {"kind": kind, "base_model": str(base_model), "records": records, "params": asdict(params),
           "start_adapter": None if start_adapter is None else str(start_adapter)}
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()


def _train_in_scratch(build: Callable[[Path], object], records: list[dict], output_dir: Path, fingerprint: str,
                      scratch_dir: Path | None = None) -> TrainResult:
    """Build a trainer on the job's scratch dir, resume from its last complete checkpoint (when the
    same job left one), train, move the adapter in, and drop the scratch dir."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(scratch_dir) if scratch_dir else scratch_dir_for(output_dir)
    stamp = scratch / "job.sha256"
    if scratch.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        shutil.rmtree(scratch)  # another job's (or an unstamped) leftovers: never resume from those
    scratch.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        atomic_write_text(stamp, fingerprint + "\n")
    try:
        trainer = build(scratch)
    except Exception:
        if {p.name for p in scratch.iterdir()} <= {stamp.name}:
            shutil.rmtree(scratch)  # refused before anything trained (bad records): nothing left behind
        raise
    result = _run(trainer, records, output_dir, last_checkpoint(scratch))
    shutil.rmtree(scratch)  # only on success: a failed or killed run leaves its checkpoints for the retry
    return result


def init_adapter(base_model: str, output_dir: Path, params: SFTParams) -> Path:
    """A fresh, untrained LoRA adapter on `base_model` (LoRA B starts at zero, so the policy *is* the
    base model): the start, and the frozen reference, of preference training with zero demos."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _load_base(base_model, params)
    lora = LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                      target_modules=params.target_modules, task_type="CAUSAL_LM")
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.partial-"))
    try:
        get_peft_model(model, lora).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _trainable_start(base_model: str, adapter_dir: Path, params: DPOParams):
    """base + the start adapter, trainable: the policy a preference trainer updates."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ValueError(f"SFT adapter dir {adapter_dir} has no adapter_config.json; run SFT first.")
    model, tokenizer = _load_base(base_model, params)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True), tokenizer


def _preference_trainer(trainer_cls, model, tokenizer, config, records: list[dict], on_log: Callable[[dict], None] | None):
    """A TRL preference trainer (DPO, KTO) on `model`, a PeftModel of the start adapter: given no
    `ref_model` and no `peft_config`, TRL freezes a copy of that adapter as the reference."""
    from datasets import Dataset

    return trainer_cls(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[_ForwardLogs(on_log)] if on_log else None,
    )


def anchor_batches(tokenizer, records: list[dict], batch_size: int, max_length: int, seed: int):
    """Endless shuffled batches of SFT records ({prompt, completion}, conversational), tokenized with
    the chat template and labelled on the completion only, as SFT trained on them."""
    _check_records(records, "anchor_batches", ("prompt", "completion"))
    encoded = []
    for r in records:
        prompt = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(f"anchor record's chat template does not extend its prompt: {full[:200]!r}")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids = (p_ids + c_ids)[:max_length]
        encoded.append((ids, ([-100] * len(p_ids) + c_ids)[:max_length]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = [encoded[j] for j in order[i:i + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            yield {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
                   "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
                   "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])}


def completion_nll(model, batch: dict) -> torch.Tensor:
    """Mean NLL of `batch`'s labelled tokens (an anchor batch) through TRL's fused LM head, which the
    preference trainers install on their model.

    A plain forward computes every position's logits over the vocabulary and then scores the few
    answer tokens; the fused head projects only the labelled positions (on the default suite the
    anchor's batch of 4 demos went from ~1.75 to ~1.3-1.4 s per DPO step, beside the DPO loss's ~2 s). The
    labels go in pre-shifted (`shift_labels`: each position's next token), as under sequence
    parallelism, which also keeps share_prompts from reading the batch as chosen/rejected rows.
    """
    labels = batch["labels"]
    shift = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), -100)], dim=1)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], shift_labels=shift,
                 fused_lm_head=True).loss


def _anchored(trainer_cls, anchor: list[dict], params: DPOParams):
    """`trainer_cls` with `anchor_weight` x the SFT loss on a batch of `anchor` records added to every
    training step's loss: the expert demos stay likely on the states no pair covers.

    Why: DPO moves probability only where pairs are. On tool use a preference learned on lookup
    questions ("lookup over date") spread to the date and arithmetic questions, which no pair
    contrasted, and SFT's 44% fell to 6-26% (benchmarks/results/dpo_checkpoints_tooluse_*.json).
    TRL's "sft" loss type anchors only the chosen side of the pairs; this anchors the demos, as
    InstructGPT's PPO-ptx mixes pretraining gradients into RL.
    """
    class Anchored(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:
                return out
            if not hasattr(self, "_anchor"):
                self._anchor = anchor_batches(self.processing_class, anchor, params.per_device_train_batch_size,
                                              params.max_length, params.seed)
                # A run resumed from a checkpoint continues the demos' order there, as the pairs' order does.
                for _ in range(self.state.global_step * self.args.gradient_accumulation_steps):
                    next(self._anchor)
            batch = {k: v.to(self.accelerator.device) for k, v in next(self._anchor).items()}
            nll = completion_nll(model, batch)
            self._metrics["train"]["anchor_nll"].append(nll.item())
            if return_outputs:
                return out[0] + params.anchor_weight * nll, out[1]
            return out + params.anchor_weight * nll

    Anchored.__name__ = f"Anchored{trainer_cls.__name__}"
    return Anchored


def _chosen_sft(base_model: str, start: Path, records: list[dict], anchor: list[dict] | None, scratch: Path,
                params: DPOParams) -> Path:
    """`params.chosen_sft_steps` of SFT on the pairs' chosen side (plus the demos, when anchored) from
    `start`, at DPO's rate and batch: the adapter DPO then starts from and holds as its reference.

    Why: SFT on successes, then DPO, as Zephyr's dSFT -> dDPO and ETO's behaviour cloning -> DPO
    order it. The pairs' successes first become the policy's own; DPO then adds only what the
    failures say (benchmarks/results/dpo_checkpoints_random2-0_*from_rft*.json).
    Lives in DPO's scratch dir: a retry of the same job (the scratch is fingerprinted) reuses it.
    """
    out = scratch / "chosen_sft"
    if (out / "adapter_config.json").is_file():
        return out
    sft = sft_params_like(params, max_steps=params.chosen_sft_steps)
    return train_sft(base_model, chosen_records(records) + list(anchor or []), out, sft, init_adapter_dir=start,
                     scratch_dir=scratch / "chosen_sft.scratch").adapter_dir


def chosen_records(records: list[dict]) -> list[dict]:
    """Preference records' chosen side as SFT (prompt, completion) records: what RFT trains on."""
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in records]


def sft_params_like(params: DPOParams, **budget) -> SFTParams:
    """SFT at a DPO run's learning rate, batch, length, seed and precision; `budget` sets the steps
    (max_steps, or num_train_epochs/min_steps). The chosen-side stage and the RFT control use it."""
    return SFTParams(learning_rate=params.learning_rate, until_expert_match=0.0,
                     per_device_train_batch_size=params.per_device_train_batch_size, micro_batch_size=params.sft_micro_batch_size,
                     gradient_accumulation_steps=params.gradient_accumulation_steps, max_length=params.max_length,
                     seed=params.seed, logging_steps=params.logging_steps, bf16=params.bf16, load_in_4bit=params.load_in_4bit,
                     gradient_checkpointing=params.gradient_checkpointing, checkpoint_steps=params.checkpoint_steps, **budget)


def build_dpo_trainer(
    base_model: str,
    sft_adapter_dir: Path,
    records: list[dict],
    scratch_dir: Path,
    params: DPOParams,
    on_log: Callable[[dict], None] | None = None,
    anchor: list[dict] | None = None,
):
    """A DPOTrainer whose policy is the SFT adapter (trainable) and whose reference is its frozen copy
    (with `params.chosen_sft_steps`, the adapter after that SFT on the chosen side: see _chosen_sft).

    How TRL 1.16 computes the reference here (dpo_trainer.py): given a PeftModel and neither
    `ref_model` nor `peft_config`, __init__ calls `model.add_adapter("ref", ...)` and copies every
    `.default.` LoRA tensor into `.ref.`; `ref_model` stays None. Each step `_compute_loss` runs the
    same model under `torch.no_grad()` inside `use_adapter(model, "ref")`, i.e. base + the SFT LoRA
    as it was before training. The optimizer never updates "ref". (With `peft_config` instead, the
    reference would be the bare base model: adapters disabled.)
    """
    from trl import DPOConfig, DPOTrainer

    _check_records(records, "train_dpo", ("prompt", "chosen", "rejected"))
    if params.anchor_weight > 0 and not anchor:
        raise ValueError(f"DPO anchor_weight is {params.anchor_weight} but no anchor records (the SFT demos) were given; "
                         "pass them, or set anchor_weight 0.")
    from transformers import AutoTokenizer  # the lengths are checked before the chosen-side stage trains

    check_lengths(AutoTokenizer.from_pretrained(resolve_model(base_model)), records + list(anchor or []), params.max_length, "train_dpo")
    if params.chosen_sft_steps > 0:
        sft_adapter_dir = _chosen_sft(base_model, sft_adapter_dir, records, anchor, Path(scratch_dir), params)
    model, tokenizer = _trainable_start(base_model, sft_adapter_dir, params)
    config = DPOConfig(
        **_trainer_args(params, Path(scratch_dir), len(records)),
        warmup_steps=params.warmup_steps,
        beta=params.beta,
        loss_type=list(params.loss_type),
        loss_weights=params.loss_weights,
    )
    trainer_cls = _anchored(DPOTrainer, anchor, params) if params.anchor_weight > 0 else DPOTrainer
    trainer = _preference_trainer(trainer_cls, model, tokenizer, config, records, on_log)
    if params.shared_prompt:
        share_prompts(trainer.model.get_base_model())
    return trainer


def train_dpo(
    base_model: str,
    sft_adapter_dir: Path,
    records: list[dict],
    output_dir: Path,
    params: DPOParams,
    on_log: Callable[[dict], None] | None = None,
    scratch_dir: Path | None = None,
    anchor: list[dict] | None = None,
) -> TrainResult:
    """DPO from the SFT adapter against the frozen SFT policy; writes the adapter to `output_dir`.
    `anchor`: the SFT demos, for `params.anchor_weight` > 0 (see _anchored)."""
    _check_records(records, "train_dpo", ("prompt", "chosen", "rejected"))
    anchor = anchor if params.anchor_weight > 0 else None  # unused records must not change the fingerprint
    return _train_in_scratch(lambda scratch: build_dpo_trainer(base_model, sft_adapter_dir, records, scratch, params, on_log, anchor),
                             records, output_dir, _job_fingerprint("dpo", base_model, records + (anchor or []), params, sft_adapter_dir),
                             scratch_dir)


def build_kto_trainer(
    base_model: str,
    start_adapter_dir: Path,
    records: list[dict],
    scratch_dir: Path,
    params: DPOParams,
    on_log: Callable[[dict], None] | None = None,
):
    """A KTOTrainer on unpaired (prompt, completion, label) records, same wiring as DPO: the start
    adapter trains and TRL 1.16 freezes a copy of it as the "ref" adapter (kto_trainer.py, PEFT model
    without ref_model or peft_config), so the reference is the start policy, not the bare base.
    `params.loss_type`/`loss_weights` are DPO's and unused; the two classes are weighted so that
    desirable x weight = undesirable x weight, the balance TRL's KTO check asks for.
    """
    from trl import KTOConfig, KTOTrainer

    _check_records(records, "train_kto", ("prompt", "completion", "label"))
    desirable = sum(bool(r["label"]) for r in records)
    if desirable == 0 or desirable == len(records):
        raise ValueError(f"train_kto needs desirable and undesirable records; got {desirable} of {len(records)} desirable.")
    model, tokenizer = _trainable_start(base_model, start_adapter_dir, params)
    check_lengths(tokenizer, records, params.max_length, "train_kto")
    config = KTOConfig(
        **_trainer_args(params, Path(scratch_dir), len(records)),
        beta=params.beta,
        desirable_weight=1.0,
        undesirable_weight=desirable / (len(records) - desirable),
    )
    return _preference_trainer(KTOTrainer, model, tokenizer, config, records, on_log)


def train_kto(
    base_model: str,
    start_adapter_dir: Path,
    records: list[dict],
    output_dir: Path,
    params: DPOParams,
    on_log: Callable[[dict], None] | None = None,
) -> TrainResult:
    """KTO from the start adapter against its frozen copy; writes the adapter to `output_dir`."""
    _check_records(records, "train_kto", ("prompt", "completion", "label"))
    return _train_in_scratch(lambda scratch: build_kto_trainer(base_model, start_adapter_dir, records, scratch, params, on_log),
                             records, output_dir, _job_fingerprint("kto", base_model, records, params, start_adapter_dir))


def _contiguous_input(module, args):
    """The LM head's input made contiguous. Generation's prefill (and the gates' scoring) keeps only
    the last positions' logits (`logits_to_keep`), so the head gets a strided slice of the hidden
    states. With the weights frozen (an inference PeftModel), torch's matmul then does not fold that
    slice into one mm: it runs a bmm against the head's weight expanded per row, a copy of rows x
    vocabulary x hidden (906 MB for 16 prompts), which was ~35% of a 16 x 200-token prefill here
    (3.5-4.5 -> 2.7 s; the logits identical bit for bit). A contiguous input folds (test_training).
    `is_contiguous()` ignores size-1 dims, so one prompt's last position ([1, 1, hidden] out of [1, T, hidden])
    passes as contiguous with its first stride still T x hidden, and matmul does not fold that either
    (~60 ms per single-prompt prefill, every later step of an episode): only canonical strides are kept."""
    x = args[0]
    if x.stride() != _canonical_strides(x.shape):
        x = x.clone(memory_format=torch.contiguous_format)
    return (x, *args[1:])


def _canonical_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def load_policy(base_model: str, adapter_dir: Path | None = None, dtype: str = "auto"):
    """(model, tokenizer) in eval mode for generation: the base, plus the adapter when given.

    The LoRA weights take the base's dtype. Training ran under bf16 autocast, which computes the
    LoRA matmuls in bf16 too, so a bf16 adapter repeats training's arithmetic; PEFT's default
    upcast to fp32 cost ~25% of every prefill (activations cast per layer) and changed 1 of 400
    greedy answers of the README run's SFT and DPO adapters (a near-tie; bf16 matched autocast on all 400).
    """
    from peft import PeftModel

    model, tokenizer = load_model_and_tokenizer(base_model, dtype=dtype)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir), autocast_adapter_dtype=False)
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    if torch.cuda.is_available() and not getattr(model, "hf_device_map", None):
        model = model.to("cuda")
    return model.eval(), tokenizer
