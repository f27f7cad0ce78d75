import json
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from dpo_driver import model as M
from dpo_driver.model import PRESETS, default_cache_dir, load_model_and_tokenizer, resolve_model

PROMPT = [{"role": "user", "content": 'Task: Click on the "okay" button.\n1. button "okay"'}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return Path(resolve_model("tiny-random", tmp_path_factory.mktemp("cache")))


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_DRIVER_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DPO_DRIVER_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "dpo-driver"


def test_tiny_random_is_deterministic_and_about_1m_params(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = Path(resolve_model("tiny-random", tmp_path))
    assert again != tiny
    assert AutoTokenizer.from_pretrained(tiny).get_vocab() == AutoTokenizer.from_pretrained(again).get_vocab()
    a = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny).parameters())
    assert 500_000 < n_params < 2_000_000
    assert 1000 <= len(AutoTokenizer.from_pretrained(tiny)) <= 2000


def test_tiny_random_chat_template_and_generation(tiny):
    model, tok = load_model_and_tokenizer(str(tiny))
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.pad_token != tok.eos_token
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{PROMPT[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    # The prompt is a token prefix of prompt+completion: TRL's completion mask relies on it.
    full = PROMPT + [{"role": "assistant", "content": 'click button "okay"'}]
    prompt_ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True)["input_ids"]
    full_ids = tok.apply_chat_template(full)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert tok.decode(full_ids) == tok.apply_chat_template(full, tokenize=False)
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, enc["input_ids"].shape[1] + 5)
    assert isinstance(tok.decode(out[0, enc["input_ids"].shape[1]:]), str)


def test_preset_cache_is_reused(tiny, monkeypatch):
    mtime = (tiny / "config.json").stat().st_mtime_ns

    def must_not_build(out):
        raise AssertionError("preset rebuilt although it is cached")

    monkeypatch.setattr(M, "_build_tiny_random", must_not_build)
    assert resolve_model("tiny-random", tiny.parent) == str(tiny)
    assert (tiny / "config.json").stat().st_mtime_ns == mtime


def test_killed_build_leaves_no_finished_looking_cache(tmp_path):
    def dies_halfway(out: Path):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        M._cached_build(tmp_path / "tiny-random", dies_halfway)
    assert list(tmp_path.iterdir()) == []
    # A leftover partial dir from a SIGKILLed run is ignored: the real build still happens.
    (tmp_path / ".tiny-random.partial-x").mkdir()
    (tmp_path / ".tiny-random.partial-x" / "config.json").write_text("{}")
    built = M._cached_build(tmp_path / "tiny-random", lambda out: (out / "config.json").write_text('{"ok": 1}'))
    assert json.loads((built / "config.json").read_text()) == {"ok": 1}


def test_cache_dir_without_config_is_rejected(tmp_path):
    (tmp_path / "tiny-random").mkdir()
    with pytest.raises(ValueError, match="delete it"):
        resolve_model("tiny-random", tmp_path)


def test_resolve_local_path(tiny, tmp_path):
    assert resolve_model(str(tiny)) == str(tiny)
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_resolve_unknown_model_explains_options(monkeypatch):
    # Offline: fail at once instead of retrying an unreachable Hub for ~30 s.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as err:
        resolve_model("no-such-org/no-such-model")
    msg = str(err.value)
    assert "no-such-org/no-such-model" in msg and "local path" in msg
    assert all(p in msg for p in PRESETS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_4bit_on_cpu_is_refused(tiny):
    with pytest.raises(ValueError, match="CUDA"):
        load_model_and_tokenizer(str(tiny), load_in_4bit=True)


def test_auto_dtype_is_bf16_exactly_where_bf16_is_native(tiny, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(M, "_cpu_has_bf16_units", lambda: native)
        assert load_model_and_tokenizer(str(tiny))[0].dtype == want
        assert load_model_and_tokenizer(str(tiny), dtype="float32")[0].dtype == torch.float32  # an explicit dtype wins


def test_policy_model_dtype_drives_training_precision():
    from resources import PolicyModel

    assert [PolicyModel(dtype=d).train_bf16() for d in ("auto", "bfloat16", "float32")] == [None, True, False]
    with pytest.raises(ValueError, match="cannot train"):
        PolicyModel(dtype="float16").train_bf16()


def test_bad_dtype_is_refused(tiny):
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer(str(tiny), dtype="float8")


@pytest.mark.slow
def test_smollm2_preset_loads_offline_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = Path(resolve_model("smollm2-135m", tmp_path))
    assert (path / "model.safetensors").is_file() and "quantization_config" not in json.loads(
        (path / "config.json").read_text()
    )
    model, tok = load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)
    assert model.dtype == (torch.bfloat16 if M.bf16_is_native() else torch.float32) and 130e6 < model.num_parameters() < 140e6
    assert "<|im_start|>assistant\n" in tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])

    monkeypatch.setattr(M, "_build_smollm2", lambda out: pytest.fail("GGUF converted twice"))
    mtime = os.stat(path / "model.safetensors").st_mtime_ns
    assert resolve_model("smollm2-135m", tmp_path) == str(path)
    assert os.stat(path / "model.safetensors").st_mtime_ns == mtime
