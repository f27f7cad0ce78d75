"""A re-execution (or run retry) of a failed training stage finds the checkpoints the failed run
left: `checkpoint_dir` keys them by the root run, which every re-execution shares. That training
resumes from such a folder, and only for the same job, is `tests/test_resume.py`'s part."""

import os
from pathlib import Path

import dagster as dg

from dpo_assets._common import checkpoint_dir
from resources import ArtifactStore


@dg.op
def train_step(context: dg.OpExecutionContext) -> None:
    scratch = Path(checkpoint_dir(context, ArtifactStore(root=os.environ["RESUME_TEST_ROOT"]), "dpo_adapter"))
    checkpoint = scratch / "checkpoint-2"
    if not checkpoint.exists():  # no earlier attempt of this root run: write a checkpoint, then die
        checkpoint.mkdir(parents=True)
        (checkpoint / "written_by").write_text(context.run_id)
        raise RuntimeError("killed after checkpoint-2")
    Path(os.environ["RESUME_TEST_ROOT"], "resumed_from").write_text((checkpoint / "written_by").read_text())


@dg.job(executor_def=dg.in_process_executor)
def training_job():
    train_step()


def test_a_reexecution_resumes_from_the_failed_runs_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUME_TEST_ROOT", str(tmp_path / "artifacts"))
    job = dg.reconstructable(training_job)
    with dg.instance_for_test() as instance:
        first = dg.execute_job(job, instance=instance, raise_on_error=False)
        assert not first.success
        again = dg.execute_job(job, instance=instance, raise_on_error=False,
                               reexecution_options=dg.ReexecutionOptions.from_failure(first.run_id, instance))
        assert again.success and again.run_id != first.run_id
        assert (tmp_path / "artifacts" / "resumed_from").read_text() == first.run_id  # it found the first run's checkpoint
        # An unrelated run (its own root) never picks up another run's checkpoints.
        fresh = dg.execute_job(job, instance=instance, raise_on_error=False)
        assert not fresh.success
    assert sorted(p.name for p in (tmp_path / "artifacts" / "dpo_adapter").iterdir() if p.is_dir()) == sorted(
        [f".{first.run_id}.scratch", f".{fresh.run_id}.scratch"])
