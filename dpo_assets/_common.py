"""Small helpers shared by the asset bodies: progress lines and rates for the run log.

(Training progress arrives through Dagster Pipes from `python -m dpo_driver.train`.)"""

from __future__ import annotations


import dagster as dg


def episode_logger(context: dg.AssetExecutionContext, stage: str, every: int = 10):
    def on_progress(p: dict):
        if p["done"] % every == 0 or p["done"] == p["total"]:
            context.log.info(
                f"{stage}: {p['done']}/{p['total']} episodes ({p['episodes_per_second']:.2f}/s), "
                f"task {p['task']}, success so far {p['success_so_far']:.0%}"
            )

    return on_progress
