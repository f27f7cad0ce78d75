"""Resumable training: a run killed after a checkpoint resumes from it on retry, and never leaves a half adapter."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dpo_driver.training import DPOParams, SFTParams, last_checkpoint, scratch_dir_for, train_dpo, train_sft

RECORDS = [{"prompt": [{"role": "user", "content": f'Task: Click on the "{n}" button.\n1. button "{n}"'}],
            "completion": [{"role": "assistant", "content": f'click button "{n}"'}]} for n in ("okay", "Cancel", "Submit", "Next")]
# 6 optimizer steps (min_steps), a checkpoint every 2.
PARAMS = SFTParams(learning_rate=1e-2, num_train_epochs=1, max_steps=0, min_steps=6, per_device_train_batch_size=2, logging_steps=1,
                   checkpoint_steps=2, max_length=64)
# The first run: the same call, slowed to ~0.4 s a step so the test can kill it between checkpoints.
FIRST_RUN = """
import sys, time
from pathlib import Path
from dpo_driver.training import SFTParams, train_sft
from tests.test_resume import PARAMS, RECORDS
train_sft("tiny-random", RECORDS, Path(sys.argv[1]), PARAMS, on_log=lambda logs: time.sleep(0.4))
"""


PAIRS = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": 'type textbox "x"'}]}
         for r in RECORDS]
DPO_PARAMS = DPOParams(learning_rate=1e-3, num_train_epochs=1, max_steps=0, min_steps=6, per_device_train_batch_size=2, logging_steps=1,
                       checkpoint_steps=2, max_length=64)
FIRST_DPO_RUN = """
import sys, time
from pathlib import Path
from dpo_driver.training import train_dpo
from tests.test_resume import DPO_PARAMS, PAIRS
train_dpo("tiny-random", Path(sys.argv[2]), PAIRS, Path(sys.argv[1]), DPO_PARAMS, on_log=lambda logs: time.sleep(0.4))
"""


# Anchored: eight demos in batches of 2, so a restarted anchor order shows in the weights.
ANCHOR = [{"prompt": [{"role": "user", "content": f'Task: Type "{w}" into the box.\n1. textbox ""'}],
           "completion": [{"role": "assistant", "content": f'type textbox "{w}"'}]} for w in "alpha bravo delta echo golf hotel kilo lima".split()]
ANCHORED_DPO_PARAMS = replace(DPO_PARAMS, anchor_weight=1.0)
FIRST_ANCHORED_DPO_RUN = """
import sys, time
from pathlib import Path
from dpo_driver.training import train_dpo
from tests.test_resume import ANCHOR, ANCHORED_DPO_PARAMS, PAIRS
train_dpo("tiny-random", Path(sys.argv[2]), PAIRS, Path(sys.argv[1]), ANCHORED_DPO_PARAMS, on_log=lambda logs: time.sleep(0.4), anchor=ANCHOR)
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DRIVER_CACHE", str(tmp_path / "cache"))


def _kill_after_a_checkpoint(code: str, out: Path, *args: str) -> int:
    """Start training in a subprocess, SIGKILL it once a checkpoint is complete; the checkpoint's step."""
    scratch = scratch_dir_for(out)
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), *args], cwd=Path(__file__).parents[1], env=os.environ.copy(),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while last_checkpoint(scratch) is None:
        assert proc.poll() is None, f"training exited before its first checkpoint: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = int(last_checkpoint(scratch).name.removeprefix("checkpoint-"))
    assert 2 <= killed_at < 6
    assert not out.exists() and not list(out.parent.glob(".adapter.partial-*"))  # no adapter, whole or half
    return killed_at


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path, cache):
    out = tmp_path / "run" / "adapter"
    scratch = scratch_dir_for(out)
    killed_at = _kill_after_a_checkpoint(FIRST_RUN, out)
    steps = []
    result = train_sft("tiny-random", RECORDS, out, PARAMS, on_log=lambda logs: steps.append(logs["step"]))
    assert steps[0] == killed_at + 1 and steps[-1] == 6, steps  # continued, not restarted from step 0
    assert result.metrics["global_step"] == 6
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not scratch.exists()  # removed once the adapter is in place
    print(f"killed after checkpoint-{killed_at}; resumed run logged steps {steps}")


def test_a_killed_dpo_run_resumes_from_its_last_complete_checkpoint(tmp_path, cache):
    sft = train_sft("tiny-random", RECORDS, tmp_path / "sft", SFTParams(max_steps=0, min_steps=0, num_train_epochs=1, max_length=64)).adapter_dir
    out = tmp_path / "dpo" / "adapter"
    killed_at = _kill_after_a_checkpoint(FIRST_DPO_RUN, out, str(sft))
    steps = []
    result = train_dpo("tiny-random", sft, PAIRS, out, DPO_PARAMS, on_log=lambda logs: steps.append(logs["step"]))
    assert steps[0] == killed_at + 1 and steps[-1] == 6, steps  # the global step continued past the checkpoint
    assert result.metrics["global_step"] == 6 and (out / "adapter_config.json").is_file()
    assert not scratch_dir_for(out).exists()
    print(f"DPO killed after checkpoint-{killed_at}; resumed run logged steps {steps}")


def test_a_resumed_anchored_dpo_run_ends_where_an_uninterrupted_one_does(tmp_path, cache):
    # The anchor's demo batches continue from the checkpoint's step, as the pairs do: a resumed run
    # that replayed the demos from the first batch would end on other weights.
    sft = train_sft("tiny-random", RECORDS, tmp_path / "sft", SFTParams(max_steps=0, min_steps=0, num_train_epochs=1, max_length=64)).adapter_dir
    whole = train_dpo("tiny-random", sft, PAIRS, tmp_path / "whole" / "adapter", ANCHORED_DPO_PARAMS, anchor=ANCHOR).adapter_dir
    out = tmp_path / "dpo" / "adapter"
    killed_at = _kill_after_a_checkpoint(FIRST_ANCHORED_DPO_RUN, out, str(sft))
    resumed = train_dpo("tiny-random", sft, PAIRS, out, ANCHORED_DPO_PARAMS, anchor=ANCHOR).adapter_dir
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-6, f"resumed after checkpoint-{killed_at}, the adapter differs from an uninterrupted run's by {diff}"


def test_leftover_checkpoints_of_another_job_are_not_resumed(tmp_path, cache):
    out = tmp_path / "adapter"
    stale = scratch_dir_for(out) / "checkpoint-4"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (scratch_dir_for(out) / "job.sha256").write_text("another job\n")
    steps = []
    params = SFTParams(max_steps=0, min_steps=0, num_train_epochs=1, per_device_train_batch_size=4, logging_steps=1, max_length=64)
    train_sft("tiny-random", RECORDS, out, params, on_log=lambda logs: steps.append(logs["step"]))
    assert steps[0] == 1 and not scratch_dir_for(out).exists()  # trained from step 0, not from the stale checkpoint-4


def test_last_checkpoint_skips_incomplete_ones(tmp_path):
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert last_checkpoint(tmp_path / "none") is None
