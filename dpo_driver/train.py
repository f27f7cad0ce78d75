"""The one training entry point: `python -m dpo_driver.train sft|dpo --config JOB.json [--log-file F]`.

The job spec is JSON (`JobSpec` below); relative paths in it are relative to the spec's folder, so
a spec written beside its records stays valid when that folder is moved. Under Dagster Pipes
(launched by `resources.trainer.TrainingLauncher`, as a subprocess or in a GPU container) progress
goes to the run log and the result comes back as a Pipes custom message; run by hand it prints
the result as JSON. Either way the last line of a failure is the exception, also in `--log-file`.

Imports only the standard library, `dagster_pipes` and the training stack: the training image
carries no Dagster orchestration packages.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dpo_driver.procs import restore_stop_signals

KINDS = ("sft", "dpo")


@dataclass
class JobSpec:
    kind: str  # "sft" or "dpo"
    base_model: str  # base model folder (resolved by the caller), preset name or HF id
    records: str  # JSONL: SFT {prompt, completion}, DPO {prompt, chosen, rejected}
    output_dir: str  # the adapter folder; replaced whole on success, untouched on failure
    params: dict = field(default_factory=dict)  # SFTParams / DPOParams fields; missing = defaults
    sft_adapter_dir: str = ""  # DPO only: the SFT adapter to continue, also the frozen reference
    init_adapter_dir: str = ""  # SFT only: continue this adapter instead of a fresh LoRA (the RFT control)
    anchor_records: str = ""  # DPO only: JSONL of the SFT demos, for params.anchor_weight > 0
    scratch_dir: str = ""  # trainer checkpoints; stable across retries so they resume; "" = .<output>.scratch beside output_dir

    @classmethod
    def load(cls, path: Path) -> JobSpec:
        """Read a spec, check it, and make its paths absolute against the spec's folder."""
        path = Path(path)
        raw = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"job spec {path}: unknown keys {unknown}; expected some of {sorted(known)}")
        spec = cls(**raw)
        if spec.kind not in KINDS:
            raise ValueError(f"job spec {path}: kind {spec.kind!r} is not one of {KINDS}")
        if spec.kind == "dpo" and not spec.sft_adapter_dir:
            raise ValueError(f"job spec {path}: a dpo job needs sft_adapter_dir (the SFT adapter to continue)")
        base = path.parent.resolve()
        for name in ("records", "output_dir", "sft_adapter_dir", "init_adapter_dir", "anchor_records", "scratch_dir"):
            value = getattr(spec, name)
            if value:
                setattr(spec, name, str(base / value))
        local = base / spec.base_model
        if not Path(spec.base_model).is_absolute() and local.exists():
            spec.base_model = str(local)
        spec.training_params()  # unknown or mistyped params fail here, before any model loads
        return spec

    def write(self, path: Path) -> Path:
        from dpo_driver.io import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(asdict(self), indent=2) + "\n")

    def training_params(self):
        from dpo_driver.training import DPOParams, SFTParams

        cls = SFTParams if self.kind == "sft" else DPOParams
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(self.params) - names)
        if unknown:
            raise ValueError(f"{self.kind} params {unknown} are not {cls.__name__} fields; known: {sorted(names)}")
        return cls(**self.params)


def run(spec: JobSpec, on_log=None) -> dict:
    """Train as the spec says; the result is JSON-ready: adapter_dir, num_examples, metrics."""
    from dpo_driver.io import read_jsonl
    from dpo_driver.training import train_dpo, train_sft

    records = read_jsonl(Path(spec.records))
    params = spec.training_params()
    scratch = Path(spec.scratch_dir) if spec.scratch_dir else None
    if spec.kind == "sft":
        result = train_sft(spec.base_model, records, Path(spec.output_dir), params, on_log=on_log,
                           init_adapter_dir=Path(spec.init_adapter_dir) if spec.init_adapter_dir else None,
                           scratch_dir=scratch)
    else:
        anchor = read_jsonl(Path(spec.anchor_records)) if spec.anchor_records else None
        result = train_dpo(spec.base_model, Path(spec.sft_adapter_dir), records, Path(spec.output_dir),
                           params, on_log=on_log, scratch_dir=scratch, anchor=anchor)
    return {"kind": spec.kind, "adapter_dir": str(result.adapter_dir), "num_examples": result.num_examples,
            "metrics": result.metrics}


def progress_logger(log: logging.Logger, kind: str):
    """TRL on_log callback: `sft step n/N, x steps/s: {loss: ...}`."""
    t0 = time.perf_counter()

    def on_log(logs: dict):
        step, total = logs.get("step"), logs.get("max_steps")
        rate = f", {step / (time.perf_counter() - t0):.2f} steps/s" if step else ""
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items() if k not in ("step", "max_steps")}
        log.info(f"{kind} step {step}/{total}{rate}: {shown}")

    return on_log


class _ToPipes(logging.Handler):
    """Forward records to the Dagster run log through the Pipes context."""

    def __init__(self, pipes):
        super().__init__()
        self.pipes = pipes

    def emit(self, record: logging.LogRecord) -> None:
        self.pipes.log.log(record.levelno, self.format(record))


def _logger(log_file: str) -> logging.Logger:
    log = logging.getLogger("dpo_driver.train")
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return log


def _open_pipes():
    """The Pipes context when launched by Dagster, else None (no warning, no mock)."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    return open_dagster_pipes() if PipesEnvVarParamsLoader().is_dagster_pipes_process() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_driver.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--config", required=True, type=Path, help="job spec JSON (see JobSpec)")
    parser.add_argument("--log-file", default="", help="also append the log here (the launcher reads its tail on failure)")
    args = parser.parse_args(argv)
    restore_stop_signals()  # Pipes stops a trainer with SIGINT: it must not arrive ignored
    log = _logger(args.log_file)
    pipes = _open_pipes()
    if pipes is not None:
        log.addHandler(_ToPipes(pipes))
    try:
        spec = JobSpec.load(args.config)
        if spec.kind != args.kind:
            raise ValueError(f"command says {args.kind!r} but {args.config} is a {spec.kind!r} job")
        log.info(f"{spec.kind}: {spec.records} on {spec.base_model} -> {spec.output_dir}")
        result = run(spec, on_log=progress_logger(log, spec.kind))
        log.info(f"{spec.kind} done: {result['num_examples']} examples, train_loss {result['metrics'].get('train_loss')}")
    except BaseException as e:
        log.exception(f"{args.kind} training failed: {type(e).__name__}: {e}")
        if pipes is not None:
            pipes.__exit__(type(e), e, e.__traceback__)  # the run log gets the structured exception too
        if isinstance(e, Exception):
            return 1  # the traceback is logged once above; exit status 1 tells the launcher
        raise
    if pipes is not None:
        pipes.report_custom_message(result)
        pipes.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
