"""Small helpers shared by the asset bodies: progress lines and rates for the run log."""

from __future__ import annotations

import time

import dagster as dg


def train_logger(context: dg.AssetExecutionContext, stage: str):
    """TRL on_log callback writing `stage step n/N loss ... (x steps/s)` into the run log."""
    t0 = time.perf_counter()

    def on_log(logs: dict):
        step, total = logs.get("step"), logs.get("max_steps")
        rate = f", {step / (time.perf_counter() - t0):.2f} steps/s" if step else ""
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items() if k not in ("step", "max_steps")}
        context.log.info(f"{stage} step {step}/{total}{rate}: {shown}")

    return on_log


def episode_logger(context: dg.AssetExecutionContext, stage: str, every: int = 10):
    def on_progress(p: dict):
        if p["done"] % every == 0 or p["done"] == p["total"]:
            context.log.info(
                f"{stage}: {p['done']}/{p['total']} episodes ({p['episodes_per_second']:.2f}/s), "
                f"task {p['task']}, success so far {p['success_so_far']:.0%}"
            )

    return on_progress
